"""Raw-bytes relay of gRPC calls between two HTTP/2 connections, shared by both directions.

It pairs a caller's stream with an upstream stream, rewrites `grpc-timeout`, answers the caller with a gRPC
status when the call cannot be placed, and records metrics. Where a call goes is decided by the `Router`
it is given (outbound.py, inbound.py); it never reads message bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from sidecar.accesslog import AccessLog, CallRecord, call_record
from sidecar.h2 import frames as F
from sidecar.h2.connection import Connection, Flusher, Headers, Limits, Stream
from sidecar.link import Link
from sidecar.metrics import Metrics
from sidecar.retry import CODE_NAMES, MAX_REPLAY_BYTES, RetryPolicy, decide_refused, retry_headers
from sidecar.status import Status
from sidecar.tap import Tap

log = logging.getLogger(__name__)

# The statuses the relay answers with, by the names the directions import (sidecar/status.py defines them).
OK = Status.OK
CANCELLED = Status.CANCELLED
UNKNOWN = Status.UNKNOWN
DEADLINE_EXCEEDED = Status.DEADLINE_EXCEEDED
NOT_FOUND = Status.NOT_FOUND
PERMISSION_DENIED = Status.PERMISSION_DENIED
RESOURCE_EXHAUSTED = Status.RESOURCE_EXHAUSTED
INTERNAL = Status.INTERNAL
UNAVAILABLE = Status.UNAVAILABLE

# Why a call failed when its endpoint never started answering before the deadline: the sign of a peer that
# stopped (SIGSTOP, a black hole), as opposed to one that answers with errors.
NO_RESPONSE = "no response before the deadline"

# A call whose request never left this proxy, or that its endpoint refused unprocessed, is placed again at
# most this often (then UNAVAILABLE).
MAX_PLACEMENTS = 3
# Why an endpoint failed a call it refused unprocessed (RST_STREAM REFUSED_STREAM): its proxy could not reach
# its app. Counted toward ejection like any failure; the call itself is placed elsewhere.
REFUSED = "refused unprocessed: its app is unreachable"
# The `reason` of kuberpc_retries_total for such a placement (exported at zero by Metrics).
RETRY_REASONS = ("connect_failure", "refused")

# A caller that cancels this close to its own deadline (`grpc-timeout`) has hit it: recorded as
# DEADLINE_EXCEEDED, as gRPC clients and the server side (whose app answers 4) record it, not CANCELLED.
# Slack because the caller's deadline clock started before ours: by the time its headers took to reach
# us (loopback, but a loaded pod can delay the read) and its timer's granularity; 10% of the deadline,
# at least 50 ms and at most 1 s, so that a real cancel well before the deadline stays CANCELLED.
DEADLINE_SLACK_MIN_S = 0.05
DEADLINE_SLACK_MAX_S = 1.0
DEADLINE_SLACK_RATIO = 0.1

# What a request that is not gRPC gets (gRPC over HTTP/2: "SHOULD respond with HTTP status 415"), from the
# proxy itself, so that it never depends on how the app treats non-gRPC requests.
_NOT_GRPC: Headers = [(b":status", b"415"), (b"content-type", b"text/plain; charset=utf-8")]
_NOT_GRPC_BODY = b"kuberpc relays gRPC only: content-type must be application/grpc\n"
_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}


def parse_grpc_timeout(value: bytes) -> float | None:
    """`grpc-timeout` (1-8 digits and a unit) in seconds; None when malformed."""
    if not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1])
    return None if unit is None else int(value[:-1]) * unit


def format_grpc_timeout(seconds: float) -> bytes:
    """The most precise unit that fits in 8 digits."""
    if seconds <= 0:
        return b"0n"
    for unit, scale in ((b"n", 1e9), (b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60)):
        v = int(seconds * scale)
        if v < 100_000_000:
            return b"%d%s" % (max(v, 1), unit)
    return b"%dH" % min(int(seconds / 3600) or 1, 99_999_999)


def encode_grpc_message(message: str) -> bytes:
    """Percent-encoding of the gRPC spec: printable ASCII but '%' as is, everything else as %XX of UTF-8."""
    out = bytearray()
    for b in message.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def trailers_only(status: int, message: str) -> Headers:
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(status).encode()),
        (b"grpc-message", encode_grpc_message(message)),
    ]


class Request:
    """What routing needs from a request's headers (a plain slotted class: one is built per call, and a
    frozen dataclass costs several times more to construct)."""

    __slots__ = ("authority", "path", "timeout")

    def __init__(self, path: str, authority: str | None, timeout: float | None) -> None:
        self.path = path
        self.authority = authority
        self.timeout = timeout


@dataclass(frozen=True, slots=True)
class Reject:
    """The call cannot be placed: answer the caller with this gRPC status."""

    status: int
    message: str
    service: str = "unknown"


class Target(Protocol):
    """Where a call goes: the router fills these in; the relay reports back when the call ends."""

    service: str
    timeout: float | None  # the Service's default deadline when the caller set none
    plaintext: bool  # placed on a non-meshed endpoint (no mTLS): counted with tls="false"

    @property
    def retries(self) -> RetryPolicy | None:
        """What may be retried and within which budget; None: nothing is (and nothing is buffered)."""
        ...

    def open(self, up: MeshStream, headers: Headers, end: bool) -> Reject | None: ...
    def done(self, latency_s: float, failure: str) -> None:
        """The call ended; `failure` says how the endpoint failed it ("" when it did not)."""
        ...


class Router(Protocol):
    direction: str
    # Whether the callers are kuberpc proxies (inbound's are): a call that cannot reach its endpoint is then
    # refused with RST_STREAM REFUSED_STREAM (never processed, RFC 9113 §8.7), which the caller's proxy places
    # on another endpoint. Apps (outbound's callers) get a gRPC status instead, so the outbound side keeps each
    # request (up to MAX_REPLAY_BYTES) to place a refused call elsewhere itself.
    callers_replace: bool

    def route(self, conn: MeshConnection, request: Request) -> Target | Reject: ...


class Call:
    """One relayed call; both streams point at it. Cycles are broken when it finishes."""

    __slots__ = (
        "attempts",
        "closed",
        "deadline",
        "down",
        "expires",
        "failure",
        "method",
        "relay",
        "replay",
        "req_bytes",
        "resp_bytes",
        "start",
        "status",
        "target",
        "timeout",
        "up",
    )

    def __init__(self, relay: Relay, down: MeshStream, up: MeshStream | None, target: Target | None, method: str) -> None:
        self.relay = relay
        self.down = down
        self.up = up
        self.target = target
        self.method = method
        self.start = relay.clock()
        self.req_bytes = 0
        self.resp_bytes = 0
        self.status = -1
        self.closed = 0
        self.attempts = 0
        self.deadline: asyncio.TimerHandle | None = None
        self.timeout: float | None = None
        self.failure = ""  # why the endpoint failed the call, for failure accrual ("" when it did not)
        self.replay: Replay | None = None
        self.expires = 0.0  # when set (> 0): on our clock, the caller's deadline less the slack


# The codec's connections and streams as the mesh uses them: a Link on each connection, a Call on each stream.
MeshConnection: TypeAlias = "Connection[Link, Call]"
MeshStream: TypeAlias = "Stream[Link, Call]"


class Replay:
    """A call's request kept for another attempt while it stays small: headers and DATA payloads."""

    __slots__ = ("attempts", "chunks", "headers", "size", "too_large")

    def __init__(self, headers: Headers) -> None:
        self.headers = list(headers)
        self.chunks: list[tuple[bytes, bool]] = []
        self.size = 0
        self.too_large = False
        self.attempts = 1

    def add(self, data: bytes, end: bool) -> None:
        if self.too_large:
            return
        self.size += len(data)
        if self.size > MAX_REPLAY_BYTES:
            self.too_large = True
            self.chunks = []
        else:
            self.chunks.append((data, end))


