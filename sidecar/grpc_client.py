"""gRPC calls over TLS made with the proxy's own HTTP/2 Connection, each on a connection opened for it: one
unary call (certificates), and one long-lived bidirectional stream (discovery, see BidiCall).

Must not import grpc (the proxy image ships without it), keep a connection after its call, nor read the
messages it carries: it moves bytes and reports the call's status.
"""

from __future__ import annotations

import asyncio
import collections
import math
import ssl
import struct
import urllib.parse

from sidecar.config import Address
from sidecar.h2 import frames as F
from sidecar.h2.connection import Connection, Flusher, Headers, Limits, Stream
from sidecar.status import Status

_KNOWN_CODES = frozenset(Status)

# gRPC over HTTP/2, "Errors": a stream reset by the server, as a status.
_RESET_STATUS: dict[int, Status] = {
    F.REFUSED_STREAM: Status.UNAVAILABLE,
    F.CANCEL: Status.CANCELLED,
    F.ENHANCE_YOUR_CALM: Status.RESOURCE_EXHAUSTED,
    F.INADEQUATE_SECURITY: Status.PERMISSION_DENIED,
}
# gRPC's "HTTP to gRPC status code mapping": an answer without grpc-status (from a proxy or a non-gRPC server).
_HTTP_STATUS: dict[bytes, Status] = {
    b"400": Status.INTERNAL,
    b"401": Status.UNAUTHENTICATED,
    b"403": Status.PERMISSION_DENIED,
    b"404": Status.UNIMPLEMENTED,
    b"429": Status.UNAVAILABLE,
    b"502": Status.UNAVAILABLE,
    b"503": Status.UNAVAILABLE,
    b"504": Status.UNAVAILABLE,
}
# A larger answer is refused (grpc's default receive limit is 4 MiB; what this proxy asks for is a few KiB).
MAX_RESPONSE = 1 << 20
# After the call, the transport's TLS close waits this long for the server's close_notify, then drops the
# socket. Not awaited: the answer is the caller's as soon as it is read (grpc servers leave close_notify
# unanswered until the socket closes, which would delay every call by this much).
CLOSE_TIMEOUT = 1.0
_PREFIX = struct.Struct(">BL")  # gRPC message prefix: compressed flag, length
_LIMITS = Limits(keepalive_interval=0.0)  # one call, then closed: nothing to keep alive


class CallError(Exception):
    """The call did not return a message: `code` is the gRPC status name, `message` its grpc-message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


async def unary_call(
    address: Address,
    path: str,
    request: bytes,
    *,
    ssl_context: ssl.SSLContext,
    timeout: float,  # noqa: ASYNC109 - also sent as grpc-timeout, which an enclosing asyncio.timeout cannot tell
    max_response: int = MAX_RESPONSE,
) -> bytes:
    """Calls `path` (/package.Service/Method) at `address` with one serialized message; returns the answer's.

    TLS as `ssl_context` (see tls_context) says, with `address.host` as the server name; ALPN h2 required.
    The whole call, connecting included, has `timeout` seconds (sent as grpc-timeout too). Raises CallError
    for every outcome but a message with status OK; cancelling the caller resets the call and closes the
    connection.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout_at(deadline):
            transport, early = await _open(address, ssl_context)
            return await _exchange(transport, early, address, path, request, deadline, max_response)
    except TimeoutError:
        raise CallError("DEADLINE_EXCEEDED", f"no answer from {address} within {timeout:g} s") from None


def tls_context(trust_anchors_pem: bytes) -> ssl.SSLContext:
    """What a call needs of TLS: the server's chain verified to these anchors alone, its name to the host
    dialled, and ALPN h2 offered. ssl.SSLError or ValueError when the anchors are not PEM certificates."""
    ctx = ssl.create_default_context(cadata=trust_anchors_pem.decode("ascii"))
    ctx.set_alpn_protocols(["h2"])
    return ctx


