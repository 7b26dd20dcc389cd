"""The proxy's admin HTTP server: /metrics, /ready, /live and POST /shutdown on :15090, and /debug and /tap
on a second listener bound to loopback (127.0.0.1:15091), because they show the catalog, the certificate and
the calls to whoever asks.

A thin aiohttp layer over callbacks it is given: it must not know how readiness, debug state or shutdown work.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Protocol

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
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
    building, like encoding, happens in slices); anything else (Endpoint, ServiceKey) shows as its str()."""
    return o() if callable(o) else str(o)


async def render_json(doc: object, *, slice_s: float = DEBUG_SLICE_S) -> AsyncIterator[bytes]:
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


class _AccessLogger(AbstractAccessLogger):
    """One key=value line per operator request (/debug, /shutdown, mistakes); none for scrapes and probes."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if request.path in _UNLOGGED_PATHS:
            return
        self.logger.info(
            "admin request method=%s path=%s status=%d peer=%s seconds=%.3f",
            request.method, request.path, response.status, request.remote, time,
        )


class _Scraped:
    """Families already collected, so encoding can run off the event loop without reading live counters."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> list[Metric]:
        return self._families


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
    ) -> None:
        self._registry = registry
        self._tap = tap
        self._ready = ready
        self._debug = debug
        self._shutdown = shutdown
        self._runner: web.AppRunner | None = None
        self._debug_runner: web.AppRunner | None = None
        self._debug_address = ""

    async def start_debug(self, host: str, port: int) -> None:
        """Serves /debug on `host:port`, which the caller keeps on loopback. Raises OSError if it is taken."""
        if self._debug_runner is not None:
            raise RuntimeError("debug listener already started")
        app = web.Application()
        app.router.add_get("/debug", self._debug_state)
        if self._tap is not None:
            app.router.add_get("/tap", self._tap_stream)
        self._debug_runner = await self._serve(app, host, port)
        self._debug_address = f"{host}:{self.debug_port}"
        log.info("admin debug listener address=%s", self._debug_address)

    async def _serve(self, app: web.Application, host: str, port: int) -> web.AppRunner:
        # Admin requests are short: a long grace period would only delay the proxy's own shutdown.
        runner = web.AppRunner(
            app, access_log_class=_AccessLogger, access_log=log, handle_signals=False, shutdown_timeout=2.0
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    @property
    def debug_port(self) -> int:
        """The bound port of the debug listener (useful when started on port 0)."""
        if self._debug_runner is None or not self._debug_runner.addresses:
            raise RuntimeError("debug listener not started")
        port: int = self._debug_runner.addresses[0][1]
        return port

    async def start(self, host: str, port: int) -> None:
        """Binds and serves. Raises OSError if the address is taken."""
        if self._runner is not None:
            raise RuntimeError("admin server already started")
        app = web.Application()
        app.router.add_get(METRICS_PATH, self._metrics)
        app.router.add_get(READY_PATH, self._readiness)
        app.router.add_get(LIVE_PATH, self._liveness)
        app.router.add_get("/debug", self._debug_elsewhere)
        app.router.add_post("/shutdown", self._shutdown_request)
        self._runner = await self._serve(app, host, port)
        log.info("admin server listening address=%s:%d", host, self.port)

    async def close(self) -> None:
        """Stops serving; safe to call twice or before start."""
        for runner in (self._runner, self._debug_runner):
            if runner is not None:
                await runner.cleanup()
        self._runner = self._debug_runner = None

    @property
    def port(self) -> int:
        """The bound port (useful when started on port 0)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("admin server not started")
        port: int = self._runner.addresses[0][1]
        return port

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        # Collect on the loop, where the counters are written (they are not thread-safe); encode in a
        # thread, because formatting 1,000 series costs ~100 ms of CPU that would otherwise stall every call.
        scraped = _Scraped(self._registry.collect())
        body = await asyncio.to_thread(encoder, scraped)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        response.enable_compression()  # gzip when the scraper asks for it, as Prometheus does
        return response

    async def _readiness(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready")
        return web.Response(status=503, text="not ready")

    async def _liveness(self, request: web.Request) -> web.Response:
        return web.Response(text="live")

    async def _debug_state(self, request: web.Request) -> web.StreamResponse:
        try:
            chunks = render_json(self._debug())
            first = await anext(chunks)  # the document's top level: a failure here is still a clean 500
        except Exception as e:
            log.exception("debug state failed")
            return web.Response(status=500, text=f"debug state failed: {type(e).__name__}: {e}")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(first)
        try:
            async for chunk in chunks:
                await resp.write(chunk)  # waits while the reader is slow: the document never piles up here
        except Exception:
            # Headers are gone: the reader gets a truncated document (invalid JSON), the log says why.
            log.exception("debug state failed part way")
            raise
        await resp.write_eof()
        return resp

    async def _debug_elsewhere(self, request: web.Request) -> web.Response:
        where = f"http://{self._debug_address}/debug" if self._debug_address else "nowhere (debug listener off)"
        return web.Response(
            status=404,
            text=f"/debug is served only on the pod's loopback, at {where} (reach it with kubectl port-forward)",
        )

    async def _tap_stream(self, request: web.Request) -> web.StreamResponse:
        """GET /tap?limit=N&seconds=S: one JSON line per call finished from now on (never metadata values
        or bodies), then {"end": "limit"|"time", "calls": n, "dropped": n}. Loopback peers only: reaching
        it takes `kubectl port-forward`, that is, the right to reach the pod's admin port."""
        assert self._tap is not None
        if not is_loopback_peer(request.remote):
            return web.Response(status=403, text="tap is served only to loopback (use kubectl port-forward)")
        try:
            limit = int(request.query.get("limit", "100"))
            seconds = float(request.query.get("seconds", "10"))
            if not (1 <= limit <= TAP_MAX_CALLS and 0 < seconds <= TAP_MAX_SECONDS):
                raise ValueError
        except ValueError:
            return web.Response(
                status=400,
                text=f"limit must be 1-{TAP_MAX_CALLS} and seconds in (0, {TAP_MAX_SECONDS:.0f}]",
            )
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        sent, end = 0, "limit"
        with self._tap() as feed:
            while sent < limit:
                try:
                    record = await asyncio.wait_for(feed.next(), deadline - loop.time())
                except TimeoutError:
                    end = "time"
                    break
                await response.write(json.dumps(record).encode() + b"\n")
                sent += 1
            dropped = feed.dropped
        await response.write(json.dumps({"end": end, "calls": sent, "dropped": dropped}).encode() + b"\n")
        await response.write_eof()
        return response

    async def _shutdown_request(self, request: web.Request) -> web.Response:
        if not is_loopback_peer(request.remote):
            return web.Response(status=403, text="shutdown is accepted only from loopback")
        log.info("shutdown requested peer=%s", request.remote)
        self._shutdown()
        return web.Response(status=202, text="shutting down")