class Relay:
    """The ConnectionHandler of every connection of one direction (its listeners' and its upstreams')."""

    def __init__(
        self,
        router: Router,
        *,
        metrics: Metrics,
        flusher: Flusher,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        on_connection: Callable[[MeshConnection], None] | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.router = router
        self.access_log = access_log
        self.tap: Tap | None = None  # set by the Tap while someone is subscribed
        self.direction = router.direction
        self.callers_replace = router.callers_replace
        self.metrics = metrics
        self.flusher = flusher
        self.limits = limits
        self.clock = clock
        self.on_connection = on_connection
        self.downstream: set[MeshConnection] = set()
        self.idle = asyncio.Event()  # set while no caller is connected: drain waits on it
        self.idle.set()
        self.calls = 0

    def server_connection(self, name: str, link: Link | None = None) -> MeshConnection:
        return Connection(
            self, link=link or Link(), client=False, flusher=self.flusher, limits=self.limits, name=name, clock=self.clock
        )

    # ---- ConnectionHandler --------------------------------------------------------------------------

    def on_connection_made(self, conn: MeshConnection) -> None:
        if not conn.client:
            self.downstream.add(conn)
            self.idle.clear()
        if self.on_connection is not None:
            self.on_connection(conn)

    def on_connection_lost(self, conn: MeshConnection) -> None:
        self.downstream.discard(conn)
        if not self.downstream:
            self.idle.set()

    def on_request(self, conn: MeshConnection, s: MeshStream, headers: Headers, end: bool) -> None:
        # The codec has checked the request is well-formed (sidecar/h2/fields.py); what is left is gRPC's.
        path = authority = None
        content_type = b""
        timeout_at = -1
        for i, (name, value) in enumerate(headers):
            if name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout_at = i
        if not content_type.startswith(b"application/grpc") or path is None:
            return self._not_grpc(s)
        spath = path.decode("latin-1")
        timeout = parse_grpc_timeout(headers[timeout_at][1]) if timeout_at >= 0 else None
        request = Request(spath, authority.decode("latin-1") if authority is not None else None, timeout)
        target = self.router.route(conn, request)
        if isinstance(target, Reject):
            return self._reject(s, target, spath)
        if timeout is not None:
            # Forward the deadline less what this proxy has already spent on the call.
            spent = self.clock() - conn.received_at
            headers[timeout_at] = (b"grpc-timeout", format_grpc_timeout(timeout - spent))
        elif target.timeout is not None and timeout_at < 0:
            timeout = target.timeout
            headers.append((b"grpc-timeout", format_grpc_timeout(timeout)))
        up = Stream(conn)  # re-homed by target.open onto the chosen upstream connection
        call = Call(self, s, up, target, spath)
        if timeout is not None and timeout_at >= 0:
            slack = min(max(timeout * DEADLINE_SLACK_RATIO, DEADLINE_SLACK_MIN_S), DEADLINE_SLACK_MAX_S)
            call.expires = conn.received_at + timeout - slack
        call.timeout = timeout
        s.call = up.call = call
        s.peer = up
        up.peer = s
        self.metrics.call_started(self.direction, target.service)
        self.calls += 1
        failure = target.open(up, headers, end)
        if failure is not None:
            self._fail(call, failure.status, failure.message)
            return None
        if timeout is not None and timeout_at < 0:
            # We set this deadline, so we enforce it: the caller is not counting.
            call.deadline = asyncio.get_running_loop().call_later(timeout, self._expire, call)
        retries = target.retries
        if call.down is not None and (retries is not None or not self.callers_replace):
            if retries is not None:
                retries.budget.deposit()
            call.replay = Replay(headers)
        return None

    def on_headers(self, s: MeshStream, headers: Headers, end: bool) -> None:
        call = s.call
        if call is None:
            return
        if s is call.down or not end:
            # Request trailers (gRPC clients send none), or the response started: never replayed from here on.
            call.replay = None
        else:
            for name, value in headers:
                if name == b"grpc-status":
                    call.status = int(value) if value.isdigit() and len(value) <= 3 else UNKNOWN
                    break
            if call.replay is not None and call.status != OK and self._retry(call, call.status, ""):
                return
        peer = s.peer
        if peer is not None and not peer.reset:
            peer.conn.send_headers(peer, headers, end)

    def on_data(self, s: MeshStream, data: bytes, end: bool, flow: int) -> None:
        call = s.call
        if call is not None:
            if s is call.down:
                call.req_bytes += len(data)
                if call.replay is not None:
                    call.replay.add(data, end)
            else:
                call.resp_bytes += len(data)
        peer = s.peer
        if peer is None or peer.reset:
            s.conn.credit(s, flow)
        else:
            peer.conn.send_data(peer, data, end, s, flow)

    def on_reset(self, s: MeshStream, code: int) -> None:
        call = s.call
        if call is None:
            return
        peer = s.peer
        if peer is None or peer.reset:
            return
        if s is call.down:
            if call.status < 0:
                call.status = self._cancelled(call)
                timeout = call.timeout
                if timeout is not None and not peer.got_headers and self.clock() - call.start >= timeout * 0.95:
                    # The caller gave up at its deadline and the endpoint had not even started answering.
                    call.failure = NO_RESPONSE
            peer.conn.reset_stream(peer, F.CANCEL)
            return
        if s.remote_closed:
            # The whole response already arrived (a server may reset a finished call whose request is
            # still open, RFC 9113 §8.1): let it reach the caller as it is.
            return
        # Upstream side failed. A lost connection becomes UNAVAILABLE naming the peer; a reset from the peer
        # is passed on with its own code, which the caller's gRPC library maps to the matching status.
        if s.conn.closed:
            call.failure = f"connection lost: {s.conn.link.error or 'closed'}"
            if call.replay is not None and self._retry(call, UNAVAILABLE, call.failure):
                return
            self._answer(call, UNAVAILABLE, f"upstream {s.conn.name} failed: {s.conn.link.error or 'connection lost'}")
            return
        call.failure = f"reset: code {code}"
        if code == F.REFUSED_STREAM and not self.callers_replace:
            # The endpoint's proxy did not reach its app: safe to place elsewhere, with or without a retry policy.
            call.failure = REFUSED
            if not self._retry(call, UNAVAILABLE, REFUSED, refused=True):
                target = call.target
                service = target.service if target is not None else "unknown"
                self._answer(call, UNAVAILABLE, f"kuberpc: service {service}: {s.conn.name} {REFUSED}, and no other attempt was possible")
            return
        if call.status < 0:
            if code == F.CANCEL:
                call.status = self._cancelled(call)
            else:
                call.status = UNAVAILABLE if code == F.REFUSED_STREAM else INTERNAL
        peer.conn.reset_stream(peer, code)

    def on_refused(self, s: MeshStream) -> None:
        """The upstream stream was never processed (connect failed, or GOAWAY): re-place it, a bounded number
        of times, from what is still queued or else from the replay buffer. When that is over, a proxy caller
        is refused in turn (REFUSED_STREAM, to place the call elsewhere); an app gets UNAVAILABLE naming the
        upstream."""
        call = s.call
        if call is None or call.target is None:
            return
        conn = s.conn
        reason = conn.link.error or "refused the stream (GOAWAY)"
        unsent = conn.take_unsent(s) if call.attempts < MAX_PLACEMENTS else None
        if unsent is not None:
            call.attempts += 1
            self.metrics.retry(call.target.service, "connect_failure" if conn.closed else "refused")
            headers, end = unsent
            failure = call.target.open(s, headers, end)
            if failure is not None:
                self._fail(call, failure.status, failure.message)
            return
        s.reset = True
        conn.release_pending(s)
        if conn.closed:
            call.failure = f"connect: {reason}"
        elif s.id and self._retry(call, UNAVAILABLE, "", refused=True):
            return  # sent, then refused by the peer's GOAWAY: placed again from the replay buffer
        down = call.down
        if self.callers_replace and down is not None and not down.sent_headers and not down.reset:
            # Never processed: the caller's proxy may place it elsewhere (the reset tells on_closed it is done).
            call.status = UNAVAILABLE
            down.conn.reset_stream(down, F.REFUSED_STREAM)
        else:
            self._answer(call, UNAVAILABLE, f"upstream {conn.name}: {reason}")
        self._closed(call)

    def on_closed(self, s: MeshStream) -> None:
        call = s.call
        if call is not None:
            self._closed(call)

    # ---- retries ------------------------------------------------------------------------------------

    def _retry(self, call: Call, status: int, failure: str, *, refused: bool = False) -> bool:
        """Send the call again from its replay buffer, if its Service's policy allows; True when it did.

        Only before the caller has seen a response header, only with the whole request buffered, within
        the budget, the attempt limit and the deadline; the new attempt goes to another endpoint if one exists.
        `refused`: the endpoint did not process it (REFUSED_STREAM, GOAWAY): placed again whatever the policy,
        outside the budget, at most MAX_PLACEMENTS times (retry.decide_refused).
        """
        replay, target, down, old = call.replay, call.target, call.down, call.up
        if replay is None or target is None or down is None or old is None or down.sent_headers or down.pending:
            return False
        policy = target.retries
        if policy is None and not refused:
            return False
        elapsed = self.clock() - call.start
        remaining = call.timeout - elapsed if call.timeout is not None else None
        replayable = "body_too_large" if replay.too_large else "" if down.remote_closed else "request_incomplete"
        if refused:
            why = decide_refused(placements=call.attempts, limit=MAX_PLACEMENTS, remaining_s=remaining, replayable=replayable)
        else:
            assert policy is not None
            why = policy.decide(status, attempts=replay.attempts, remaining_s=remaining, replayable=replayable)
        if why:
            if why != "not_retryable":
                self.metrics.retry(target.service, why)
            return False
        # Detach the failed attempt: its stream's last events must not reach this call.
        old.call = old.peer = None
        if not old.reset and not old.local_closed:
            old.conn.reset_stream(old, F.CANCEL)
        target.done(elapsed, failure if refused else failure or ("unavailable" if status == UNAVAILABLE else ""))
        call.status = -1
        call.failure = ""
        up = Stream(down.conn)
        call.up = up
        up.call = call
        up.peer = down
        down.peer = up
        timeout = format_grpc_timeout(remaining) if remaining is not None else None
        if refused:  # not an attempt that reached an app: grpc-previous-rpc-attempts stays as it was
            call.attempts += 1
            headers = retry_headers(replay.headers, timeout=timeout, previous=replay.attempts - 1)
            self.metrics.retry(target.service, "refused")
        else:
            headers = retry_headers(replay.headers, timeout=timeout, previous=replay.attempts)
            replay.attempts += 1
            self.metrics.retry(target.service, CODE_NAMES.get(status, str(status)))
        chunks = replay.chunks
        rejected = target.open(up, headers, not chunks)
        if rejected is not None:
            self._fail(call, rejected.status, rejected.message)
            return True
        for data, end in chunks:
            up.conn.send_data(up, data, end, None, 0)
        return True

    # ---- helpers ------------------------------------------------------------------------------------

    def _closed(self, call: Call) -> None:
        call.closed += 1
        if call.closed != 2:
            return
        if call.deadline is not None:
            call.deadline.cancel()
        down, up = call.down, call.up
        latency = self.clock() - call.start
        status = call.status if call.status >= 0 else UNKNOWN
        target = call.target
        if target is not None:
            target.done(latency, call.failure or ("unavailable" if status == UNAVAILABLE else ""))
            self.metrics.call_finished(
                self.direction,
                target.service,
                call.method,
                str(status),
                latency,
                call.req_bytes,
                call.resp_bytes,
                plaintext=target.plaintext,
            )
            if self.access_log is not None or self.tap is not None:
                self._observed(self._call_record(call, target.service, status, latency))
        # Break the reference cycles (stream <-> peer <-> call) so no cyclic GC is needed.
        down.peer = down.call = None
        if up is not None:
            up.peer = up.call = None
        call.down = call.up = None  # type: ignore[assignment]
        call.target = None

    def _not_grpc(self, s: MeshStream) -> None:
        """415 with a line saying why. The stream stays open for the rest of the request, which the codec
        reads, checks and discards, so a malformed body still gets the RFC's stream error."""
        log.debug("not a gRPC request conn=%s stream=%d", s.conn.name, s.id)
        s.conn.send_headers(s, _NOT_GRPC, False)
        s.conn.send_data(s, _NOT_GRPC_BODY, True, None, 0)

    def _cancelled(self, call: Call) -> int:
        """The status of a call cancelled by either side: DEADLINE_EXCEEDED at the caller's deadline."""
        return DEADLINE_EXCEEDED if 0 < call.expires <= self.clock() else CANCELLED

    def _observed(self, record: CallRecord) -> None:
        if self.access_log is not None:
            self.access_log.write(record)
        if self.tap is not None:
            self.tap.publish(record)

    def _call_record(self, call: Call, service: str, status: int, latency: float) -> CallRecord:
        up = call.up
        upstream: MeshConnection | None = up.conn if up is not None and up.conn.client else None
        peer_conn = call.down.conn if self.direction == "inbound" else upstream
        peer = peer_conn.link.peer_id if peer_conn is not None else None
        endpoint = upstream.link.endpoint if upstream is not None else None
        return call_record(
            direction=self.direction,
            service=service,
            method=call.method,
            grpc_code=status,
            duration_s=latency,
            request_bytes=call.req_bytes,
            response_bytes=call.resp_bytes,
            peer=str(peer) if peer is not None else None,
            upstream=str(endpoint) if endpoint is not None else None,
        )

    def _reject(self, s: MeshStream, reject: Reject, path: str) -> None:
        """A call that is never placed: a trailers-only answer, counted in metrics."""
        self.metrics.call_started(self.direction, reject.service)
        self.metrics.call_finished(self.direction, reject.service, path, str(reject.status), 0.0, 0, 0)
        if self.access_log is not None or self.tap is not None:
            peer = s.conn.link.peer_id
            self._observed(
                call_record(
                    direction=self.direction,
                    service=reject.service,
                    method=path,
                    grpc_code=reject.status,
                    duration_s=0.0,
                    request_bytes=0,
                    response_bytes=0,
                    peer=str(peer) if peer is not None else None,
                    upstream=None,
                )
            )
        log.debug("call rejected path=%s status=%d reason=%s", path, reject.status, reject.message)
        conn = s.conn
        conn.send_headers(s, trailers_only(reject.status, reject.message), True)
        if not s.remote_closed:
            conn.reset_after_flush(s, F.NO_ERROR)  # the answer is complete: stop sending us the request

    def _answer(self, call: Call, status: int, message: str) -> None:
        """Finish the caller's side with a gRPC status (trailers-only, or trailers after a started response)
        unless its response is already complete or queued in full."""
        down = call.down
        if down is None or down.reset or down.local_closed:
            return
        pending = down.pending
        if pending and any(item[1] for item in pending):
            return  # the upstream's own END_STREAM is queued: that answer stands
        call.status = status
        conn = down.conn
        if down.sent_headers or pending:
            conn.send_headers(down, [(b"grpc-status", str(status).encode()), (b"grpc-message", encode_grpc_message(message))], True)
        else:
            conn.send_headers(down, trailers_only(status, message), True)
        if not down.remote_closed:
            conn.reset_after_flush(down, F.NO_ERROR)

    def _fail(self, call: Call, status: int, message: str) -> None:
        up = call.up
        self._answer(call, status, message)
        if up is not None and not up.reset:
            up.reset = True
            up.conn.release_pending(up)
        call.closed = 1
        self._closed(call)

    def _expire(self, call: Call) -> None:
        call.deadline = None
        if call.down is None:
            return
        up = call.up
        if up is not None and not up.got_headers:
            call.failure = NO_RESPONSE
        self._answer(call, DEADLINE_EXCEEDED, "deadline exceeded (kuberpc.io/timeout)")
        if up is not None and not up.reset:
            up.conn.reset_stream(up, F.CANCEL)

    def placed_late(self, stream: MeshStream, headers: Headers, target: Target) -> bool:
        """For a call routed only after it was accepted (sidecar/ondemand.py: its Service was not known yet):
        what routing at arrival would have given it, counted from the call's arrival. The caller's
        `grpc-timeout` in `headers` (about to be forwarded) is cut by the time spent waiting; with none, the
        Service's default deadline is added and enforced here. The retry budget gets the call's deposit.
        False when the deadline has already passed (the call is then answered DEADLINE_EXCEEDED) or the call
        is over."""
        call = stream.call
        if call is None or call.down is None:
            return False
        waited = self.clock() - call.start
        at = next((i for i, (name, _) in enumerate(headers) if name == b"grpc-timeout"), -1)
        if at >= 0:
            # The caller's own (a malformed one stays as it is, as at arrival, and adds no default).
            if call.timeout is not None:
                left = call.timeout - waited
                if left <= 0:
                    self._fail(call, DEADLINE_EXCEEDED, "deadline exceeded")
                    return False
                headers[at] = (b"grpc-timeout", format_grpc_timeout(left))
        elif target.timeout is not None:
            left = target.timeout - waited
            call.timeout = target.timeout
            if left <= 0:
                self._fail(call, DEADLINE_EXCEEDED, "deadline exceeded (kuberpc.io/timeout)")
                return False
            headers.append((b"grpc-timeout", format_grpc_timeout(left)))
            call.deadline = asyncio.get_running_loop().call_later(left, self._expire, call)
        if target.retries is not None:
            target.retries.budget.deposit()
        return True

    def fail(self, stream: MeshStream, status: int, message: str) -> None:
        """Answer the call of `stream` (either side) with this status: for a Target that accepted a call in
        `open` and then could not place it (sidecar/ondemand.py). Nothing when the call is already over."""
        call = stream.call
        if call is not None and call.down is not None:
            self._fail(call, status, message)

    def drain(self) -> None:
        for conn in list(self.downstream):
            conn.drain()

    def debug(self) -> dict[str, object]:
        return {
            "direction": self.direction,
            "calls": self.calls,
            # Bound methods: each connection is described when /debug's encoder reaches it (admin.render_json).
            "connections": [c.debug for c in list(self.downstream)],
        }
