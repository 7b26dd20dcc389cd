"""A closed-loop gRPC load generator on raw HTTP/2 whose calls may carry headers that change every call.

h2load sends one header list for every request. Real clients do not: each call carries its own
`grpc-timeout` (the deadline left), a trace context and a request id. Those values defeat any per-list memo
in a proxy and, encoded as real clients encode them (HPACK incremental indexing and Huffman, here by the
`hpack` library, the encoder of python-hyper's h2), they churn the dynamic table of every hop. The header
blocks of a run are encoded before it starts, in the order each connection sends them, so the timed window
only writes bytes and reads replies, as h2load does. Every reply is checked (one framed message of the
expected bytes, then trailers); header blocks received are never decoded (a proxy's gRPC error arrives as
trailers only and fails the byte check). Client only: it must not start servers.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import hpack

from bench import grpcwire, rawh2
from bench.rawh2 import DATA, END_HEADERS, END_STREAM, HEADERS

USER_AGENT = b"grpc-go/1.66.0"


class LoadError(RuntimeError):
    """A call failed, was reset, answered the wrong bytes or did not finish in time: no measurement."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    calls: int  # unary calls, or stream messages answered
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s > 0 else 0.0


def request_headers(authority: str, path: str, *, vary: bool, rng: random.Random) -> list[tuple[bytes, bytes]]:
    """The header list of one call as grpc-go sends it; with `vary`, a fresh deadline, trace and request id."""
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", b"application/grpc"),
        (b"user-agent", USER_AGENT),
        (b"te", b"trailers"),
    ]
    if vary:
        trace, span, req = rng.getrandbits(128), rng.getrandbits(64), rng.getrandbits(128)
        headers += [
            (b"grpc-timeout", b"%du" % rng.randrange(900_000, 1_000_000)),
            (b"traceparent", b"00-%032x-%016x-01" % (trace, span)),
            (b"x-request-id", b"%08x-%04x-4%03x-a%03x-%012x" % (
                req >> 96, (req >> 80) & 0xFFFF, (req >> 68) & 0xFFF, (req >> 56) & 0xFFF, req & 0xFFFFFFFFFFFF)),
        ]
    return headers


def encode_blocks(authority: str, path: str, n: int, *, vary: bool, seed: int) -> list[bytes]:
    """`n` header blocks as one connection sends them, in order (the encoder's table evolves with them)."""
    rng = random.Random(seed)
    encoder = hpack.Encoder()
    if not vary:
        # Identical calls: the table is warm after the first, every later block is the same bytes.
        first = encoder.encode(request_headers(authority, path, vary=False, rng=rng))
        rest = encoder.encode(request_headers(authority, path, vary=False, rng=rng)) if n > 1 else b""
        return [first] + [rest] * (n - 1)
    return [encoder.encode(request_headers(authority, path, vary=True, rng=rng)) for _ in range(n)]


class _Client(rawh2.Peer):
    def __init__(self, done: asyncio.Future[None]) -> None:
        super().__init__(on_lost=self._lost)
        self._done = done
        self._next_sid = 1
        self._pending: list[tuple[int, bytes, int]] = []  # (sid, DATA frames, length) waiting for window
        self.completed = 0  # calls, or stream messages, answered

    def start(self) -> None:
        raise NotImplementedError

    def _lost(self, exc: Exception | None) -> None:
        self._settle(LoadError(f"connection lost: {exc}"))

    def _settle(self, error: Exception | None = None) -> None:
        if not self._done.done():
            if error is not None:
                self._done.set_exception(error)
            else:
                self._done.set_result(None)

    def fail(self, message: str) -> None:
        super().fail(message)
        self._settle(LoadError(message))

    def open(self) -> None:
        self.queue(rawh2.PREFACE + rawh2.our_settings())

    def _new_sid(self) -> int:
        sid = self._next_sid
        self._next_sid += 2
        return sid

    def _send_data(self, sid: int, frames: bytes, n: int) -> None:
        if self._pending or self.send_window(sid) < n:
            self._pending.append((sid, frames, n))
            return
        self.spend(sid, n)
        self.queue(frames)

    def on_window(self) -> None:
        while self._pending:
            sid, frames, n = self._pending[0]
            if self.send_window(sid) < n:
                return
            self._pending.pop(0)
            self.spend(sid, n)
            self.queue(frames)


class UnaryClient(_Client):
    """Sends its blocks as unary calls, `depth` in flight, each with `body`; every reply must be `expected`."""

    def __init__(self, blocks: list[bytes], body: bytes, expected: bytes, depth: int, done: asyncio.Future[None]) -> None:
        super().__init__(done)
        self._blocks = blocks
        self._body = body
        self._expected = expected
        self._depth = depth
        self._sent = 0
        self._got: dict[int, bytes] = {}

    def start(self) -> None:
        for _ in range(min(self._depth, len(self._blocks))):
            self._call()
        self.flush()

    def _call(self) -> None:
        sid = self._new_sid()
        block = self._blocks[self._sent]
        self._sent += 1
        self.queue(rawh2.frame(HEADERS, END_HEADERS, sid, block))
        self._send_data(sid, rawh2.frame(DATA, END_STREAM, sid, self._body), len(self._body))

    def on_data(self, sid: int, payload: bytes, end: bool) -> None:
        self._got[sid] = self._got.get(sid, b"") + payload

    def on_headers(self, sid: int, flags: int) -> None:
        if not flags & END_STREAM:
            return
        body = self._got.pop(sid, b"")
        if body != self._expected:
            self.fail(f"call on stream {sid} answered {body!r}, expected {self._expected!r}")
            return
        self.completed += 1
        if self.completed == len(self._blocks):
            self._settle()
        elif self._sent < len(self._blocks):
            self._call()


