"""One HTTP/2 connection (RFC 9113) as an asyncio Protocol, client or server role, built to relay streams.

It owns framing, stream states, SETTINGS, PING, GOAWAY and flow control; it never decides where a call goes
(that is the handler's job) and never parses message bodies: DATA goes to the handler's `on_data` as it comes.

Hand-written rather than built on the `h2` library: measured, `h2` cost more CPU per call than the whole
budget of this proxy (its event objects and per-frame validation are general-purpose); this file does only
what a relay needs, and the conformance tests drive it with `h2` as the strict peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

from sidecar.h2 import frames as F
from sidecar.h2.fields import Malformed, check_request, check_response, check_trailers
from sidecar.h2.hpack import Decoder, Encoder, HeaderListTooLarge, HPACKError

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]
# What the owner keeps on each connection (`Connection.link`) and on each stream (`Stream.call`): the codec
# stores them for it and never reads them, so the owner gets its own types back without a cast.
L = TypeVar("L")
C = TypeVar("C")

_HEADER = F.HEADER
_unpack_header = _HEADER.unpack_from
_DATA = F.DATA
_HEADERS = F.HEADERS
_WINDOW_UPDATE = F.WINDOW_UPDATE
WRITE_HIGH_WATER = 256 << 10  # bytes queued for one socket before DATA waits
_SELF_DEPENDENT = 0x100  # internal flag bit (frame flags are 8 bits)


@dataclass(frozen=True, slots=True)
class Limits:
    """What this side advertises and tolerates. Every bound here caps memory or work per peer."""

    max_concurrent_streams: int = 1000
    initial_window: int = 1 << 20  # per-stream receive window: bytes buffered per stream at most
    connection_window: int = 8 << 20  # per-connection receive window (credited on receipt, see credit())
    connection_buffer: int = 16 << 20  # bytes of one connection held in the proxy before it stops crediting
    max_frame_size: int = F.DEFAULT_MAX_FRAME
    max_header_list_size: int = 64 << 10
    header_table_size: int = 4096
    max_continuations: int = 32  # CONTINUATION flood: frames per header block
    control_frame_budget: int = 2000  # SETTINGS/PING/etc. frames tolerated between two useful frames
    reset_burst: float = 1000.0  # rapid reset: peer-initiated resets allowed in a burst...
    reset_rate: float = 500.0  # ...refilled at this rate per second
    max_pending_writes: int = 4 << 20  # peer not reading our control replies: close past this
    keepalive_interval: float = 30.0  # client role: PING an idle connection this often (0: never)
    keepalive_timeout: float = 10.0
    settings_timeout: float = 10.0


class ConnectionHandler(Protocol[L, C]):
    """The codec's events, the owner's to handle (the relay's, in the proxy): the connection calls these in
    the event loop, synchronously, and learns nothing else about what the owner does."""

    def on_request(self, conn: Connection[L, C], stream: Stream[L, C], headers: Headers, end_stream: bool) -> None: ...
    def on_headers(self, stream: Stream[L, C], headers: Headers, end_stream: bool) -> None: ...
    def on_data(self, stream: Stream[L, C], data: bytes, end_stream: bool, flow: int) -> None:
        """DATA on `stream` (padding removed). The handler forwards or keeps it, then gives `flow` (the
        frame's flow-controlled length) back with `stream.conn.credit(stream, flow)` once it has left."""
        ...
    def on_reset(self, stream: Stream[L, C], code: int) -> None: ...
    def on_closed(self, stream: Stream[L, C]) -> None: ...
    def on_refused(self, stream: Stream[L, C]) -> None:
        """Client role: `stream` was never processed by the peer (connect failed, or past its GOAWAY)."""
        ...
    def on_connection_made(self, conn: Connection[L, C]) -> None: ...
    def on_connection_lost(self, conn: Connection[L, C]) -> None: ...


class _Flushable(Protocol):
    """What the Flusher writes out: a connection of any owner."""

    def _flush(self) -> None: ...
    def _flush_failed(self) -> None: ...


class Flusher:
    """Coalesces every write of one event-loop turn into one `transport.write` per connection.

    A relayed unary call writes HEADERS, DATA and trailers to a connection within one turn; joining them
    saves syscalls, which dominate the cost of a small call.
    """

    __slots__ = ("_dirty", "_loop", "_scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[_Flushable] = []
        self._scheduled = False

    def mark(self, conn: _Flushable) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn._flush()
            except Exception:  # one broken connection must not silence the others
                conn._flush_failed()


class Stream(Generic[L, C]):
    """One stream on one connection. `peer` (the stream it is relayed to) and `call` are the owner's."""

    __slots__ = (
        "call",
        "conn",
        "got_headers",
        "id",
        "local_closed",
        "peer",
        "pending",
        "recv_window",
        "remaining",
        "remote_closed",
        "reset",
        "rst_after",
        "send_window",
        "sent_headers",
        "unacked",
    )

    def __init__(self, conn: Connection[L, C], stream_id: int = 0) -> None:
        self.id = stream_id
        self.conn = conn
        self.peer: Stream[L, C] | None = None
        self.call: C | None = None
        self.send_window = conn.peer_initial_window
        self.recv_window = conn.limits.initial_window
        self.unacked = 0
        # Items waiting for send window, a paused transport, or (client role) the stream to be opened:
        # (headers, end) or (data, end, source stream, credit).
        self.pending: deque[tuple[Headers, bool] | tuple[bytes, bool, Stream[L, C] | None, int]] | None = None
        self.local_closed = False
        self.remote_closed = False
        self.reset = False
        self.rst_after = -1  # RST_STREAM code to send once `pending` is written (-1: none)
        self.got_headers = False
        self.sent_headers = False
        # DATA bytes the peer's content-length still announces (-1: no content-length, or not checked).
        self.remaining = -1

    def __repr__(self) -> str:
        return f"<Stream {self.id} on {self.conn.name}>"


class ConnectionError_(Exception):
    """Raised inside frame handling to abort the connection with a GOAWAY code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class StreamError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Connection(asyncio.Protocol, Generic[L, C]):
    """`link` is the owner's, given at construction; `on_lost`, if set, is called once the connection is gone."""

    def __init__(
        self,
        handler: ConnectionHandler[L, C],
        *,
        link: L,
        client: bool,
        flusher: Flusher,
        limits: Limits = Limits(),
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handler = handler
        self.client = client
        self.flusher = flusher
        self.limits = limits
        self.name = name
        self.clock = clock
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream[L, C]] = {}
        self.link = link
        self.on_lost: Callable[[Connection[L, C]], None] | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.draining = False  # no new streams: GOAWAY sent or received, or ids exhausted
        self.paused = False
        self._out: list[bytes] = []
        self._marked = False
        self._left = b""
        self._preface_seen = client  # a client reads no preface
        self._settings_seen = False
        self._encoder = Encoder()
        self._decoder = Decoder(limits.header_table_size, limits.max_header_list_size)
        # Peer's settings, RFC defaults until its SETTINGS arrive.
        self.peer_initial_window = F.DEFAULT_WINDOW
        self.peer_max_frame = F.DEFAULT_MAX_FRAME
        self.peer_max_concurrent = 1 << 31
        self.peer_max_header_list = 1 << 31
        self.send_window = F.DEFAULT_WINDOW
        self.recv_window = limits.connection_window
        self.recv_unacked = 0
        self.buffered = 0  # bytes received on this connection and not yet written elsewhere
        self.owed = 0  # connection-level credit held back while `buffered` is over the cap
        self._out_size = 0
        self._closing = False
        self.next_stream_id = 1
        self.last_peer_stream = 0
        self.goaway_last: int | None = None  # what we told the peer in our GOAWAY
        self._blocked: dict[Stream[L, C], None] = {}  # streams with pending items, in order
        self._waiting: deque[Stream[L, C]] = deque()  # client role: streams waiting for a concurrency slot
        self._recently_reset: deque[int] = deque(maxlen=1024)
        self._recently_reset_set: set[int] = set()
        # Server role: gaps (exclusive ranges) in the client's stream ids, never opened, so that HEADERS on
        # one is told apart from HEADERS on a closed stream (§5.1.1 vs §5.1). Bounded: older gaps count as
        # closed streams, a connection error either way.
        self._skipped: deque[tuple[int, int]] = deque(maxlen=64)
        self._cont_stream = 0  # stream whose header block continues, 0: none
        self._cont_parts: list[bytes] = []
        self._cont_flags = 0
        self._cont_count = 0
        self._control_budget = limits.control_frame_budget
        self._reset_tokens = limits.reset_burst
        self._reset_stamp = 0.0
        self._ping_outstanding: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.received_at = 0.0  # when the bytes being handled arrived (deadlines, keepalive)
        self._settings_acked = False
        self._settings_sent_at = 0.0
        self._our_settings = b""

    # ---- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop transports are not asyncio subclasses
        if self.closed:
            # Closed (drained, or its only call cancelled) while still dialling: hang up at once.
            transport.close()
            return
        self.transport = transport
        lim = self.limits
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        settings = {
            F.SETTINGS_ENABLE_PUSH: 0,
            F.SETTINGS_INITIAL_WINDOW_SIZE: lim.initial_window,
            F.SETTINGS_MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        }
        if not self.client:
            settings[F.SETTINGS_MAX_CONCURRENT_STREAMS] = lim.max_concurrent_streams
        if lim.max_frame_size != F.DEFAULT_MAX_FRAME:
            settings[F.SETTINGS_MAX_FRAME_SIZE] = lim.max_frame_size
        self._our_settings = F.settings(settings) + F.window_update(0, lim.connection_window - F.DEFAULT_WINDOW)
        if self.client:
            self._write(F.PREFACE + self._our_settings)
        # A server sends its SETTINGS once the client's preface checks out, so that an HTTP/1.1 client
        # gets a plain HTTP/1.1 answer and garbage gets a lone GOAWAY.
        now = self.clock()
        self.received_at = self._settings_sent_at = now
        self._arm_timer()
        self.handler.on_connection_made(self)
        if self.closed:
            return
        if self.client:
            if not self.ready.done():
                self.ready.set_result(None)
            self._start_waiting()
        if self._left:
            self.data_received(b"")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.draining = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionResetError("connection closed"))
            self.ready.exception()  # retrieved: nobody may be waiting
        streams = list(self.streams.values()) + list(self._waiting)
        self.streams.clear()
        self._waiting.clear()
        self._blocked.clear()
        for s in streams:
            if s.reset:
                continue
            if not s.id and s.pending:
                # Never reached the wire (we could not connect): the relay may place it elsewhere.
                self.handler.on_refused(s)
                continue
            s.reset = True
            self.release_pending(s)
            self.handler.on_reset(s, F.INTERNAL_ERROR)
            self.handler.on_closed(s)
        self.handler.on_connection_lost(self)
        self._out.clear()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._flush_blocked()

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # ---- writing ------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        self._out_size += len(data)
        if not self._marked:
            self._marked = True
            self.flusher.mark(self)

    def _flush(self) -> None:
        self._marked = False
        out = self._out
        if not out:
            return
        self._out_size = 0
        t = self.transport
        if t is None or self.closed:
            out.clear()
            return
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        t.write(data)
        if self._closing:
            return
        if t.get_write_buffer_size() > self.limits.max_pending_writes:
            # DATA is held back at the high-water mark, so only control replies and headers get here:
            # the peer is not reading even those (PING/SETTINGS floods). Give up on it.
            self._abort(F.ENHANCE_YOUR_CALM, "peer is not reading")
        elif self._blocked and not self.paused:
            self._flush_blocked()  # the socket took it: keep going, a high-water mark at a time

    def _flush_failed(self) -> None:
        log.exception("flush failed conn=%s", self.name)
        self._marked = False
        if self.transport is not None:
            self.transport.abort()

    def _congested(self) -> bool:
        """Hold DATA back: the transport said so, or this turn already queued a high-water mark's worth."""
        return self.paused or self._out_size >= WRITE_HIGH_WATER

    def close(self, code: int = F.NO_ERROR, message: str = "") -> None:
        """Immediate close with GOAWAY."""
        if self.closed or self._closing:
            return
        self._closing = True
        self._write(F.goaway(self.last_peer_stream, code, message.encode()[:256]))
        self._flush()
        self.closed = True
        self.draining = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self, code: int, message: str) -> None:
        log.info("h2 connection error conn=%s code=%s reason=%r", self.name, F.ERROR_NAMES.get(code, code), message)
        self.close(code, message)

    def drain(self) -> None:
        """Graceful shutdown: no new streams; open ones finish; the connection closes when idle."""
        if self.draining and self.goaway_last is not None:
            return
        self.draining = True
        if not self.client:
            self.goaway_last = self.last_peer_stream
            self._write(F.goaway(self.last_peer_stream, F.NO_ERROR))
        else:
            self._write(F.goaway(0, F.NO_ERROR))
            self.goaway_last = 0
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.draining and not self.streams and not self._waiting and not self.closed:
            self._flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # ---- timers: keepalive, settings timeout ------------------------------------------------------------

    def _arm_timer(self) -> None:
        interval = self.limits.keepalive_interval if self.client else 0.0
        delay = min(x for x in (interval, self.limits.settings_timeout) if x > 0) if (interval or not self._settings_acked) else 0
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        now = self.clock()
        lim = self.limits
        if not self._settings_acked and now - self._settings_sent_at >= lim.settings_timeout:
            self._abort(F.SETTINGS_TIMEOUT, "SETTINGS not acknowledged")
            return
        if self.client and lim.keepalive_interval > 0:
            if self._ping_outstanding is not None:
                self._abort(F.NO_ERROR, "keepalive PING not answered")
                return
            if now - self.received_at >= lim.keepalive_interval:
                self._ping_outstanding = b"kuberpc!"
                self._write(F.ping(self._ping_outstanding))
        self._arm_timer()

    # ---- reading ------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            # start_tls may hand us bytes before we are given the transport: keep them for connection_made.
            self._left += data
            return
        if self._left:
            data = self._left + data
            self._left = b""
        if not self._preface_seen:
            if len(data) < 24:
                if F.PREFACE.startswith(data):
                    self._left = data
                    return
            elif data.startswith(F.PREFACE):
                self._preface_seen = True
                self._write(self._our_settings)
                data = data[24:]
            if not self._preface_seen:
                self._reject_non_h2(data)
                return
        self.received_at = self.clock()
        n = len(data)
        pos = 0
        max_frame = self.limits.max_frame_size
        try:
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = _unpack_header(data, pos)
                length = (hi << 16) | lo
                if length > max_frame:
                    raise ConnectionError_(F.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_frame}")
                end = pos + 9 + length
                if end > n:
                    break
                payload = data[pos + 9 : end]
                pos = end
                sid &= 0x7FFFFFFF
                if self._cont_stream and ftype != F.CONTINUATION:
                    raise ConnectionError_(F.PROTOCOL_ERROR, "expected CONTINUATION")
                if not self._settings_seen and ftype != F.SETTINGS:
                    raise ConnectionError_(F.PROTOCOL_ERROR, "first frame must be SETTINGS")
                try:
                    if ftype == _DATA:
                        self._on_data(sid, flags, payload)
                    elif ftype == _HEADERS:
                        self._on_headers_frame(sid, flags, payload)
                    elif ftype == _WINDOW_UPDATE:
                        self._on_window_update(sid, payload)
                    elif ftype == F.SETTINGS:
                        self._on_settings(sid, flags, payload)
                    elif ftype == F.RST_STREAM:
                        self._on_rst(sid, payload)
                    elif ftype == F.PING:
                        self._on_ping(sid, flags, payload)
                    elif ftype == F.GOAWAY:
                        self._on_goaway(sid, payload)
                    elif ftype == F.CONTINUATION:
                        self._on_continuation(sid, flags, payload)
                    elif ftype == F.PRIORITY:
                        self._on_priority(sid, payload)
                    elif ftype == F.PUSH_PROMISE:
                        raise ConnectionError_(F.PROTOCOL_ERROR, "PUSH_PROMISE is disabled")
                    else:
                        self._spend_control()  # unknown types are ignored (§5.5), but not for free
                except StreamError as e:
                    self._stream_error(sid, e.code)
                if self.closed:
                    return
        except ConnectionError_ as e:
            self._abort(e.code, str(e))
            return
        except Exception as e:  # a bug must cost one connection, cleanly, never the process's loop
            log.exception("internal error handling a frame conn=%s", self.name)
            self._abort(F.INTERNAL_ERROR, f"internal error: {type(e).__name__}")
            return
        if pos < n:
            self._left = data[pos:]

    def _reject_non_h2(self, data: bytes) -> None:
        if data[:4] in (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC"):
            body = b"this port speaks HTTP/2 (gRPC) only\n"
            self._write(
                b"HTTP/1.1 505 HTTP Version Not Supported\r\nconnection: close\r\ncontent-type: text/plain\r\n"
                + b"content-length: %d\r\n\r\n" % len(body)
                + body
            )
            self._flush()
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self._abort(F.PROTOCOL_ERROR, "invalid connection preface")

    def _spend_control(self) -> None:
        self._control_budget -= 1
        if self._control_budget < 0:
            raise ConnectionError_(F.ENHANCE_YOUR_CALM, "too many control frames")

    def _stream_error(self, sid: int, code: int) -> None:
        s = self.streams.get(sid)
        if s is not None:
            self.handler.on_reset(s, code)
            self.reset_stream(s, code)
        elif self._idle(sid):
            # RST_STREAM must not be sent on an idle stream (§6.4): the error is the connection's.
            raise ConnectionError_(code, f"stream error on idle stream {sid}")
        else:
            self._write(F.rst_stream(sid, code))
            self._remember_reset(sid)

    def _idle(self, sid: int) -> bool:
        """Never opened: beyond the peer's last stream (or ours), or of the parity only pushes would use."""
        if self.client:
            return not sid & 1 or sid >= self.next_stream_id
        return not sid & 1 or sid > self.last_peer_stream

    def _remember_reset(self, sid: int) -> None:
        if len(self._recently_reset) == self._recently_reset.maxlen:
            self._recently_reset_set.discard(self._recently_reset[0])
        self._recently_reset.append(sid)
        self._recently_reset_set.add(sid)

    def _closed_stream_frame(self, sid: int, ftype: int) -> None:
        """A frame for a stream we no longer track (§5.1)."""
        if sid in self._recently_reset_set:
            return  # in flight when we reset it: ignore
        idle = sid > (self.last_peer_stream if not self.client else self.next_stream_id - 2)
        if idle:
            raise ConnectionError_(F.PROTOCOL_ERROR, f"frame type {ftype} on idle stream {sid}")
        if ftype in (_DATA, _HEADERS, F.CONTINUATION):
            # Closed, possibly long ago: a stream error costs no other call on this connection.
            raise StreamError(F.STREAM_CLOSED, f"frame type {ftype} on closed stream {sid}")

    def _on_data(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "DATA on stream 0")
        flen = len(payload)
        self._control_budget = self.limits.control_frame_budget
        self.recv_window -= flen
        if self.recv_window < 0:
            raise ConnectionError_(F.FLOW_CONTROL_ERROR, "connection receive window exceeded")
        s = self.streams.get(sid)
        if s is None or s.remote_closed or not s.got_headers:
            self._credit_connection(flen)
            if s is None:
                self._closed_stream_frame(sid, _DATA)
                return
            if not s.got_headers:
                raise StreamError(F.PROTOCOL_ERROR, "DATA before HEADERS")
            raise StreamError(F.STREAM_CLOSED, "DATA after END_STREAM")
        if flags & F.FLAG_PADDED:
            if flen == 0 or payload[0] >= flen:
                raise ConnectionError_(F.PROTOCOL_ERROR, "invalid DATA padding")
            payload = payload[1 : flen - payload[0]]
        s.recv_window -= flen
        if s.recv_window < 0:
            self._credit_connection(flen)
            raise StreamError(F.FLOW_CONTROL_ERROR, "stream receive window exceeded")
        if s.remaining >= 0:
            s.remaining -= len(payload)
            if s.remaining < 0 or (flags & F.FLAG_END_STREAM and s.remaining):
                self._credit_connection(flen)
                raise StreamError(F.PROTOCOL_ERROR, "DATA does not add up to content-length (§8.1.1)")
        # Connection-level credit goes back on receipt, so one slow stream cannot stall the others
        # (stream windows hold each sender back); past the buffer cap it waits for bytes to drain.
        self.buffered += flen
        if self.buffered <= self.limits.connection_buffer:
            # _credit_connection, inline: this runs for every DATA frame.
            self.recv_unacked += flen
            if self.recv_unacked >= self.limits.connection_window >> 2:
                self._credit_connection(0)
        else:
            self.owed += flen
        end = bool(flags & F.FLAG_END_STREAM)
        if end:
            s.remote_closed = True
        self.handler.on_data(s, payload, end, flen)
        if end:
            self._maybe_forget(s)

    def _on_headers_frame(self, sid: int, flags: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "HEADERS on stream 0")
        self._control_budget = self.limits.control_frame_budget
        pos, end = 0, len(payload)
        if flags & F.FLAG_PADDED:
            if end == 0:
                raise ConnectionError_(F.PROTOCOL_ERROR, "invalid HEADERS padding")
            pad = payload[0]
            pos = 1
            end -= pad
        self_dependent = False
        if flags & F.FLAG_PRIORITY:
            if pos + 5 > end:
                raise ConnectionError_(F.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            self_dependent = F.u32(payload, pos) & 0x7FFFFFFF == sid
            pos += 5
        if pos > end:
            raise ConnectionError_(F.PROTOCOL_ERROR, "HEADERS padding exceeds payload")
        if self_dependent:
            flags |= _SELF_DEPENDENT  # a stream error, raised once the block is decoded (HPACK stays in sync)
        block = payload[pos:end] if (pos or end != len(payload)) else payload
        if flags & F.FLAG_END_HEADERS:
            self._on_header_block(sid, flags, block)
        else:
            self._cont_stream = sid
            self._cont_parts = [block]
            self._cont_flags = flags
            self._cont_count = 0

    def _on_continuation(self, sid: int, flags: int, payload: bytes) -> None:
        if not self._cont_stream or sid != self._cont_stream:
            raise ConnectionError_(F.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._cont_parts.append(payload)
        self._cont_count += 1
        size = sum(len(p) for p in self._cont_parts)
        if self._cont_count > self.limits.max_continuations or size > 2 * self.limits.max_header_list_size:
            raise ConnectionError_(F.ENHANCE_YOUR_CALM, "header block too large (CONTINUATION flood)")
        if flags & F.FLAG_END_HEADERS:
            block = b"".join(self._cont_parts)
            self._cont_stream = 0
            self._cont_parts = []
            self._on_header_block(sid, self._cont_flags, block)

    def _on_header_block(self, sid: int, flags: int, block: bytes) -> None:
        too_large = False
        try:
            headers = self._decoder.decode(block)
        except HeaderListTooLarge:
            too_large = True
            headers = []
        except HPACKError as e:
            raise ConnectionError_(F.COMPRESSION_ERROR, f"header block: {e}") from e
        if flags & _SELF_DEPENDENT:
            raise StreamError(F.PROTOCOL_ERROR, "stream depends on itself")
        end = bool(flags & F.FLAG_END_STREAM)
        s = self.streams.get(sid)
        if s is None:
            if self.client or sid <= self.last_peer_stream or not sid & 1:
                if sid & 1 == 0 and not self.client:
                    raise ConnectionError_(F.PROTOCOL_ERROR, f"even stream id {sid} from a client")
                if not self.client and sid not in self._recently_reset_set:
                    if any(lo < sid < hi for lo, hi in self._skipped):
                        raise ConnectionError_(F.PROTOCOL_ERROR, f"stream id {sid} lower than one already opened")
                    raise ConnectionError_(F.STREAM_CLOSED, f"HEADERS on closed stream {sid}")
                self._closed_stream_frame(sid, _HEADERS)
                return
            if sid - self.last_peer_stream > 2:
                self._skipped.append((self.last_peer_stream, sid))
            self.last_peer_stream = sid
            if self.goaway_last is not None and sid > self.goaway_last:
                self._write(F.rst_stream(sid, F.REFUSED_STREAM))
                self._remember_reset(sid)
                return
            if len(self.streams) >= self.limits.max_concurrent_streams:
                self._write(F.rst_stream(sid, F.REFUSED_STREAM))
                self._remember_reset(sid)
                return
            s = Stream(self, sid)
            self.streams[sid] = s
            s.got_headers = True
            if end:
                s.remote_closed = True
            if too_large:
                self._write(F.headers_frames(sid, self._encoder.encode([(b":status", b"431")]), True, self.peer_max_frame))
                s.local_closed = True
                s.sent_headers = True
                self._maybe_forget(s)
                return
            try:
                length = check_request(headers)
            except Malformed as e:
                raise StreamError(F.PROTOCOL_ERROR, f"malformed request: {e}") from None
            if end and length > 0:
                raise StreamError(F.PROTOCOL_ERROR, "malformed request: content-length but no DATA")
            s.remaining = length
            self.handler.on_request(self, s, headers, end)
            return
        if s.remote_closed:
            raise StreamError(F.STREAM_CLOSED, "HEADERS after END_STREAM")
        if too_large:
            raise StreamError(F.PROTOCOL_ERROR, "header list too large")
        try:
            if s.got_headers:
                if not end:
                    raise StreamError(F.PROTOCOL_ERROR, "trailers without END_STREAM")
                check_trailers(headers)
                if s.remaining > 0:
                    raise Malformed("less DATA than content-length")
            else:  # client role: the response
                status = headers[0][1] if headers and headers[0][0] == b":status" else None
                if status is None:
                    raise StreamError(F.PROTOCOL_ERROR, "response without :status first")
                if status[:1] == b"1" and not end:
                    return  # informational (1xx): not part of a gRPC response, not forwarded
                length = check_response(headers)
                # A response to HEAD, or a 304, announces a length it does not carry (§8.1.1).
                if s.remaining == -1 and status != b"304":
                    if end and length > 0:
                        raise Malformed("content-length but no DATA")
                    s.remaining = length
        except Malformed as e:
            raise StreamError(F.PROTOCOL_ERROR, f"malformed {'trailers' if s.got_headers else 'response'}: {e}") from None
        s.got_headers = True
        if end:
            s.remote_closed = True
        self.handler.on_headers(s, headers, end)
        if end:
            self._maybe_forget(s)

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(F.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = F.u32(payload) & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise ConnectionError_(F.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > F.MAX_WINDOW:
                raise ConnectionError_(F.FLOW_CONTROL_ERROR, "connection send window overflow")
            self._spend_control()
            if self._blocked:
                self._flush_blocked()
            return
        s = self.streams.get(sid)
        if s is None:
            if sid not in self._recently_reset_set:
                idle = sid > (self.last_peer_stream if not self.client else self.next_stream_id - 2)
                if idle:
                    raise ConnectionError_(F.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if inc == 0:
            raise StreamError(F.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        s.send_window += inc
        if s.send_window > F.MAX_WINDOW:
            raise StreamError(F.FLOW_CONTROL_ERROR, "stream send window overflow")
        if s.pending:
            self._flush_stream(s)

    def _on_settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & F.FLAG_ACK:
            if payload:
                raise ConnectionError_(F.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            self._settings_acked = True
            return
        if len(payload) % 6:
            raise ConnectionError_(F.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        self._spend_control()
        self._settings_seen = True
        for key, value in F.parse_settings(payload):
            if key == F.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > F.MAX_WINDOW:
                    raise ConnectionError_(F.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.send_window += delta
                    if s.send_window > F.MAX_WINDOW:
                        raise ConnectionError_(F.FLOW_CONTROL_ERROR, "stream window overflow")
                for s in self._waiting:
                    s.send_window = value
            elif key == F.SETTINGS_MAX_FRAME_SIZE:
                if not F.DEFAULT_MAX_FRAME <= value <= F.MAX_FRAME_LIMIT:
                    raise ConnectionError_(F.PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range")
                self.peer_max_frame = value
            elif key == F.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.set_max_table_size(min(value, 4096 * 4))
            elif key == F.SETTINGS_MAX_CONCURRENT_STREAMS:
                self.peer_max_concurrent = value
            elif key == F.SETTINGS_ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client):
                    raise ConnectionError_(F.PROTOCOL_ERROR, "invalid ENABLE_PUSH")
            elif key == F.SETTINGS_MAX_HEADER_LIST_SIZE:
                self.peer_max_header_list = value
        self._write(F.SETTINGS_ACK)
        if not self.client and not self.ready.done():
            self.ready.set_result(None)
        if self._blocked:
            self._flush_blocked()
        self._start_waiting()

    def _on_rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(F.FRAME_SIZE_ERROR, "RST_STREAM length")
        if sid == 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        s = self.streams.get(sid)
        if s is None:
            if sid not in self._recently_reset_set:
                self._closed_stream_frame(sid, F.RST_STREAM)
            return
        if not self.client:
            # Rapid reset (CVE-2023-44487): streams cost us an upstream stream each; bound the churn.
            now = self.clock()
            lim = self.limits
            self._reset_tokens = min(lim.reset_burst, self._reset_tokens + (now - self._reset_stamp) * lim.reset_rate)
            self._reset_stamp = now
            self._reset_tokens -= 1
            if self._reset_tokens < 0:
                raise ConnectionError_(F.ENHANCE_YOUR_CALM, "too many stream resets")
        code = F.u32(payload)
        self._drop(s)
        self.handler.on_reset(s, code)
        self.handler.on_closed(s)
        self._after_close()

    def _on_ping(self, sid: int, flags: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            raise ConnectionError_(F.FRAME_SIZE_ERROR, "PING length")
        if flags & F.FLAG_ACK:
            if payload == self._ping_outstanding:
                self._ping_outstanding = None
            return
        self._spend_control()
        self._write(F.ping(payload, ack=True))

    def _on_goaway(self, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            raise ConnectionError_(F.FRAME_SIZE_ERROR, "GOAWAY length")
        last = F.u32(payload) & 0x7FFFFFFF
        code = F.u32(payload, 4)
        log.debug("goaway received conn=%s last=%d code=%s", self.name, last, F.ERROR_NAMES.get(code, code))
        self.draining = True
        if self.client:
            # Streams the peer never saw may be retried elsewhere: hand them back to the relay.
            refused = [s for s in self.streams.values() if s.id > last] + list(self._waiting)
            self._waiting.clear()
            for s in refused:
                if s.id:
                    self._drop(s)
                s.reset = True
                self.handler.on_refused(s)
            self._close_if_idle()
        # A server leaves the closing to the client that said GOAWAY: closing first, with the client's next
        # frames (a PING, say) unread, makes the kernel answer them with a RST instead of an orderly close.

    def _on_priority(self, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ConnectionError_(F.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise StreamError(F.FRAME_SIZE_ERROR, "PRIORITY length")
        self._spend_control()
        if F.u32(payload) & 0x7FFFFFFF == sid:
            raise StreamError(F.PROTOCOL_ERROR, "stream depends on itself")

    # ---- flow control ---------------------------------------------------------------------------------

    def _credit_connection(self, n: int) -> None:
        self.recv_unacked += n
        if self.recv_unacked >= self.limits.connection_window >> 2:
            self._write(F.window_update(0, self.recv_unacked))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0

    def credit(self, s: Stream[L, C], n: int) -> None:
        """`n` bytes received on `s` have left the proxy: let the peer send that much more on `s`."""
        if self.closed:
            return
        self.buffered -= n
        if self.owed and self.buffered <= self.limits.connection_buffer:
            owed, self.owed = self.owed, 0
            self._credit_connection(owed)
        if s.remote_closed or s.reset:
            return
        s.unacked += n
        if s.unacked >= self.limits.initial_window >> 2:
            self._write(F.window_update(s.id, s.unacked))
            s.recv_window += s.unacked
            s.unacked = 0

    def send_data(self, s: Stream[L, C], data: bytes, end: bool, src: Stream[L, C] | None, credit: int) -> None:
        """Relay a DATA payload onto `s`; credit the source once it is on the wire."""
        n = len(data)
        if s.reset or s.local_closed:
            if src is not None:
                src.conn.credit(src, credit)
            return
        if (
            s.pending is None and s.id and not self.paused and self._out_size < WRITE_HIGH_WATER  # not _congested()
            and n <= s.send_window and n <= self.send_window
        ):
            if n < 4096:
                # The common small message: _write, inline, since this runs for every DATA frame relayed.
                s.send_window -= n
                self.send_window -= n
                self._out.append(_HEADER.pack(n >> 16, n & 0xFFFF, _DATA, 1 if end else 0, s.id) + data)
                self._out_size += n + 9
                if not self._marked:
                    self._marked = True
                    self.flusher.mark(self)
                if src is not None:
                    src.conn.credit(src, credit)
                if end:
                    s.local_closed = True
                    self._maybe_forget(s)
                return
            if n <= self.peer_max_frame:
                s.send_window -= n
                self.send_window -= n
                self._write(_HEADER.pack(n >> 16, n & 0xFFFF, _DATA, 1 if end else 0, s.id))
                self._write(data)
                if src is not None:
                    src.conn.credit(src, credit)
                if end:
                    s.local_closed = True
                    self._maybe_forget(s)
                return
        if s.pending is None:
            s.pending = deque()
        s.pending.append((data, end, src, credit))
        if s.id:
            self._flush_stream(s)

    def send_headers(self, s: Stream[L, C], headers: Headers, end: bool) -> None:
        """Send response headers or trailers (or, client role, request headers of an opened stream)."""
        if s.reset or s.local_closed:
            return
        if s.pending is not None or not s.id:
            if s.pending is None:
                s.pending = deque()
            s.pending.append((headers, end))
            if s.id:
                self._flush_stream(s)
            return
        self._write_headers(s, headers, end)

    def _write_headers(self, s: Stream[L, C], headers: Headers, end: bool) -> None:
        block = self._encoder.encode(headers)
        self._write(F.headers_frames(s.id, block, end, self.peer_max_frame))
        s.sent_headers = True
        if end:
            s.local_closed = True
            self._maybe_forget(s)

    def _flush_stream(self, s: Stream[L, C]) -> None:
        pending = s.pending
        assert pending is not None
        while pending:
            item = pending[0]
            if len(item) == 2:
                pending.popleft()
                self._write_headers(s, item[0], item[1])
                continue
            if self._congested():
                break
            data, end, src, credit = item
            n = len(data)
            avail = min(s.send_window, self.send_window, self.peer_max_frame)
            if n <= avail:
                pending.popleft()
                s.send_window -= n
                self.send_window -= n
                self._write(F.frame_header(_DATA, 1 if end else 0, s.id, n) + data)
                if src is not None:
                    src.conn.credit(src, credit)
                if end:
                    s.local_closed = True
                continue
            if avail <= 0:
                break
            s.send_window -= avail
            self.send_window -= avail
            self._write(F.frame_header(_DATA, 0, s.id, avail) + data[:avail])
            pending[0] = (data[avail:], end, src, credit)
        if pending:
            self._blocked[s] = None
        else:
            s.pending = None
            self._blocked.pop(s, None)
            if s.rst_after >= 0:
                self.reset_stream(s, s.rst_after)
            elif s.local_closed:
                self._maybe_forget(s)

    def _flush_blocked(self) -> None:
        for s in list(self._blocked):
            if self._congested() or self.send_window <= 0:
                break
            if s.pending:
                self._flush_stream(s)
            else:
                self._blocked.pop(s, None)

    # ---- stream lifecycle ------------------------------------------------------------------------------

    def open_stream(self, s: Stream[L, C], headers: Headers, end: bool) -> bool:
        """Client role: start a request on this connection. False: this connection takes no new streams."""
        if self.draining or self.closed or self.next_stream_id > F.MAX_STREAM_ID:
            return False
        s.send_window = self.peer_initial_window
        if (b":method", b"HEAD") in headers:
            s.remaining = -2  # its response's content-length announces DATA that never comes
        if s.pending is None:
            s.pending = deque()
        s.pending.appendleft((headers, end))
        if self.transport is None or len(self.streams) >= self.peer_max_concurrent:
            self._waiting.append(s)
        else:
            self._activate(s)
        return True

    def take_unsent(self, s: Stream[L, C]) -> tuple[Headers, bool] | None:
        """Client role: the request headers of `s` if it never reached the wire (refused before it opened),
        taken back so that the owner may open it again; what it queued after them (DATA) stays queued."""
        pending = s.pending
        if s.id or not pending:
            return None
        first = pending[0]
        if len(first) != 2:
            return None
        pending.popleft()
        s.reset = False
        return first

    def _activate(self, s: Stream[L, C]) -> None:
        s.id = self.next_stream_id
        self.next_stream_id += 2
        self.streams[s.id] = s
        self._flush_stream(s)
        if self.next_stream_id > F.MAX_STREAM_ID:
            self.draining = True  # stream ids exhausted: finish these, then the pool opens a new connection

    def _start_waiting(self) -> None:
        while self._waiting and len(self.streams) < self.peer_max_concurrent and not self.closed:
            s = self._waiting.popleft()
            if not s.reset:
                self._activate(s)

    def reset_after_flush(self, s: Stream[L, C], code: int) -> None:
        """RST_STREAM once what is queued on `s` (e.g. its trailers) is written, not instead of it."""
        if s.pending and not s.reset:
            s.rst_after = code
            return
        self.reset_stream(s, code)

    def reset_stream(self, s: Stream[L, C], code: int) -> None:
        """Abort a stream locally (RST_STREAM to the peer); the handler is told it is closed."""
        if s.reset:
            return
        if s.id and s.id in self.streams:
            self._write(F.rst_stream(s.id, code))
            self._remember_reset(s.id)
            self._drop(s)
        else:
            s.reset = True
            try:
                self._waiting.remove(s)
            except ValueError:
                pass
            self.release_pending(s)
        self.handler.on_closed(s)
        self._after_close()

    def _drop(self, s: Stream[L, C]) -> None:
        s.reset = True
        self.streams.pop(s.id, None)
        self._blocked.pop(s, None)
        self.release_pending(s)

    def release_pending(self, s: Stream[L, C]) -> None:
        """Drop what is queued on `s` and credit the sources of its DATA (their bytes will never be sent)."""
        pending, s.pending = s.pending, None
        if pending:
            for item in pending:
                if len(item) == 4 and item[2] is not None:
                    item[2].conn.credit(item[2], item[3])

    def _maybe_forget(self, s: Stream[L, C]) -> None:
        if s.local_closed and s.remote_closed and not s.pending and s.id in self.streams:
            del self.streams[s.id]
            self._blocked.pop(s, None)
            self.handler.on_closed(s)
            self._after_close()

    def _after_close(self) -> None:
        if self._waiting:
            self._start_waiting()
        if self.draining:
            self._close_if_idle()

    # ---- introspection ---------------------------------------------------------------------------------

    def debug(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": "client" if self.client else "server",
            "streams": len(self.streams),
            "waiting": len(self._waiting),
            "draining": self.draining,
            "send_window": self.send_window,
            "peer_max_concurrent": self.peer_max_concurrent,
        }
