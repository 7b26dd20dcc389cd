"""The webhook's routes: POST /mutate, GET /healthz, GET /metrics, served over HTTPS by uvicorn (ASGI), with
a serving cert reloaded from disk.

Maps errors to HTTP answers in exactly one place (`mutate`, then `App.respond` for what escapes a handler);
every decision is delegated to review.py/patch.py, and HTTP/1.1 itself to uvicorn on httptools' parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import NamedTuple

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from webhook.config import InjectorConfig
from webhook.kube import NamespaceLookupError
from webhook.metrics import AdmissionResult, WebhookMetrics
from webhook.patch import PodFacts, decide, needs_namespace_labels, read_pod
from webhook.review import (
    MalformedReview,
    PreparedAnswer,
    allow,
    encode,
    encode_prepared,
    parse_review,
    prepare,
)

log = logging.getLogger(__name__)

NamespaceLabelsLookup = Callable[[str], Awaitable[Mapping[str, str]]]

# A Pod can approach etcd's 1.5 MiB object limit and the review carries it once (CREATE has no oldObject).
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # request line and headers
IDLE_TIMEOUT_S = 75.0  # as aiohttp's keep-alive; the API server's client drops idle connections at 90 s
REQUEST_TIMEOUT_S = 30.0  # from a request's first byte to its last: a stalled or trickling sender gets 408
SHUTDOWN_TIMEOUT_S = 10.0


class Request(NamedTuple):
    method: str
    path: str  # without the query string: the API server calls /mutate?timeout=10s
    body: bytes


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]
# path -> method -> handler; a GET route also answers HEAD.
Routes = Mapping[str, Mapping[str, Handler]]
# ASGI at its boundary: uvicorn's messages are plain dicts; nothing past `App.__call__` sees them.
Message = Mapping[str, object]


def text(status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (message + "\n").encode(), headers=headers)


class App:
    """The routes as an ASGI application: reads a bounded body, routes, answers; knows nothing of admission."""

    def __init__(self, routes: Routes, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self._too_large = text(413, f"request body exceeds {max_body_bytes} bytes", headers=(("connection", "close"),))

    async def __call__(
        self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            return  # lifespan is off and websockets are not served: nothing else reaches here
        method = str(scope["method"])
        response = await self.respond(method, str(scope["path"]), scope, receive)
        if response is None:
            return  # the client went away before its request was whole
        headers = [
            (b"content-type", response.content_type.encode()),
            (b"content-length", b"%d" % len(response.body)),
            *((k.encode(), v.encode()) for k, v in response.headers),
        ]
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else response.body})

    async def respond(
        self, method: str, path: str, scope: Message, receive: Callable[[], Awaitable[Message]]
    ) -> Response | None:
        """Route one request; the one place an unexpected handler error becomes a 500."""
        methods = self.routes.get(path)
        if methods is None:
            return text(404, "not found")
        handler = methods.get("GET" if method == "HEAD" else method)
        if handler is None:
            allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
            return text(405, f"method {method} not allowed", headers=(("allow", ", ".join(allowed)),))
        body = await self._body(scope, receive)
        if body is None:
            return None
        if isinstance(body, Response):
            return body
        try:
            return await handler(Request(method, path, body))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the server is stopping this answer
            # Something the handler awaited was cancelled by someone else: a failure like any other.
            log.exception("event=request_failed path=%s", path)
            return text(500, "internal error")
        except Exception:
            log.exception("event=request_failed path=%s", path)
            return text(500, "internal error")

    async def _body(self, scope: Message, receive: Callable[[], Awaitable[Message]]) -> bytes | Response | None:
        """The whole body, a 413 past the limit (declared or not), or None if the client left."""
        too_large = self._too_large
        headers = scope["headers"]
        assert isinstance(headers, list)
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                return too_large  # refused before it is sent (uvicorn answers no 100-continue until we read)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            assert isinstance(chunk, bytes)
            size += len(chunk)
            if size > self.max_body_bytes:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _HeadTooLarge(Exception):
    pass


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on the request: its head's size, answered 431 (RFC 6585), and
    the time from its first byte to its last, answered 408 (RFC 9110 §15.5.9); and on a connection that
    sends nothing at all, closed after `idle_timeout`.

    Written because uvicorn sets none of these for httptools (h11 has a size bound, but answers 400): without
    them an endless header line or list would be held in memory, and a client that connects and stalls, or
    trickles its request a byte at a time, would hold its connection forever. Counts what the parser has
    handed over (URL and fields) and what it still holds of an unfinished head. Once a request is whole the
    handler bounds itself, and between requests uvicorn's keep-alive timeout applies.
    """

    max_head_bytes = MAX_HEAD_BYTES
    request_timeout = REQUEST_TIMEOUT_S
    idle_timeout = IDLE_TIMEOUT_S

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._parsed = 0  # URL and header bytes of the current head, as parsed
        self._pending = 0  # bytes received while the current head is unfinished
        self._in_head = True
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.idle_timeout, self._idle_expired)  # until a request begins

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self._refused and not self.transport.is_closing():
            self._pending += len(data)
            if self._pending > self.max_head_bytes:
                self._refuse()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._arm(self.request_timeout, self._request_expired)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._parsed = self._pending = 0
        super().on_headers_complete()

    def _count(self, n: int) -> None:
        self._parsed += n
        if self._parsed > self.max_head_bytes:
            self._refused = True
            raise _HeadTooLarge  # httptools stops parsing; uvicorn's error path lands in send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refused:
            self._refuse()
        else:
            super().send_400_response(msg)

    def _refuse(self) -> None:
        self._refused = True
        self._answer_and_close(b"431 Request Header Fields Too Large", b"request headers exceed %d bytes\n" % self.max_head_bytes)

    def _arm(self, delay: float, expired: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_expired(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _request_expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        log.debug("event=request_timeout client=%s in_head=%s", self.client, self._in_head)
        cycle = self.cycle
        # 408 unless another answer is being written: an earlier request's (pipelined) while this head
        # stalls, or this request's own (a 413 sent before its body).
        if cycle is None or (cycle.response_complete if self._in_head else not cycle.response_started):
            self._answer_and_close(
                b"408 Request Timeout", b"request not received within %g s\n" % self.request_timeout
            )
        else:
            self.transport.close()

    def _answer_and_close(self, status: bytes, body: bytes) -> None:
        """A plain-text answer written past uvicorn's request cycle (nothing else is being answered), then the close."""
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body)
        )
        self.transport.close()


