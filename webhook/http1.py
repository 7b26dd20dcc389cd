"""HTTP/1.1 for the webhook's fixed routes, on asyncio and httptools' C parser: requests in, answers out, in order.

Knows nothing about admission. Must not buffer more than one bounded request per connection beyond a short
pipeline, nor leave a connection open past its timeouts.

Written here rather than served by aiohttp because the HTTP layer dominates a reused answer. Answering a
fixed body over TLS, this costs 0.47-0.64x the CPU of aiohttp's low-level server, and uvicorn (httptools,
bare ASGI) 0.62-0.82x (bench/webhook_http_floor.py, three runs). A burst of 200 reviews queues on one core, so that
CPU is the p99. The parsing, the hard part, stays in httptools.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import NamedTuple, cast

import httptools

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; httptools itself sets no limit
# Requests read ahead of their answers on one connection; past this the connection stops being read and
# what was read is parsed no further (it is fed to the parser FEED_BYTES at a time, since httptools cannot
# pause between two messages of one feed).
MAX_PIPELINED = 16
FEED_BYTES = 1024
IDLE_TIMEOUT_S = 75.0  # as aiohttp's keep-alive; the API server's client drops idle connections at 90 s
REQUEST_TIMEOUT_S = 30.0  # from a request's first byte to its last: a stalled sender is cut off
WRITE_TIMEOUT_S = (
    30.0  # an answer the client does not take in (it stopped reading): the connection is dropped
)
CLOSE_TIMEOUT_S = 10.0  # a closing connection whose last bytes the client does not take in is dropped
HANDSHAKE_TIMEOUT_S = 10.0
TLS_SHUTDOWN_TIMEOUT_S = 5.0  # waiting for the client's close_notify after ours (asyncio's default is 30 s)
SHUTDOWN_TIMEOUT_S = 10.0


class Request(NamedTuple):
    method: str
    path: str  # without the query string: the API server calls /mutate?timeout=10s
    query: str
    headers: Mapping[str, str]  # names in lower case; repeated headers joined with ", "
    body: bytes


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]
# path -> method -> handler; a GET route also answers HEAD.
Routes = Mapping[str, Mapping[str, Handler]]


def text(status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (message + "\n").encode(), headers=headers)


class _Clock:
    """The Date header, formatted once a second (RFC 9110 asks an origin server with a clock to send it)."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpServer:
    """The routes, the limits and the open connections; a protocol factory for loop.create_server."""

    def __init__(
        self,
        routes: Routes,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_head_bytes: int = MAX_HEAD_BYTES,
        idle_timeout: float = IDLE_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        write_timeout: float = WRITE_TIMEOUT_S,
        close_timeout: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.max_head_bytes = max_head_bytes
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        self.close_timeout = close_timeout
        self.connections: set[_Connection] = set()
        self.workers: set[asyncio.Task[None]] = set()  # each answering one connection's requests in turn
        self.clock = _Clock()
        self.stopping = False
        self._drained: asyncio.Event | None = None
        # Deadlines are checked this often, so a timeout fires up to this late.
        self.sweep_interval = min(
            1.0, idle_timeout / 4, request_timeout / 4, write_timeout / 4, close_timeout / 4
        )
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> _Connection:
        return _Connection(self)

    async def respond(self, request: Request) -> Response:
        """Route one request; the one place an unexpected handler error becomes a 500."""
        methods = self.routes.get(request.path)
        if methods is None:
            return text(404, "not found")
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
            return text(405, f"method {request.method} not allowed", headers=(("Allow", ", ".join(allowed)),))
        try:
            return await handler(request)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the server is stopping this answer
            # Something the handler awaited was cancelled by someone else: a failure like any other.
            log.exception("event=request_failed path=%s", request.path)
            return text(500, "internal error")
        except Exception:
            log.exception("event=request_failed path=%s", request.path)
            return text(500, "internal error")

    def sweep(self) -> None:
        """Expire the connections past their deadline, and come back in `sweep_interval`."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._sweeper = loop.call_at(now + self.sweep_interval, self.sweep)
        for conn in [c for c in self.connections if c.deadline <= now]:
            try:
                conn.expire()
            except Exception:  # one connection's failure must not stop every other's timeouts
                log.exception("event=timeout_failed")
                conn.abort()

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def forget(self, item: _Connection | asyncio.Task[None]) -> None:
        if isinstance(item, _Connection):
            self.connections.discard(item)
        else:
            self.workers.discard(item)
        if self._drained is not None and not self.connections and not self.workers:
            self._drained.set()

    async def drain(self, grace: float) -> None:
        """Finish what each connection has begun and close it; after `grace` seconds, abort what is left.

        Also waits for answers still being worked out for clients that have gone (their handlers' metrics count).
        """
        self.stopping = True
        self._drained = asyncio.Event()
        for conn in list(self.connections):
            conn.close_when_done()
        if not self.connections and not self.workers:
            return
        try:
            await asyncio.wait_for(self._drained.wait(), grace)
        except TimeoutError:
            log.warning(
                "event=drain_timeout connections=%d answering=%d", len(self.connections), len(self.workers)
            )
            for conn in list(self.connections):
                conn.abort()
            workers = list(self.workers)
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)


class _Connection(asyncio.Protocol):
    """One client: parses requests, answers them in arrival order by one task at a time, enforces the limits.

    Its one timeout is derived from its state (`_rearm`): closing, writing stalled, reading a request, answering
    (none: the handler bounds itself), or idle.
    """

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._loop = asyncio.get_running_loop()
        # The request being parsed.
        self._reading = False
        self._in_head = False  # its request line and headers are not complete yet
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0  # counted as httptools hands the request line and headers over
        # Bytes of the request fed to the parser that were not body: the head, chunk framing, trailers.
        # httptools hands a header (or trailer) over only at its line end, so these are counted as fed.
        self._framing = 0
        self._body_total = 0  # body bytes over the connection's life, to tell a slice's body from the rest
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._continue_owed = False  # a 100 Continue held back until the answers before it are written
        # Parsed requests and errors in arrival order, each with (keep the connection after it, HTTP/1.0).
        self._queue: deque[tuple[Request | Response, bool, bool]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._answering = False  # the worker awaits the handler of the request at the head of the queue
        self._held = memoryview(b"")  # input read but not parsed while the queue is full
        self._stopped_reading = False  # after an error, an upgrade, the peer's EOF, or Connection: close
        self._close_when_done = False
        self._writable: asyncio.Future[None] | None = None
        # When the current timeout expires (loop time; inf: none runs), checked by HttpServer's sweep.
        self.deadline = math.inf
        self._expire: Callable[[], None] = self.abort
        self._request_started = 0.0
        self._write_stalled = 0.0
        self._closing_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        self._tls = transport.get_extra_info("sslcontext") is not None
        self._server.connections.add(self)
        if self._server.stopping:  # its TLS handshake ended during the drain: nothing was asked yet
            self._close()
        else:
            self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadline = math.inf
        self._stopped_reading = True
        self._held = memoryview(b"")
        # The answer being worked out finishes (its handler's metrics count) and goes nowhere; those not
        # begun are dropped.
        while len(self._queue) > (1 if self._answering else 0):
            self._queue.pop()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._server.forget(self)

    def data_received(self, data: bytes) -> None:
        if self._stopped_reading:
            return
        if self._held:  # a read that arrived as reading was paused
            self._held = memoryview(bytes(self._held) + data)
            return
        self._feed(memoryview(data))

    def eof_received(self) -> bool:
        if self._held:  # requests read before the EOF still wait to be parsed: answer them, then close
            self._close_when_done = True
            return True
        self._stop_reading()
        if self._queue or self._worker is not None:
            self._close_when_done = True
            self._rearm()  # the request cut short by the EOF has no timeout any more
        else:
            self._close()  # ours, so the close timeout bounds a client that never reads what is buffered
        # Plain TCP: keep the half-close open for the answers still due. TLS closes regardless (its layer starts
        # the shutdown and warns if asked otherwise; its ssl_shutdown_timeout bounds it).
        return not self._tls

    def pause_writing(self) -> None:
        self._writable = self._loop.create_future()
        self._write_stalled = self._loop.time()
        self._rearm()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None
        self._rearm()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._stopped_reading:
            return
        self._reading = True
        self._in_head = True
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._framing = 0
        self._body = []
        self._body_bytes = 0
        self._request_started = self._loop.time()
        self._rearm()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._stopped_reading or not self._in_head:  # trailers after a chunked body are not headers
            return
        key = name.decode("latin-1").lower()
        val = value.decode("latin-1").strip(" \t")
        self._headers[key] = f"{self._headers[key]}, {val}" if key in self._headers else val
        self._count_head(len(name) + len(value) + 4)  # with ": " and CRLF

    def on_headers_complete(self) -> None:
        if self._stopped_reading:
            return
        self._in_head = False
        version = self._parser.get_http_version()
        declared = self._headers.get("content-length")  # llhttp checked it is one number
        if version not in ("1.0", "1.1"):  # HTTP/0.9 has no headers to answer with
            self._fail(text(400, f"bad request: HTTP/{version} is not served"))
        elif version == "1.1" and "host" not in self._headers:  # RFC 9112 §3.2: MUST be refused
            self._fail(text(400, "bad request: no Host header"))
        elif declared is not None and int(declared) > self._server.max_body_bytes:
            self._fail(self._too_large())
        elif self._headers.get("expect", "").lower() == "100-continue" and version == "1.1":
            # Not before an earlier answer: the worker sends it once those are written (RFC 9110 §10.1.1
            # also lets the client send the body after a short wait of its own). HTTP/1.0 has no 100.
            if self._queue or self._worker is not None:
                self._continue_owed = True
                self._rearm()  # no request timeout while the client waits for us
            else:
                self._write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._stopped_reading:
            return
        self._body_bytes += len(body)
        self._body_total += len(body)
        if self._body_bytes > self._server.max_body_bytes:  # a chunked body declares no length
            self._fail(self._too_large())
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._stopped_reading:
            return
        self._reading = False
        self._continue_owed = False
        url = self._url
        path, _, query = url.partition(b"?")
        if not path.startswith(b"/"):  # absolute-form (https://host/mutate), authority-form (CONNECT), or *
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                self._fail(text(400, "bad request: the request target is not a path or a URL"))
                return
            path, query = parsed.path or b"/", parsed.query or b""
        request = Request(
            self._parser.get_method().decode("latin-1"),
            path.decode("latin-1"),
            query.decode("latin-1"),
            self._headers,
            self._body[0] if len(self._body) == 1 else b"".join(self._body),
        )
        self._body = []
        http10 = self._parser.get_http_version() == "1.0"
        # RFC 9112 §6.1: after a chunked HTTP/1.0 request the connection cannot be trusted to be framed.
        keep_alive = self._parser.should_keep_alive() and not (
            http10 and "transfer-encoding" in self._headers
        )
        self._enqueue(request, keep_alive, http10)  # when closing, the worker closes after the last one due
        if not keep_alive:
            self._stop_reading()
        self._rearm()

    # internals

    def _feed(self, data: memoryview) -> None:
        """Parse `data` a slice at a time, holding back the rest once MAX_PIPELINED answers are due."""
        transport = self._transport
        assert transport is not None
        for offset in range(0, len(data), FEED_BYTES):
            if len(self._queue) >= MAX_PIPELINED:
                self._held = data[offset:]
                transport.pause_reading()
                self._rearm()
                return
            piece = data[offset : offset + FEED_BYTES]
            body_before = self._body_total
            try:
                self._parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # The request before the upgrade was parsed; this server speaks nothing else: answer it, close.
                self._stop_reading()
                self.close_when_done()
                return
            except httptools.HttpParserError as e:
                if not self._stopped_reading:  # not an error the callbacks already queued an answer for
                    self._fail(text(400, f"bad request: {e}"))
                return
            if self._stopped_reading:
                return
            if self._reading:
                # With a slice of slack for the bytes of an earlier request in the same slice.
                self._framing += len(piece) - (self._body_total - body_before)
                if self._framing > self._server.max_head_bytes + FEED_BYTES:
                    if self._in_head:
                        self._head_too_large()
                    else:
                        limit = self._server.max_head_bytes
                        self._fail(text(400, f"bad request: chunk framing and trailers exceed {limit} bytes"))

    def _resume_feeding(self) -> None:
        held, self._held = self._held, memoryview(b"")
        self._feed(held)
        if not self._held and not self._stopped_reading and self._transport is not None:
            self._transport.resume_reading()
            if self._reading:  # the request cut short by the pause gets its full time again
                self._request_started = self._loop.time()

    def _count_head(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self._server.max_head_bytes:
            self._head_too_large()

    def _head_too_large(self) -> None:
        if not self._stopped_reading:
            self._fail(text(431, f"request line and headers exceed {self._server.max_head_bytes} bytes"))

    def _too_large(self) -> Response:
        return text(413, f"request body exceeds {self._server.max_body_bytes} bytes")

    def _fail(self, response: Response) -> None:
        """Answer with `response` after the answers already due, then close; read nothing more."""
        self._stop_reading()
        self._enqueue(response, False, False)
        self._rearm()

    def _stop_reading(self) -> None:
        self._stopped_reading = True
        self._reading = False
        self._in_head = False
        self._continue_owed = False
        self._held = memoryview(b"")

    def _enqueue(self, item: Request | Response, keep_alive: bool, http10: bool) -> None:
        self._queue.append((item, keep_alive, http10))
        if self._worker is None:
            self._worker = self._loop.create_task(self._answer_queue())
            self._server.workers.add(self._worker)

    async def _answer_queue(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            while self._queue:
                item, keep_alive, http10 = self._queue[0]
                if isinstance(item, Request):
                    self._answering = True
                    try:
                        response = await self._server.respond(item)
                    finally:
                        self._answering = False
                    head_only = item.method == "HEAD"
                else:
                    response, head_only = item, False
                self._queue.popleft()
                # Closing when done (drain, the peer's EOF): the last answer due says so and closes.
                keep_alive = keep_alive and not (
                    self._close_when_done and not self._queue and not self._reading
                )
                self._write(self._encode(response, keep_alive=keep_alive, head_only=head_only, http10=http10))
                if not keep_alive:
                    self._queue.clear()
                    self._close()
                    return
                if self._writable is not None:
                    await self._writable
                if self._held and len(self._queue) < MAX_PIPELINED:
                    self._resume_feeding()
                if self._continue_owed and not self._queue:
                    self._continue_owed = False
                    self._write(_CONTINUE)
                    self._request_started = self._loop.time()  # the client waited for it before sending on
        except BaseException:
            transport.abort()  # a client must never wait for an answer that will not come
            raise
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                self._server.forget(worker)
        if self._close_when_done and not self._reading:
            self._close()
        else:
            self._rearm()

    def _encode(self, response: Response, *, keep_alive: bool, head_only: bool, http10: bool) -> bytes:
        try:
            status, body, content_type, extra = response
            head = [
                b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n"
                % (
                    status,
                    _REASONS.get(status, b""),
                    content_type.encode("latin-1"),
                    len(body),
                    self._server.clock.date(),
                )
            ]
            for name, value in extra:
                head.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
            if not keep_alive:
                head.append(b"Connection: close\r\n")
            elif http10:
                head.append(b"Connection: keep-alive\r\n")
            head.append(b"\r\n")
            if not head_only:
                head.append(body)
            return b"".join(head)
        except (TypeError, ValueError):  # a handler's answer that HTTP cannot carry is the server's error
            log.exception("event=unencodable_response")
            failed = text(500, "internal error")
            return self._encode(failed, keep_alive=keep_alive, head_only=head_only, http10=http10)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._closing_since = self._loop.time()
            self._transport.close()
            self._rearm()

    def close_when_done(self) -> None:
        """Answer what has been asked (the last answer says Connection: close), then close."""
        self._close_when_done = True
        if self._worker is None and not self._reading:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def expire(self) -> None:
        self.deadline = math.inf
        self._expire()

    # The one timeout, from the state. A deadline checked by the server's sweep, not a loop timer per
    # connection: re-arming uvloop timers twice per request cost ~7% of a reused answer.

    def _rearm(self) -> None:
        transport = self._transport
        if transport is None:
            return
        if transport.is_closing():  # flushing its last bytes, or a TLS close_notify the peer does not answer
            if (
                not self._closing_since
            ):  # closed by the transport itself (e.g. the TLS layer, on the peer's EOF)
                self._closing_since = self._loop.time()
            self.deadline, self._expire = self._closing_since + self._server.close_timeout, self.abort
        elif self._writable is not None:
            self.deadline, self._expire = self._write_stalled + self._server.write_timeout, self.abort
        elif self._reading:
            if self._held or self._continue_owed:  # we are the ones holding the request up
                self.deadline = math.inf
            else:
                started = self._request_started
                self.deadline, self._expire = started + self._server.request_timeout, self._request_timed_out
        elif self._worker is not None or self._held:
            self.deadline = math.inf  # answering: the handler bounds its own work
        else:
            self.deadline, self._expire = self._loop.time() + self._server.idle_timeout, self._close

    def _request_timed_out(self) -> None:
        self._fail(text(408, f"request not received within {self._server.request_timeout:g} s"))


@asynccontextmanager
async def serving(
    server: HttpServer,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
) -> AsyncIterator[tuple[str, int]]:
    """Serve until the block exits, then stop accepting and drain open connections; yields the bound (host, port)."""
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(
        server,
        host,
        port,
        ssl=ssl_context,
        backlog=1024,
        ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if ssl_context is not None else None,
        ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S if ssl_context is not None else None,
    )
    server.sweep()
    try:
        bound = listener.sockets[0].getsockname()
        log.info("event=listening address=%s", json.dumps(list(bound[:2])))
        yield str(bound[0]), int(bound[1])
    finally:
        listener.close()
        try:
            await server.drain(shutdown_timeout)
        finally:
            server.stop_sweeping()
        await listener.wait_closed()