class _Handshake(asyncio.Protocol):
    """The protocol of the transport until ALPN is checked: a server may send its SETTINGS as soon as the
    handshake ends, so what arrives is kept for the Connection (which accepts bytes before connection_made)."""

    def __init__(self) -> None:
        self.early = bytearray()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.early += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def _open(
    address: Address, ctx: ssl.SSLContext, *, dial: str | None = None
) -> tuple[asyncio.Transport, bytes]:
    """A TLS connection that negotiated h2, and the bytes already received on it. `dial`: the IP to connect
    to instead of resolving `address.host` (which stays the server name checked)."""
    loop = asyncio.get_running_loop()
    handshake = _Handshake()
    try:
        transport, _ = await loop.create_connection(
            lambda: handshake,
            dial or address.host,
            address.port,
            ssl=ctx,
            server_hostname=address.host,
            ssl_shutdown_timeout=CLOSE_TIMEOUT,
        )
    except ssl.SSLCertVerificationError as e:  # before OSError: SSLError is one
        raise CallError(
            "UNAVAILABLE", f"{address} presented an untrusted certificate: {e.verify_message}"
        ) from e
    except ssl.SSLError as e:
        raise CallError("UNAVAILABLE", f"TLS handshake with {address} failed: {e.reason or e}") from e
    except OSError as e:
        raise CallError("UNAVAILABLE", f"cannot connect to {address}: {e.strerror or e}") from e
    ssl_object = transport.get_extra_info("ssl_object")
    alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if alpn != "h2" or handshake.lost:
        transport.abort()
        if handshake.lost:
            raise CallError("UNAVAILABLE", f"{address} closed the connection after the TLS handshake")
        # gRPC needs HTTP/2, and HTTP/2 over TLS is only spoken once both sides agreed to it (RFC 9113 §3.2).
        raise CallError("UNAVAILABLE", f"{address} did not negotiate HTTP/2 (ALPN: {alpn or 'none'})")
    return transport, bytes(handshake.early)


class _CallHandler:
    """What both of this module's calls do with their connection's events: everything but a response's headers
    and DATA ends the call with the matching CallError, handed to `end`."""

    def __init__(self, address: Address) -> None:
        self.address = address

    def end(self, error: CallError) -> None:
        raise NotImplementedError

    def on_request(
        self, conn: Connection[None, None], stream: Stream[None, None], headers: Headers, end_stream: bool
    ) -> None:
        raise AssertionError("a client connection is not sent requests")  # pragma: no cover

    def on_reset(self, stream: Stream[None, None], code: int) -> None:
        if stream.conn.closed:
            self.end(CallError("UNAVAILABLE", f"the connection to {self.address} was lost during the call"))
            return
        name = F.ERROR_NAMES.get(code, str(code))
        self.end(CallError(_RESET_STATUS.get(code, Status.INTERNAL).name, f"the call was reset (RST_STREAM {name})"))

    def on_closed(self, stream: Stream[None, None]) -> None:
        self.end(CallError("INTERNAL", "the stream closed before the response ended"))

    def on_refused(self, stream: Stream[None, None]) -> None:
        self.end(CallError("UNAVAILABLE", f"{self.address} refused the call (GOAWAY)"))

    def on_connection_made(self, conn: Connection[None, None]) -> None:
        pass

    def on_connection_lost(self, conn: Connection[None, None]) -> None:
        self.end(CallError("UNAVAILABLE", f"the connection to {self.address} was lost during the call"))


class _Exchange(_CallHandler):
    """The ConnectionHandler of the call's connection: it keeps the response's headers, body and trailers."""

    def __init__(self, address: Address, max_response: int) -> None:
        super().__init__(address)
        self.max_response = max_response
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.headers: Headers | None = None
        self.trailers: Headers | None = None
        self.body = bytearray()

    def _finish(self, error: CallError | None = None) -> None:
        if self.done.done():
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)

    def end(self, error: CallError) -> None:
        self._finish(error)

    # ---- ConnectionHandler ----

    def on_headers(self, stream: Stream[None, None], headers: Headers, end_stream: bool) -> None:
        if self.headers is None:
            self.headers = headers
        else:
            self.trailers = headers
        if end_stream:
            self._finish()

    def on_data(self, stream: Stream[None, None], data: bytes, end_stream: bool, flow: int) -> None:
        stream.conn.credit(stream, flow)  # consumed at once: the server may send more
        if len(self.body) + len(data) > self.max_response:
            self._finish(CallError("RESOURCE_EXHAUSTED", f"response larger than {self.max_response} bytes"))
            return
        self.body += data
        if end_stream:
            self._finish()  # no trailers: the result says so


async def _exchange(
    transport: asyncio.Transport,
    early: bytes,
    address: Address,
    path: str,
    request: bytes,
    deadline: float,
    max_response: int,
) -> bytes:
    loop = asyncio.get_running_loop()
    exchange = _Exchange(address, max_response)
    conn = Connection(exchange, link=None, client=True, flusher=Flusher(loop), limits=_LIMITS, name=str(address))
    transport.set_protocol(conn)
    if early:
        conn.data_received(early)  # kept until connection_made, which reads it
    conn.connection_made(transport)
    stream = Stream(conn)
    try:
        headers: Headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", path.encode()),
            (b":authority", str(address).encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", _grpc_timeout(deadline - loop.time())),
        ]
        if not conn.open_stream(stream, headers, False):
            raise CallError("UNAVAILABLE", f"{address} closed the connection before the call")
        conn.send_data(stream, _PREFIX.pack(0, len(request)) + request, True, None, 0)
        try:
            await exchange.done
        except asyncio.CancelledError:
            conn.reset_stream(stream, F.CANCEL)  # before close() writes its GOAWAY
            raise
        return _result(exchange)
    finally:
        conn.close()  # GOAWAY, then the TLS close (see CLOSE_TIMEOUT)


