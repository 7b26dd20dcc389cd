"""The webhook's routes: POST /mutate, GET /healthz, GET /metrics, and a serving cert reloaded from disk.

Maps errors to HTTP answers in exactly one place (`mutate`); every decision is delegated to review.py/patch.py,
and HTTP itself to http1.py.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from webhook.config import InjectorConfig
from webhook.http1 import HttpServer, Request, Response, text
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
) -> HttpServer:
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
        finally:  # an unexpected error counts as "error" here and becomes a 500 in http1, like any route's
            metrics.observe(result, clock() - started)

    async def healthz(_: Request) -> Response:
        return text(200, "ok")

    async def metrics_page(_: Request) -> Response:
        return Response(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)

    # The API server appends ?timeout=10s: http1 matches paths without the query. A Pod can approach etcd's
    # 1.5 MiB object limit and the review carries it once (CREATE has no oldObject): http1 reads up to
    # 4 MiB and refuses a larger body with 413 before it reaches `mutate`.
    return HttpServer(
        {"/mutate": {"POST": mutate}, "/healthz": {"GET": healthz}, "/metrics": {"GET": metrics_page}}
    )