@asynccontextmanager
async def serving(
    app: App,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
    request_timeout: float = REQUEST_TIMEOUT_S,
    idle_timeout: float = IDLE_TIMEOUT_S,
) -> AsyncIterator[tuple[str, int]]:
    """Serve until the block exits, then stop accepting and drain open connections; yields the bound (host, port).

    `request_timeout` bounds each request from its first byte to its last (408), `idle_timeout` a connection
    that sends nothing at first and each keep-alive wait (uvicorn's, in whole seconds) after an answer.

    Drives uvicorn's Server by its parts rather than `serve()`, which would take SIGTERM for itself: the entry
    point owns signals and keeps answering for a while after one (see __main__).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)

    class Protocol(BoundedHeadProtocol):
        pass

    Protocol.request_timeout, Protocol.idle_timeout = request_timeout, idle_timeout
    config = uvicorn.Config(
        app,
        http=Protocol,
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_keep_alive=max(int(idle_timeout), 1),
        timeout_graceful_shutdown=int(shutdown_timeout) or 1,
        backlog=1024,
    )
    config.load()
    # Our context, not one uvicorn would build once from file paths: CertReloader swaps certificates on
    # rotation and sets the session tickets.
    config.ssl = ssl_context
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)  # what `serve()` sets up before `startup()`: lifespan off
    try:
        await server.startup(sockets=[sock])
        ticker = asyncio.create_task(server.main_loop(), name="webhook-http-date")  # the Date header, each second
    except BaseException:
        sock.close()
        raise
    try:
        bound = sock.getsockname()
        log.info("event=listening address=%s", json.dumps(list(bound[:2])))
        yield str(bound[0]), int(bound[1])
    finally:
        server.should_exit = True
        await ticker
        await server.shutdown(sockets=[sock])
        for conn in list(server.server_state.connections):  # past the grace period: what is left is cut off
            conn.transport.abort()


# TLS 1.3 session tickets sent after each full handshake. Each costs the server an encryption and a write
# on every new connection (OpenSSL's default is 2); one is enough for a client that resumes sessions.
SESSION_TICKETS = 1


class CertReloader:
    """Serves the newest cert/key pair on disk: each TLS handshake checks the files' stat and reloads on change.

    The check runs in the SNI callback, which OpenSSL calls on every handshake, so a rotated Secret
    (kubelet swaps a symlink) is picked up by the next connection without a restart or a timer.
    """

    def __init__(self, cert_path: str, key_path: str, *, session_tickets: int = SESSION_TICKETS) -> None:
        self._cert_path = cert_path
        self._key_path = key_path
        self._session_tickets = session_tickets
        self._signature = self._stat()
        # The listening context serves until the first rotation, so a handshake swaps contexts only after one.
        self.context = self._load()
        self.context.sni_callback = self._on_handshake
        self._current = self.context

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self._cert_path, self._key_path):
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._cert_path, self._key_path)
        ctx.num_tickets = self._session_tickets
        return ctx

    def maybe_reload(self) -> ssl.SSLContext:
        try:
            signature = self._stat()
            if signature != self._signature:
                # Keep serving the old pair if the new one is half-written (cert updated, key not yet).
                self._current = self._load()
                self._signature = signature
                log.info("event=serving_cert_reloaded cert=%s", self._cert_path)
        except (OSError, ssl.SSLError) as e:
            log.warning("event=serving_cert_reload_failed error=%s", e)
        return self._current

    def _on_handshake(self, sock: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        current = self.maybe_reload()
        if current is not ctx:
            sock.context = current


AnswerKey = tuple[PodFacts, str, tuple[tuple[str, str], ...]]


class AnswerCache:
    """Answers already worked out, by (Pod facts, namespace, namespace labels): a memo of a pure function.

    The answer depends on the Pod only through its facts (patch.PodFacts), so the replicas of one workload,
    which differ in names, generated labels, env or the app's image but not in what the injector reads,
    share one answer: a rollout's burst works out the first and reuses it for the rest. Bounded in entries
    and in the size of the annotations each key holds.
    """

    def __init__(self, *, max_entries: int = 256, max_annotation_bytes: int = 64 * 1024) -> None:
        self._entries: OrderedDict[AnswerKey, PreparedAnswer] = OrderedDict()
        self._max_entries = max_entries
        self._max_annotation_bytes = max_annotation_bytes

    def key(self, facts: PodFacts, namespace: str, ns_labels: Mapping[str, str]) -> AnswerKey | None:
        """None when the answer should not be kept (caching off, or a Pod whose annotations are too large)."""
        if self._max_entries <= 0:
            return None
        size = 0
        for k, v in facts.annotations:
            size += len(k) + len(v)
        if size > self._max_annotation_bytes:
            return None
        return facts, namespace, tuple(sorted(ns_labels.items()))

    def get(self, key: AnswerKey) -> PreparedAnswer | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: AnswerKey, answer: PreparedAnswer) -> None:
        self._entries[key] = answer
        if len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def create_app(
    *,
    cfg: InjectorConfig,
    metrics: WebhookMetrics,
    namespace_labels: NamespaceLabelsLookup,
    clock: Callable[[], float] = time.perf_counter,
    answers: AnswerCache | None = None,
    not_ready: Callable[[], list[str]] = list,
) -> App:
    """The webhook's routes. `answers` (default: a fresh AnswerCache) reuses the answer for identical Pods.

    One cache per app: `cfg` is part of every answer it keeps, so it must not be shared across configs.
    """
    cache = AnswerCache() if answers is None else answers

    async def admit(body: bytes) -> tuple[AdmissionResult, bytes]:
        req = parse_review(body)
        if not req.is_pod_creation:
            return "skipped", encode(allow(req.uid))
        facts = read_pod(req.obj)
        labels: Mapping[str, str] = {}
        # Look the namespace up only when its label can change the answer (reinvocations and the
        # control plane's own pods never need it).
        if req.namespace and req.namespace != cfg.control_plane_namespace and needs_namespace_labels(facts):
            labels = await namespace_labels(req.namespace)
        key = cache.key(facts, req.namespace, labels)
        prepared = cache.get(key) if key is not None else None
        if prepared is None:
            prepared = prepare(decide(facts, labels, cfg, namespace=req.namespace))
            if key is not None:
                cache.put(key, prepared)
        # Per-review lines are DEBUG (a burst must not wait on the log); the user sees a denial's reason in
        # the API server's answer and operators see the count in kuberpc_webhook_admissions_total.
        log.debug(
            "event=%s namespace=%s uid=%s message=%s",
            prepared.result,
            req.namespace,
            req.uid,
            prepared.message,
        )
        return prepared.result, encode_prepared(req.uid, prepared)

    async def mutate(request: Request) -> Response:
        started = clock()
        result: AdmissionResult = "error"
        try:
            result, body = await admit(request.body)
            return Response(200, body, "application/json")
        except MalformedReview as e:
            return text(400, f"malformed AdmissionReview: {e}")
        except NamespaceLookupError as e:
            # 503 lets the webhook's failurePolicy (Ignore or Fail) decide, as for any outage.
            log.warning("event=namespace_lookup_failed error=%s", e)
            return text(503, str(e))
        finally:  # an unexpected error counts as "error" here and becomes a 500 in App.respond, like any route's
            metrics.observe(result, clock() - started)

    async def healthz(_: Request) -> Response:
        return text(200, "ok")

    async def readyz(_: Request) -> Response:
        # Readiness, not liveness: a replica whose discovery catalog has not been listed yet would answer proxies
        # with nothing; the Service sends them (and the API server's reviews) to a replica that is ready.
        why = not_ready()
        return text(503, "not ready: " + "; ".join(why)) if why else text(200, "ready")

    async def metrics_page(_: Request) -> Response:
        return Response(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)

    # The API server appends ?timeout=10s: ASGI's path leaves the query out. App reads up to MAX_BODY_BYTES
    # and refuses a larger body with 413 before it reaches `mutate`.
    return App(
        {
            "/mutate": {"POST": mutate},
            "/healthz": {"GET": healthz},
            "/readyz": {"GET": readyz},
            "/metrics": {"GET": metrics_page},
        }
    )