def _result(exchange: _Exchange) -> bytes:
    headers = exchange.headers or []
    final = exchange.trailers if exchange.trailers is not None else headers
    status = _header(final, b"grpc-status")
    if status is None:
        http = _header(headers, b":status") or b""
        if http != b"200":
            raise CallError(
                _HTTP_STATUS.get(http, Status.UNKNOWN).name, f"HTTP status {http.decode('latin-1')} without grpc-status"
            )
        content_type = _header(headers, b"content-type") or b""
        if not content_type.startswith(b"application/grpc"):
            raise CallError(
                "UNKNOWN", f"not a gRPC response (content-type {content_type.decode('latin-1')!r})"
            )
        raise CallError("INTERNAL", "the response ended without trailers (no grpc-status)")
    code = int(status) if status.isdigit() and len(status) <= 2 else -1
    if code != 0:
        name = Status(code).name if code in _KNOWN_CODES else "UNKNOWN"
        raise CallError(name, _decode_message(_header(final, b"grpc-message") or b""))
    return _message(bytes(exchange.body))


def _message(body: bytes) -> bytes:
    """The one length-prefixed message of a unary response."""
    if not body:
        raise CallError("INTERNAL", "status OK without a response message")
    if len(body) < _PREFIX.size:
        raise CallError("INTERNAL", "truncated response message")
    compressed, length = _PREFIX.unpack_from(body)
    if compressed:
        raise CallError("INTERNAL", "compressed response message, but no compression was accepted")
    if len(body) != _PREFIX.size + length:
        raise CallError("INTERNAL", "response body is not exactly one message")
    return body[_PREFIX.size :]


def _header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _decode_message(value: bytes) -> str:
    """grpc-message is percent-encoded UTF-8; a bad escape is shown as received, never an error (gRPC spec)."""
    return urllib.parse.unquote(value.decode("latin-1"), encoding="utf-8", errors="replace")


def _grpc_timeout(seconds: float) -> bytes:
    """grpc-timeout in whole milliseconds, rounded up (at most 8 digits: ~27 h). Not relay.format_grpc_timeout:
    the relay is a layer above, and one unit is enough for a deadline of seconds."""
    return b"%dm" % min(max(math.ceil(seconds * 1000), 1), 99_999_999)


# ---- a long-lived bidirectional-streaming call (the discovery stream) -------------------------------------

# A larger message from the server fails the call (a snapshot of a Service with 10,000 endpoints is ~1 MiB).
MAX_STREAM_MESSAGE = 16 << 20
# The stream may stay quiet for hours: a connection that stopped answering (a replica gone without a RST,
# a black hole) is noticed by PINGs after this long without a byte from the server, closed when one goes
# unanswered for STREAM_KEEPALIVE_TIMEOUT. The control plane accepts a PING every 10 s on a quiet stream
# (webhook/discovery_service.py; grpc's default is one per 5 min) and pings every 30 s itself: any byte from
# it resets this timer, so the proxy's own PINGs go out only when the server has fallen silent.
STREAM_KEEPALIVE = 20.0
STREAM_KEEPALIVE_TIMEOUT = 10.0