class StreamClient(_Client):
    """`streams` bidi calls of `messages` each, `depth` messages outstanding per stream; replies are running sums."""

    def __init__(self, blocks: list[bytes], messages: int, depth: int, done: asyncio.Future[None]) -> None:
        super().__init__(done)
        self._blocks = blocks
        self._streams = len(blocks)
        self._messages = messages
        self._depth = depth
        self._message = grpcwire.frame(grpcwire.encode_args(1, 2))
        self._step = 3  # Add(1, 2): the k-th reply is 3k
        self._sent: dict[int, int] = {}
        self._received: dict[int, int] = {}
        self._bufs: dict[int, bytes] = {}
        self._finished = 0

    def start(self) -> None:
        for block in self._blocks:
            sid = self._new_sid()
            self._sent[sid] = self._received[sid] = 0
            self.queue(rawh2.frame(HEADERS, END_HEADERS, sid, block))
            for _ in range(min(self._depth, self._messages)):
                self._send_message(sid)
        self.flush()

    def _send_message(self, sid: int) -> None:
        self._sent[sid] += 1
        last = self._sent[sid] == self._messages
        msg = self._message
        self._send_data(sid, rawh2.frame(DATA, END_STREAM if last else 0, sid, msg), len(msg))

    def on_data(self, sid: int, payload: bytes, end: bool) -> None:
        buf = self._bufs.pop(sid, b"") + payload if sid in self._bufs else payload
        pos = 0
        received = self._received[sid]
        while len(buf) - pos >= 5:
            length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            if len(buf) - pos - 5 < length:
                break
            received += 1
            value = grpcwire.decode_reply(buf[pos + 5 : pos + 5 + length])
            pos += 5 + length
            if value != received * self._step:
                self.fail(f"stream {sid}: reply {received} was {value}, expected {received * self._step}")
                return
            if self._sent[sid] < self._messages:
                self._send_message(sid)
        self.completed += received - self._received[sid]
        self._received[sid] = received
        if pos < len(buf):
            self._bufs[sid] = buf[pos:]

    def on_headers(self, sid: int, flags: int) -> None:
        if not flags & END_STREAM:
            return
        if self._received.get(sid) != self._messages:
            self.fail(f"stream {sid} ended after {self._received.get(sid)} of {self._messages} replies")
            return
        self._finished += 1
        if self._finished == self._streams:
            self._settle()


async def _connect(port: int, make: Callable[[], _Client], timeout_s: float) -> _Client:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(loop.create_connection(make, "127.0.0.1", port), timeout_s)
    return proto


async def _drive(clients: list[_Client], futures: list[asyncio.Future[None]], on_start: Callable[[], object] | None,
                 timeout_s: float, clock: Callable[[], float]) -> float:
    for c in clients:
        c.open()
        c.flush()
    await asyncio.sleep(0)  # let every SETTINGS exchange start before the clock does
    if on_start is not None:
        on_start()
    start = clock()
    for c in clients:
        c.start()
    try:
        await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
    except TimeoutError as e:
        raise LoadError(f"load did not finish within {timeout_s} s") from e
    finally:
        for c in clients:
            if c.transport is not None:
                c.transport.close()
    return clock() - start


async def unary(
    port: int, authority: str, path: str, *, calls: int, connections: int, depth: int, vary: bool,
    body: bytes, expected: bytes, timeout_s: float, seed: int = 0,
    on_start: Callable[[], object] | None = None, clock: Callable[[], float] = time.perf_counter,
) -> LoadResult:
    """`calls` unary calls over `connections`, `depth` in flight on each; elapsed from the first send."""
    loop = asyncio.get_running_loop()
    shares = [calls // connections + (1 if i < calls % connections else 0) for i in range(connections)]
    blocks = [encode_blocks(authority, path, n, vary=vary, seed=seed + i) for i, n in enumerate(shares) if n]
    futures = [loop.create_future() for _ in blocks]
    clients: list[_Client] = []
    for b, f in zip(blocks, futures, strict=True):
        clients.append(await _connect(port, _unary_factory(b, body, expected, depth, f), timeout_s))
    elapsed = await _drive(clients, futures, on_start, timeout_s, clock)
    return LoadResult(sum(c.completed for c in clients), elapsed)


def _unary_factory(blocks: list[bytes], body: bytes, expected: bytes, depth: int,
                   done: asyncio.Future[None]) -> Callable[[], _Client]:
    return lambda: UnaryClient(blocks, body, expected, depth, done)


def _stream_factory(blocks: list[bytes], messages: int, depth: int, done: asyncio.Future[None]) -> Callable[[], _Client]:
    return lambda: StreamClient(blocks, messages, depth, done)


async def streams(
    port: int, authority: str, path: str, *, messages: int, connections: int, streams_per_connection: int,
    depth: int, timeout_s: float, on_start: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> LoadResult:
    """Bidi calls, `messages` in all, `depth` messages outstanding on each stream; elapsed from the first send."""
    loop = asyncio.get_running_loop()
    per_stream = max(1, messages // (connections * streams_per_connection))
    futures = [loop.create_future() for _ in range(connections)]
    clients: list[_Client] = []
    for i, f in enumerate(futures):
        blocks = encode_blocks(authority, path, streams_per_connection, vary=False, seed=i)
        clients.append(await _connect(port, _stream_factory(blocks, per_stream, depth, f), timeout_s))
    elapsed = await _drive(clients, futures, on_start, timeout_s, clock)
    return LoadResult(sum(c.completed for c in clients), elapsed)
