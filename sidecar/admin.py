"""The proxy's admin HTTP server: /metrics, /ready, /live and POST /shutdown on :15090, and /debug and /tap
on a second listener bound to loopback (127.0.0.1:15091), because they show the catalog, the certificate and
the calls to whoever asks.

A thin HTTP/1.1 layer (h11) over callbacks it is given: it must not know how readiness, debug state or shutdown
work.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from sidecar.ports import LIVE_PATH, METRICS_PATH, READY_PATH

log = logging.getLogger(__name__)

# Scraped and probed every few seconds: an access line for each would drown the log.
_UNLOGGED_PATHS = frozenset({METRICS_PATH, READY_PATH, LIVE_PATH})

# /tap streams at most this many calls, for at most this long: a forgotten tap ends by itself.
TAP_MAX_CALLS = 1000
TAP_MAX_SECONDS = 60.0


# /debug yields the event loop after at most this much encoding work: the proxy keeps relaying calls while an
# operator reads a large document (a direct-mode proxy's catalog, thousands of connections).
DEBUG_SLICE_S = 0.002


def _debug_value(o: object) -> object:
    """json's fallback for /debug: a no-argument callable is a section built only when the encoder reaches it (so
    building, like encoding, happens in slices); anything else (Endpoint, ServiceKey) shows as its str().

    A section that fails to build shows as {"error": ...} in its place (and is logged): the document stays
    valid JSON and the status 200 whether the failure comes before or after the first chunk went out."""
    if not callable(o):
        return str(o)
    try:
        return o()
    except Exception as e:
        log.exception("debug section failed")
        return {"error": f"{type(e).__name__}: {e}"}


async def render_json(doc: object, *, slice_s: float = DEBUG_SLICE_S) -> AsyncGenerator[bytes, None]:
    """`doc` as indented JSON (UTF-8) in chunks, each the work of at most ~`slice_s` of loop time.

    json.dumps would hold the loop for the whole document (60-90 ms for a 1 MB catalog, measured in issue 16);
    the encoder's pure-Python generator (which json uses whenever it indents) can stop between any two pieces.
    Each slice's pieces are joined and handed out at the end of the slice: one join of a million small strings
    at the end held the loop for 20-27 ms by itself, and joining the chunks again for one body another 4-10 ms
    (tests/sidecar/test_debug_loop.py's catalog, 5.4 MB).
    """
    parts: list[str] = []
    encoder = json.JSONEncoder(indent=2, default=_debug_value)
    started = time.perf_counter()
    for n, part in enumerate(encoder.iterencode(doc)):
        parts.append(part)
        if n & 63 == 0 and time.perf_counter() - started > slice_s:
            yield "".join(parts).encode()
            parts.clear()
            await asyncio.sleep(0)
            started = time.perf_counter()
    yield "".join(parts).encode()


class TapFeed(Protocol):
    """One subscription to the proxy's finished calls (sidecar/tap.py)."""

    dropped: int

    async def next(self) -> Mapping[str, object]: ...


def is_loopback_peer(peer: str | None) -> bool:
    """Whether a request's peer address is this host's loopback (127.0.0.0/8, ::1, ::ffff:127.x.y.z).

    Decided from the transport's address only, never from headers a client could forge.
    """
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


# ---- HTTP/1.1 over asyncio streams ------------------------------------------------------------------------
#
# Written here rather than taken from a server library because of a profile (issue 14): aiohttp.web, which
# served these routes before, cost every proxy ~16 MiB of RSS and ~200 ms of its ~525 ms import time, most of
# its idle footprint above the 40 MiB target. h11 (~0.5 MiB) parses and frames HTTP/1.1 but does no I/O by
# design; uvicorn's h11 server would add ~5 MiB and an ASGI lifecycle the proxy does not need. What is left to
# write is the glue below: read bytes into h11, answer each request, honour h11's keep-alive decision, and
# bound each connection in time and memory.


@dataclass(frozen=True)
class HttpLimits:
    """How long and how much one admin connection may take."""

    keepalive_s: float = 75.0  # idle between requests (aiohttp's default, which the proxy had)
    request_s: float = 10.0  # from a request's first byte to its last: a trickled head is dropped
    write_s: float = 30.0  # a reader that takes nothing for this long is dropped
    max_head: int = 16 * 1024  # h11's max incomplete event: a longer request head is refused with 431
    max_body: int = 64 * 1024  # no route reads a body; one this large is refused with 413

    def __post_init__(self) -> None:
        if min(self.keepalive_s, self.request_s, self.write_s, self.max_head) <= 0 or self.max_body < 0:
            raise ValueError(f"admin HTTP limits must be positive: {self}")


@dataclass(frozen=True)
class Request:
    """One request as the routes see it: no body (none of them reads one)."""

    method: str
    path: str  # percent-decoded, without the query
    query: Mapping[str, str]  # the first value of each name
    headers: Mapping[str, str]  # names lowercased; a repeated header's values joined with ", "
    peer: str | None  # the transport's peer address: the only thing trusted for who is asking


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Streamed:
    """A 200 whose body is written chunk by chunk, each only once the reader has taken the previous ones.

    An exception from `chunks` ends the connection mid-body: the reader sees a truncated response."""

    content_type: str
    chunks: AsyncGenerator[bytes, None]


Handler = Callable[[Request], Awaitable[Response | Streamed]]


def _text(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, text.encode(), headers=headers)


class _Truncated(Exception):
    """A streamed body failed part way and its producer has logged why: end the connection, say no more."""


class _Refused(Exception):
    """A request refused before it reached a route (413): answered, then the connection is closed."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _request(head: h11.Request, peer: str | None) -> Request:
    target = urlsplit(head.target.decode("ascii"))
    query: dict[str, str] = {}
    for name, value in parse_qsl(target.query, keep_blank_values=True):
        query.setdefault(name, value)
    headers: dict[str, str] = {}
    for raw_name, raw_value in head.headers:
        name, value = raw_name.decode("ascii"), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(head.method.decode("ascii"), unquote(target.path), query, headers, peer)


def _peer_host(peername: object) -> str | None:
    """The host part of a transport's peername ((host, port) or (host, port, flow, scope)), None otherwise."""
    if isinstance(peername, tuple) and peername and isinstance(peername[0], str):
        return peername[0]
    return None


class _Listener:
    """One listening socket serving `routes` (path -> method -> handler) over HTTP/1.1, and its connections.

    HEAD is answered wherever GET is, with GET's headers and no body."""

    def __init__(self, routes: Mapping[str, Mapping[str, Handler]], limits: HttpLimits) -> None:
        self._routes = routes
        self._limits = limits
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._accepted, host, port)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stops listening and ends every open connection now, idle or mid-response."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, so each connection's task is made here, kept in _connections and ended by close():
        # asyncio's own task for a coroutine callback reports a cancelled one as an error (3.11.7 calls
        # task.exception() on it), which every shutdown with a connection open would log.
        if self._closing:  # accepted before close() stopped listening, handed over after
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._connection(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_head)
        peer = _peer_host(writer.get_extra_info("peername"))
        try:
            while await self._exchange(conn, reader, writer, peer):
                conn.start_next_cycle()
        except (TimeoutError, ConnectionError):
            writer.transport.abort()  # idle, too slow, or gone: nothing more to say
        except asyncio.CancelledError:
            writer.transport.abort()  # close(): end now rather than flush to a reader that may be slow
            raise
        except Exception:
            log.exception("admin connection failed peer=%s", peer)
            writer.transport.abort()
        else:
            writer.close()

    async def _exchange(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str | None
    ) -> bool:
        """Reads one request and answers it. True when the connection may carry another."""
        started = time.monotonic()
        try:
            head = await self._read_request(conn, reader, writer)
        except (h11.RemoteProtocolError, _Refused) as e:
            # Malformed (400), a head over max_head (431) or a body over max_body (413): answered if h11 still
            # lets us, then closed, since the rest of the stream cannot be trusted to frame the next request.
            status = e.status if isinstance(e, _Refused) else e.error_status_hint
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = f"{status} {HTTPStatus(status).phrase}: {e}".encode()
                headers = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body))),
                           ("connection", "close")]  # fmt: skip
                writer.write(_out(conn, h11.Response(status_code=status, headers=headers, reason=_reason(status)),
                                  h11.Data(data=body), h11.EndOfMessage()))  # fmt: skip
                await self._drain(writer)
            _log_access("-", "-", status, peer, time.monotonic() - started)
            return False
        if head is None:
            return False
        started = time.monotonic()
        request = _request(head, peer)
        reply = await self._dispatch(request)
        try:
            await self._send(conn, writer, request, reply)
        finally:  # a response cut short (the reader gone, a stream failing) is logged too, with what was sent
            status = reply.status if isinstance(reply, Response) else 200
            _log_access(request.method, request.path, status, peer, time.monotonic() - started)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> h11.Request | None:
        """The next request's head, once its body (bounded, discarded) is in too; None when the peer is done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.keepalive_s
        arrived = False
        head: h11.Request | None = None
        body = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(_out(conn, h11.InformationalResponse(status_code=100, headers=[])))
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(64 * 1024)
                if not arrived:
                    arrived = True
                    deadline = loop.time() + self._limits.request_s
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
                if body > self._limits.max_body:
                    raise _Refused(413, f"request body over {self._limits.max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return head
            else:  # ConnectionClosed (PAUSED cannot come: a cycle starts only once both sides are done)
                return None

    async def _dispatch(self, request: Request) -> Response | Streamed:
        methods = self._routes.get(request.path)
        if methods is None:
            return _text(404, "404: Not Found")
        handler = methods.get(request.method)
        if handler is None and request.method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            return _text(405, "405: Method Not Allowed", (("allow", allowed),))
        try:
            return await handler(request)
        except Exception:
            log.exception("admin request failed method=%s path=%s", request.method, request.path)
            return _text(500, "500: Internal Server Error")

    async def _send(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: Request, reply: Response | Streamed
    ) -> None:
        with_body = request.method != "HEAD"
        if isinstance(reply, Response):
            headers = [("content-type", reply.content_type), ("content-length", str(len(reply.body))), *reply.headers]
            body = [h11.Data(data=reply.body)] if with_body and reply.body else []
            head = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
            writer.write(_out(conn, head, *body, h11.EndOfMessage()))
            await self._drain(writer)
            return
        response = h11.Response(status_code=200, headers=[("content-type", reply.content_type)], reason=b"OK")
        writer.write(_out(conn, response))
        async with contextlib.aclosing(reply.chunks) as chunks:
            while with_body:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except _Truncated:
                    writer.transport.abort()  # no last chunk: the reader knows the body is incomplete
                    return
                except Exception:
                    log.exception("admin response failed part way method=%s path=%s", request.method, request.path)
                    writer.transport.abort()
                    return
                if chunk:
                    writer.write(_out(conn, h11.Data(data=chunk)))
                    await self._drain(writer)  # a slow reader holds the producer here, not our memory
        writer.write(_out(conn, h11.EndOfMessage()))
        await self._drain(writer)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(self._limits.write_s):
            await writer.drain()


def _out(
    conn: h11.Connection, *events: h11.Response | h11.InformationalResponse | h11.Data | h11.EndOfMessage
) -> bytes:
    """The bytes h11 frames `events` as (it returns None only for ConnectionClosed, never sent here)."""
    return b"".join(conn.send(event) or b"" for event in events)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _log_access(method: str, path: str, status: int, peer: str | None, seconds: float) -> None:
    """One key=value line per operator request (/debug, /shutdown, mistakes); none for scrapes and probes."""
    if path in _UNLOGGED_PATHS:
        return
    log.info("admin request method=%s path=%s status=%d peer=%s seconds=%.3f", method, path, status, peer, seconds)


# ---- the routes -------------------------------------------------------------------------------------------


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header admits gzip (explicitly: `gzip` or `x-gzip`, with a q-value above 0)."""
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip"):
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        return q > 0
    return False