class _StreamReceiver(_CallHandler):
    """The ConnectionHandler of a BidiCall's connection: splits the response body into gRPC messages, queued
    until `BidiCall.receive` takes them; the flow-control credit of what is queued is given back as it is taken."""

    def __init__(self, address: Address, max_message: int) -> None:
        super().__init__(address)
        self.max_message = max_message
        self.messages: collections.deque[bytes] = collections.deque()
        self.arrived = asyncio.Event()
        self.ended: CallError | None = None  # set once: the call is over (code OK: the server ended it)
        self.headers: Headers | None = None
        self._buf = bytearray()
        self._uncredited: list[tuple[Stream[None, None], int]] = []

    def end(self, error: CallError) -> None:
        if self.ended is None:
            self.ended = error
        self.arrived.set()

    def credit(self) -> None:
        """Let the server send as much again as what was taken from the queue (flow control)."""
        taken, self._uncredited = self._uncredited, []
        for stream, n in taken:
            stream.conn.credit(stream, n)

    # ---- ConnectionHandler ----

    def on_headers(self, stream: Stream[None, None], headers: Headers, end_stream: bool) -> None:
        first = self.headers is None
        if first:
            self.headers = headers
            http = _header(headers, b":status") or b""
            if http != b"200" and _header(headers, b"grpc-status") is None:
                mapped = _HTTP_STATUS.get(http, Status.UNKNOWN).name
                self.end(CallError(mapped, f"HTTP status {http.decode('latin-1')}"))
                return
        if not end_stream:
            return
        status = _header(headers, b"grpc-status")
        if status is None:
            self.end(CallError("INTERNAL", "the response ended without trailers (no grpc-status)"))
            return
        code = int(status) if status.isdigit() and len(status) <= 2 else -1
        name = Status(code).name if code in _KNOWN_CODES else "UNKNOWN"
        self.end(CallError(name, _decode_message(_header(headers, b"grpc-message") or b"") or "the server ended the call"))

    def on_data(self, stream: Stream[None, None], data: bytes, end_stream: bool, flow: int) -> None:
        self._uncredited.append((stream, flow))
        buf = self._buf
        buf += data
        while len(buf) >= _PREFIX.size:
            compressed, length = _PREFIX.unpack_from(buf)
            if compressed:
                self.end(CallError("INTERNAL", "compressed message, but no compression was accepted"))
                return
            if length > self.max_message:
                self.end(CallError("RESOURCE_EXHAUSTED", f"message larger than {self.max_message} bytes"))
                return
            if len(buf) < _PREFIX.size + length:
                break
            self.messages.append(bytes(buf[_PREFIX.size : _PREFIX.size + length]))
            del buf[: _PREFIX.size + length]
        if self.messages:
            self.arrived.set()
        else:
            self.credit()  # a message still incomplete: its bytes are held here, not by the queue
        if end_stream:
            self.end(CallError("INTERNAL", "the response ended without trailers (no grpc-status)"))


class BidiCall:
    """One bidirectional-streaming call on a connection of its own, open until `close()` or the server ends it.

    `send` queues a message (the connection writes it as flow control allows); `receive` waits for the next.
    """

    def __init__(self, conn: Connection[None, None], stream: Stream[None, None], receiver: _StreamReceiver) -> None:
        self._conn = conn
        self._stream = stream
        self._receiver = receiver
        self.peer: tuple[str, int] | None = None  # the address connected to (for logs and /debug)
        if conn.transport is not None:
            peer = conn.transport.get_extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                self.peer = (str(peer[0]), int(peer[1]))

    def send(self, message: bytes) -> None:
        """Queue one serialized message; CallError when the call is already over."""
        if self._receiver.ended is not None:
            raise self._receiver.ended
        self._conn.send_data(self._stream, _PREFIX.pack(0, len(message)) + message, False, None, 0)

    async def receive(self) -> bytes:
        """The next message; CallError when the call is over (code "OK": the server ended it normally)."""
        r = self._receiver
        while not r.messages:
            if r.ended is not None:
                raise r.ended
            r.arrived.clear()
            await r.arrived.wait()
        message = r.messages.popleft()
        if not r.messages:
            r.credit()
        return message

    def close(self) -> None:
        """Cancel the call (RST_STREAM CANCEL) and close its connection."""
        if not self._conn.closed:
            if not self._stream.reset and not self._stream.local_closed:
                self._conn.reset_stream(self._stream, F.CANCEL)
            self._conn.close()
        self._receiver.end(CallError("CANCELLED", "closed by the client"))


async def open_bidi(
    address: Address,
    path: str,
    *,
    ssl_context: ssl.SSLContext,
    connect_timeout: float,
    dial: str | None = None,
    max_message: int = MAX_STREAM_MESSAGE,
    keepalive: float = STREAM_KEEPALIVE,
) -> BidiCall:
    """Starts a bidirectional-streaming call of `path` at `address` (dialled at `dial`, an IP, when given; the
    server name checked is `address.host`). Connecting, TLS and HTTP/2 set-up have `connect_timeout` seconds;
    the call itself has no deadline. CallError (UNAVAILABLE, DEADLINE_EXCEEDED) when it cannot be started."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            transport, early = await _open(address, ssl_context, dial=dial)
    except TimeoutError:
        raise CallError("DEADLINE_EXCEEDED", f"cannot connect to {address} within {connect_timeout:g} s") from None
    receiver = _StreamReceiver(address, max_message)
    limits = Limits(keepalive_interval=keepalive, keepalive_timeout=STREAM_KEEPALIVE_TIMEOUT)
    conn = Connection(receiver, link=None, client=True, flusher=Flusher(loop), limits=limits, name=str(address))
    transport.set_protocol(conn)
    if early:
        conn.data_received(early)
    conn.connection_made(transport)
    stream: Stream[None, None] = Stream(conn)
    headers: Headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", str(address).encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    if not conn.open_stream(stream, headers, False):
        conn.close()
        raise CallError("UNAVAILABLE", f"{address} closed the connection before the call")
    return BidiCall(conn, stream, receiver)