class _Scraped:
    """Families already collected, so encoding can run off the event loop without reading live counters."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


def _encode(encoder: Callable[[_Scraped], bytes], scraped: _Scraped, gzip: bool) -> bytes:
    body = encoder(scraped)
    return zlib.compress(body, 6, wbits=31) if gzip else body  # wbits=31: a gzip member, as Content-Encoding says


class AdminServer:
    """Serves one CollectorRegistry and three callbacks over HTTP.

    `shutdown` must only signal (set an event): it runs inside the request handler, before the 202 is sent.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        debug: Callable[[], Mapping[str, object]],
        shutdown: Callable[[], None],
        tap: Callable[[], AbstractContextManager[TapFeed]] | None = None,
        limits: HttpLimits = HttpLimits(),
    ) -> None:
        self._registry = registry
        self._tap = tap
        self._ready = ready
        self._debug = debug
        self._shutdown = shutdown
        self._limits = limits
        self._listener: _Listener | None = None
        self._debug_listener: _Listener | None = None
        self._debug_address = ""

    async def start_debug(self, host: str, port: int) -> None:
        """Serves /debug on `host:port`, which the caller keeps on loopback. Raises OSError if it is taken."""
        if self._debug_listener is not None:
            raise RuntimeError("debug listener already started")
        routes: dict[str, dict[str, Handler]] = {"/debug": {"GET": self._debug_state}}
        if self._tap is not None:
            routes["/tap"] = {"GET": self._tap_stream}
        listener = _Listener(routes, self._limits)
        await listener.start(host, port)
        self._debug_listener = listener
        self._debug_address = f"{host}:{self.debug_port}"
        log.info("admin debug listener address=%s", self._debug_address)

    @property
    def debug_port(self) -> int:
        """The bound port of the debug listener (useful when started on port 0)."""
        if self._debug_listener is None:
            raise RuntimeError("debug listener not started")
        return self._debug_listener.port

    async def start(self, host: str, port: int) -> None:
        """Binds and serves. Raises OSError if the address is taken."""
        if self._listener is not None:
            raise RuntimeError("admin server already started")
        listener = _Listener(
            {
                METRICS_PATH: {"GET": self._metrics},
                READY_PATH: {"GET": self._readiness},
                LIVE_PATH: {"GET": self._liveness},
                "/debug": {"GET": self._debug_elsewhere},
                "/shutdown": {"POST": self._shutdown_request},
            },
            self._limits,
        )
        await listener.start(host, port)
        self._listener = listener
        log.info("admin server listening address=%s:%d", host, self.port)

    async def close(self) -> None:
        """Stops listening and ends open connections (a /tap or /debug being read too); safe to call twice or
        before start."""
        listeners = [x for x in (self._listener, self._debug_listener) if x is not None]
        self._listener = self._debug_listener = None
        await asyncio.gather(*(x.close() for x in listeners))

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        if self._listener is None:
            raise RuntimeError("admin server not started")
        return self._listener.port

    async def _metrics(self, request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # Collect on the loop, where the counters are written (they are not thread-safe); encode in a
        # thread, because formatting 1,000 series costs ~100 ms of CPU that would otherwise stall every call.
        scraped = _Scraped(self._registry.collect())
        gzip = accepts_gzip(request.headers.get("accept-encoding", ""))  # Prometheus asks for it
        body = await asyncio.to_thread(_encode, encoder, scraped, gzip)
        return Response(200, body, content_type, (("content-encoding", "gzip"),) if gzip else ())

    async def _readiness(self, request: Request) -> Response:
        if self._ready():
            return _text(200, "ready")
        return _text(503, "not ready")

    async def _liveness(self, request: Request) -> Response:
        return _text(200, "live")

    async def _debug_state(self, request: Request) -> Response | Streamed:
        try:
            chunks = render_json(self._debug())
            first = await anext(chunks)  # the document's top level: a failure here is still a clean 500
        except Exception as e:
            log.exception("debug state failed")
            return _text(500, f"debug state failed: {type(e).__name__}: {e}")
        return Streamed("application/json", _debug_rest(first, chunks))

    async def _debug_elsewhere(self, request: Request) -> Response:
        where = f"http://{self._debug_address}/debug" if self._debug_address else "nowhere (debug listener off)"
        return _text(
            404, f"/debug is served only on the pod's loopback, at {where} (reach it with kubectl port-forward)"
        )

    async def _tap_stream(self, request: Request) -> Response | Streamed:
        """GET /tap?limit=N&seconds=S: one JSON line per call finished from now on (never metadata values
        or bodies), then {"end": "limit"|"time", "calls": n, "dropped": n}. Loopback peers only: reaching
        it takes `kubectl port-forward`, that is, the right to reach the pod's admin port."""
        assert self._tap is not None
        if not is_loopback_peer(request.peer):
            return _text(403, "tap is served only to loopback (use kubectl port-forward)")
        try:
            limit = int(request.query.get("limit", "100"))
            seconds = float(request.query.get("seconds", "10"))
            if not (1 <= limit <= TAP_MAX_CALLS and 0 < seconds <= TAP_MAX_SECONDS):
                raise ValueError
        except ValueError:
            return _text(400, f"limit must be 1-{TAP_MAX_CALLS} and seconds in (0, {TAP_MAX_SECONDS:.0f}]")
        return Streamed("application/x-ndjson", self._tap_lines(self._tap, limit, seconds))

    @staticmethod
    async def _tap_lines(
        subscribe: Callable[[], AbstractContextManager[TapFeed]], limit: int, seconds: float
    ) -> AsyncGenerator[bytes, None]:
        # Subscribed only once the headers are out and the first line is asked for; unsubscribed however the
        # stream ends (the limit, the time, the reader gone, the server closing).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        sent, end = 0, "limit"
        with subscribe() as feed:
            while sent < limit:
                try:
                    record = await asyncio.wait_for(feed.next(), deadline - loop.time())
                except TimeoutError:
                    end = "time"
                    break
                yield json.dumps(record).encode() + b"\n"
                sent += 1
            dropped = feed.dropped
        yield json.dumps({"end": end, "calls": sent, "dropped": dropped}).encode() + b"\n"

    async def _shutdown_request(self, request: Request) -> Response:
        if not is_loopback_peer(request.peer):
            return _text(403, "shutdown is accepted only from loopback")
        log.info("shutdown requested peer=%s", request.peer)
        self._shutdown()
        return _text(202, "shutting down")


async def _debug_rest(first: bytes, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    yield first
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield chunk
        except Exception as e:
            # Headers are gone: the reader gets a truncated document (invalid JSON), the log says why.
            log.exception("debug state failed part way")
            raise _Truncated from e
