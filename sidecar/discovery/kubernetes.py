"""Discovery from the Kubernetes API (direct mode): list+watch Services, EndpointSlices and meshed Pods.

The only module that talks to the Kubernetes API. Turning what was seen into a Catalog is pure (build_catalog);
nothing here blocks the event loop on the network or drops the last good catalog when the API is unreachable.
"""

# Why aiohttp and not the official client for the streams: the `kubernetes` package is synchronous, and a
# blocking watch parked in a thread cannot be cancelled at shutdown (the thread sits in a socket read until
# the server's timeout, up to minutes). `kubernetes_asyncio` would be a second large dependency tree to pin
# for three GET requests. So the official client does only what is hard to get right: loading credentials
# (the in-cluster service account with its rotating token, or a kubeconfig with client certificates, exec
# plugins and token refresh) into a Configuration. aiohttp, already a dependency, does the list and watch
# requests: async, cancellable, with timeouts. The client is imported lazily, in load_credentials, so the
# file discovery source never pays its import time.

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import aiohttp
import orjson

from sidecar.config import INBOUND_PORT
from sidecar.discovery import ProblemLog, port_or_none
from sidecar.model import DEFAULT_WEIGHT, Catalog, Endpoint, EndpointSet, ServiceKey, selecting
from sidecar.policy import PREFIX, parse_service_annotations, parse_weight

log = logging.getLogger(__name__)

INJECTED_LABEL = PREFIX + "injected"  # set to "true" by the webhook on every meshed pod
WEIGHT = PREFIX + "weight"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by Kubernetes on every EndpointSlice of a Service
# Service ports whose appProtocol says the backend speaks HTTP/2 (gRPC) in plaintext.
GRPC_APP_PROTOCOLS = frozenset({"grpc", "h2c", "kubernetes.io/h2c", "http2"})

LIST_PAGE = 500
CONNECT_TIMEOUT = 10.0
LIST_TIMEOUT = 60.0
# The server ends a watch after timeoutSeconds (randomised so that proxies do not re-watch in step); a read
# timeout a little longer catches a connection that died silently (no RST: a node gone, a NAT entry lost).
WATCH_SECONDS = (300, 600)
WATCH_READ_SLACK = 30.0
# A watch that ends cleanly this soon without sending anything is not healthy (it is re-tried with backoff,
# so a server that closes every watch at once is not hammered).
HEALTHY_WATCH_SECONDS = 1.0
# aiohttp's readline() refuses lines over 128 KiB; a Pod with large annotations or managedFields can be
# bigger, so watch lines are split here, with this bound on one event.
MAX_EVENT_BYTES = 16 << 20
RBAC_HINT = (
    "direct discovery needs get/list/watch on services, endpointslices and pods: bind the ClusterRole "
    "kuberpc-proxy (manifests/proxy-rbac.yaml) to this pod's ServiceAccount"
)


class KubernetesError(Exception):
    """Talking to the Kubernetes API failed: credentials, transport, or an error answer."""


class ApiError(KubernetesError):
    """The API answered with an error status (HTTP, or a watch ERROR event)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class Gone(ApiError):
    """410 Gone: the resourceVersion we hold is older than the API keeps; only a new list helps."""


# ---- what is kept of each object: small, comparable records (a Pod object is kilobytes) ------------------

Key = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: str = "TCP"
    app_protocol: str = ""


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...] = ()
    # Only kuberpc.io/* ones: other annotations (last-applied-configuration...) change without mattering.
    annotations: tuple[tuple[str, str], ...] = ()
    selector: tuple[tuple[str, str], ...] = ()  # spec.selector, sorted: which pods the Service speaks for


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: str = ""  # targetRef name when it is a Pod of the slice's namespace


@dataclass(frozen=True, slots=True)
class SliceRecord:
    namespace: str
    name: str
    service: str
    ports: tuple[SlicePort, ...] = ()
    endpoints: tuple[SliceEndpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class PodRecord:
    """A meshed pod (only those are watched): where its proxy listens and its share of the calls."""

    namespace: str
    name: str
    ip: str = ""
    weight: int = DEFAULT_WEIGHT
    weight_problem: str = ""  # why the annotation was not used, if it was not
    labels: tuple[tuple[str, str], ...] = ()  # matched against Service selectors for the proxy's own pod


# ---- parsing API objects (untyped JSON) into records --------------------------------------------------


def _map(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _flag(value: object, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def object_key(obj: Mapping[str, object]) -> Key | None:
    meta = _map(obj.get("metadata"))
    name = _str(meta.get("name"))
    return (_str(meta.get("namespace")), name) if name else None


def resource_version(obj: object) -> str:
    return _str(_map(_map(obj).get("metadata")).get("resourceVersion"))


def parse_service(obj: Mapping[str, object]) -> ServiceRecord | None:
    key = object_key(obj)
    if key is None:
        return None
    ports = []
    for raw in _list(_map(obj.get("spec")).get("ports")):
        p = _map(raw)
        number = port_or_none(p.get("port"))
        if number is not None:
            ports.append(
                ServicePort(
                    _str(p.get("name")), number, _str(p.get("protocol")) or "TCP", _str(p.get("appProtocol"))
                )
            )
    annotations = _map(_map(obj.get("metadata")).get("annotations"))
    ours = tuple(
        sorted((k, v) for k, v in annotations.items() if k.startswith(PREFIX) and isinstance(v, str))
    )
    raw_selector = _map(_map(obj.get("spec")).get("selector"))
    selector = tuple(sorted((k, v) for k, v in raw_selector.items() if isinstance(v, str)))
    return ServiceRecord(key[0], key[1], tuple(ports), ours, selector)


def parse_slice(obj: Mapping[str, object]) -> SliceRecord | None:
    key = object_key(obj)
    meta = _map(obj.get("metadata"))
    service = _str(_map(meta.get("labels")).get(SERVICE_NAME_LABEL))
    if key is None or not service:
        return None
    ports = []
    for raw in _list(obj.get("ports")):
        p = _map(raw)
        number = port_or_none(p.get("port"))
        if number is not None:  # a nil port means "all ports" (headless without ports): nothing to call
            ports.append(SlicePort(_str(p.get("name")), number, _str(p.get("protocol")) or "TCP"))
    endpoints = []
    for raw in _list(obj.get("endpoints")):
        e = _map(raw)
        addresses = tuple(a for a in (_str(x) for x in _list(e.get("addresses"))) if a)
        if not addresses:
            continue
        cond = _map(e.get("conditions"))
        # discovery.k8s.io/v1: an unset `ready` or `serving` means ready, an unset `terminating` means not.
        ready = _flag(cond.get("ready"), True)
        ref = _map(e.get("targetRef"))
        same_ns = _str(ref.get("namespace")) in ("", key[0])
        pod = _str(ref.get("name")) if _str(ref.get("kind")) == "Pod" and same_ns else ""
        endpoints.append(
            SliceEndpoint(
                addresses,
                ready=ready,
                serving=_flag(cond.get("serving"), ready),
                terminating=_flag(cond.get("terminating"), False),
                pod=pod,
            )
        )
    return SliceRecord(key[0], key[1], service, tuple(ports), tuple(endpoints))


def parse_pod(obj: Mapping[str, object]) -> PodRecord | None:
    """A meshed pod's record; None for a pod that is not meshed (the label selector is checked here too)."""
    key = object_key(obj)
    meta = _map(obj.get("metadata"))
    if key is None or _str(_map(meta.get("labels")).get(INJECTED_LABEL)) != "true":
        return None
    ip = _str(_map(obj.get("status")).get("podIP"))
    raw_weight = _map(meta.get("annotations")).get(WEIGHT)
    weight, problem = DEFAULT_WEIGHT, ""
    if raw_weight is not None:
        try:
            weight = parse_weight(_str(raw_weight))
        except ValueError as e:
            problem = f"pod {key[0]}/{key[1]}: {WEIGHT}: {e} (using {DEFAULT_WEIGHT})"
    raw_labels = _map(meta.get("labels"))
    labels = tuple(sorted((k, v) for k, v in raw_labels.items() if isinstance(v, str)))
    return PodRecord(key[0], key[1], ip, weight, problem, labels)


# ---- the pure part: records -> Catalog ----------------------------------------------------------------


def call_port(ports: Iterable[ServicePort]) -> ServicePort | None:
    """The Service port a non-meshed backend is called on: the model has one port per endpoint.

    The first TCP port whose appProtocol says gRPC/h2c, else the first named `grpc` or `grpc-*`, else the
    first TCP port. (Meshed backends do not need this: they are called on their proxy's port.)
    """
    tcp = [p for p in ports if p.protocol == "TCP"]
    for p in tcp:
        if p.app_protocol.lower() in GRPC_APP_PROTOCOLS:
            return p
    for p in tcp:
        if p.name == "grpc" or p.name.startswith("grpc-"):
            return p
    return tcp[0] if tcp else None


def _rank(ep: Endpoint) -> int:
    return 2 if ep.ready else 1 if ep.serving and ep.terminating else 0


def build_catalog(
    services: Iterable[ServiceRecord],
    slices: Iterable[SliceRecord],
    pods: Mapping[Key, PodRecord],
    local: Key | None = None,
) -> tuple[Catalog, list[str]]:
    """The Catalog these objects describe, and one problem per bad annotation that matters.

    With `local`, the proxy's own pod, the Catalog says which Services select it, from their selectors and
    its labels; until that pod has been seen (and without `local`) it says nothing and inbound stays closed.

    Every Service is in it, with or without endpoints ("no endpoints" is a better answer than "unknown
    service"). An endpoint backed by a meshed pod is called at the pod IP on the proxy's inbound port with
    mTLS and the pod's weight; any other on the slice's port for the Service's call port, in plaintext.
    """
    by_service: dict[Key, list[SliceRecord]] = {}
    for sl in slices:
        by_service.setdefault((sl.namespace, sl.service), []).append(sl)
    problems: list[str] = []
    sets: list[EndpointSet] = []
    for svc in services:
        key = ServiceKey(svc.name, svc.namespace)
        policy, policy_problems = parse_service_annotations(dict(svc.annotations))
        problems.extend(f"service {key}: {p}" for p in policy_problems)
        plain_port = call_port(svc.ports)
        endpoints: dict[tuple[str, int], Endpoint] = {}
        for sl in sorted(by_service.get((svc.namespace, svc.name), ()), key=lambda s: s.name):
            target = None
            if plain_port is not None:
                target = next(
                    (p.port for p in sl.ports if p.name == plain_port.name and p.protocol == "TCP"), None
                )
            for se in sl.endpoints:
                pod = pods.get((sl.namespace, se.pod)) if se.pod else None
                conditions = {"ready": se.ready, "serving": se.serving, "terminating": se.terminating}
                if pod is not None:
                    if pod.weight_problem:
                        problems.append(pod.weight_problem)
                    # The pod IP, not the slice address: a dual-stack pod is in two slices, but is one peer.
                    found = [
                        Endpoint(
                            pod.ip or se.addresses[0],
                            INBOUND_PORT,
                            pod.weight,
                            tls=True,
                            pod=pod.name,
                            **conditions,
                        )
                    ]
                elif target is not None:
                    found = [Endpoint(a, target, tls=False, pod=se.pod, **conditions) for a in se.addresses]
                else:
                    found = []  # not meshed, and the slice has no port for the Service's call port
                for ep in found:
                    # A pod moving between slices is briefly in both: keep its most usable state.
                    old = endpoints.get(ep.key)
                    if old is None or _rank(ep) > _rank(old):
                        endpoints[ep.key] = ep
        ports = tuple(dict.fromkeys(p.port for p in svc.ports if p.protocol == "TCP"))
        sets.append(EndpointSet(key, tuple(endpoints.values()), policy, ports, svc.selector))
    own = pods.get(local) if local is not None else None
    chosen = selecting(sets, own.namespace, dict(own.labels)) if own is not None else None
    return Catalog(sets, selecting=chosen), list(dict.fromkeys(problems))


# ---- credentials ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """Where the API server is and how to authenticate to it.

    `authorization` is called before each request (it may re-read a rotated token or run a kubeconfig exec
    plugin, so it is called in a thread) and returns the Authorization header value, if any.
    """

    host: str  # https://10.96.0.1:443 (http:// only in tests)
    ssl: ssl.SSLContext | None = None
    authorization: Callable[[], str | None] = lambda: None
    server_hostname: str | None = None
    proxy: str | None = None


def load_credentials(
    *, service_host: str = "", service_port: str = "", kubeconfig: str | None = None
) -> Credentials:
    """In-cluster credentials when KUBERNETES_SERVICE_HOST is known, else the kubeconfig file.

    Raises KubernetesError saying what is missing.
    """
    from kubernetes.client import Configuration
    from kubernetes.config.incluster_config import (
        SERVICE_CERT_FILENAME,
        SERVICE_TOKEN_FILENAME,
        InClusterConfigLoader,
    )
    from kubernetes.config.kube_config import load_kube_config

    conf = Configuration()
    try:
        if service_host:
            source = f"the pod's service account ({SERVICE_TOKEN_FILENAME}, mounted in the proxy's container)"
            environ = {
                "KUBERNETES_SERVICE_HOST": service_host,
                "KUBERNETES_SERVICE_PORT": service_port or "443",
            }
            # The client's config loaders carry no annotations (untyped calls below).
            loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
                SERVICE_TOKEN_FILENAME, SERVICE_CERT_FILENAME, environ=environ
            )
            loader.load_and_set(conf)  # type: ignore[no-untyped-call]
        else:
            path = kubeconfig or "~/.kube/config"
            source = f"kubeconfig {path}"
            load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, client_configuration=conf, persist_config=False
            )
        context: ssl.SSLContext | None = None
        if str(conf.host).startswith("https:"):
            context = ssl.create_default_context(cafile=conf.ssl_ca_cert or None)
            if not conf.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if conf.cert_file:
                context.load_cert_chain(conf.cert_file, conf.key_file or None)
    # The loaders raise a zoo (ConfigException, YAML and exec-plugin errors, OSError, ssl.SSLError): at
    # this boundary they all mean the same thing, and the message names the cause.
    except Exception as e:
        raise KubernetesError(f"cannot load Kubernetes credentials from {source}: {e}") from e

    def authorization() -> str | None:
        value = conf.get_api_key_with_prefix("BearerToken", alias="authorization")
        return str(value) if value else None

    return Credentials(
        host=str(conf.host).rstrip("/"),
        ssl=context,
        authorization=authorization,
        server_hostname=conf.tls_server_name or None,
        proxy=conf.proxy or None,
    )


# ---- list + watch --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in [d/2, d], d = min(cap, base·2^(n-1))."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        d = min(self.cap, self.base * 2 ** min(max(attempt - 1, 0), 32))
        return rng.uniform(d / 2, d)


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Kind(Generic[T]):
    plural: str
    api: str
    label_selector: str
    parse: Callable[[Mapping[str, object]], T | None]

    def path(self, namespace: str | None) -> str:
        return (
            f"{self.api}/namespaces/{namespace}/{self.plural}" if namespace else f"{self.api}/{self.plural}"
        )


SERVICES = Kind("services", "/api/v1", "", parse_service)
ENDPOINT_SLICES = Kind("endpointslices", "/apis/discovery.k8s.io/v1", SERVICE_NAME_LABEL, parse_slice)
PODS = Kind("pods", "/api/v1", f"{INJECTED_LABEL}=true", parse_pod)


async def _api_error(resp: aiohttp.ClientResponse) -> ApiError:
    body = await resp.read()
    try:
        message = _str(_map(orjson.loads(body)).get("message"))
    except orjson.JSONDecodeError:
        message = ""
    message = message or body[:200].decode("utf-8", "replace") or str(resp.reason)
    return _status_error(resp.status, message)


def _status_error(status: int, message: str) -> ApiError:
    if status in (401, 403):
        message = f"{message} ({RBAC_HINT})"
    return Gone(status, message) if status == 410 else ApiError(status, message)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    buf = bytearray()
    async for chunk in content.iter_any():
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            if end > start:
                yield bytes(buf[start:end])
            start = end + 1
        del buf[:start]
        if len(buf) > MAX_EVENT_BYTES:
            raise KubernetesError(f"a watch event is larger than {MAX_EVENT_BYTES} bytes")
    if buf.strip():
        raise KubernetesError("the watch stream ended in the middle of an event")


class _Reflector(Generic[T]):
    """Keeps the records of one kind (in one namespace, or all) in step with the API: list, then watch."""

    def __init__(
        self,
        kind: Kind[T],
        namespace: str | None,
        *,
        credentials: Credentials,
        changed: asyncio.Event,
        on_restart: Callable[[], None],
        backoff: Backoff,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.records: dict[Key, T] = {}
        self.synced = False  # listed at least once: until every reflector is, nothing is published
        self._creds = credentials
        self._changed = changed
        self._on_restart = on_restart
        self._backoff = backoff
        self._rng = rng
        self._clock = clock
        self._url = credentials.host + kind.path(namespace)
        # aiohttp: an SSLContext, or True (default verification); False only for a plain-HTTP host (tests).
        self._ssl: ssl.SSLContext | bool = credentials.ssl or not credentials.host.startswith("http:")
        self._where = f"kind={kind.plural} namespace={namespace or '*'}"

    async def _headers(self) -> dict[str, str]:
        value = await asyncio.to_thread(self._creds.authorization)
        headers = {"Accept": "application/json"}
        if value:
            headers["Authorization"] = value
        return headers

    def _params(self, **extra: str) -> dict[str, str]:
        params = dict(extra)
        if self.kind.label_selector:
            params["labelSelector"] = self.kind.label_selector
        return params

    async def run(self, session: aiohttp.ClientSession) -> None:
        rv: str | None = None
        failures = 0  # consecutive failures to get an answer from the server
        gone = 0  # consecutive 410s with no healthy watch between them
        while True:
            try:
                if rv is None:
                    rv = await self._list(session, first=not self.synced)
                    failures = 0
                rv, healthy = await self._watch(session, rv)
                if healthy:
                    failures = gone = 0
                    continue  # the server ended the watch (its timeoutSeconds): watch on from rv
                failures += 1
                if failures == 1:
                    continue  # once may be the server's business; again and again is a loop to slow down
                reason = "the watch ended at once"
            except Gone as e:
                # The API no longer has the history from rv on: relist at once. A 410 is the server answering,
                # so it ends any run of failures (after an API server restart every old rv is Gone, and the
                # failures counted while it was down must not delay the relist); only Gone again and again
                # with nothing healthy in between is slowed down.
                rv = None
                failures = 0
                gone += 1
                reason = str(e)
                if gone == 1:
                    log.info("kubernetes watch expired, relisting %s error=%r", self._where, reason)
                    self._on_restart()
                    continue
                delay = self._backoff.delay(gone - 1, self._rng)
                self._on_restart()
                log.warning(
                    "kubernetes watch expired again, relisting %s attempt=%d retry_in=%.2fs error=%r",
                    self._where, gone, delay, reason,
                )
                await asyncio.sleep(delay)
                continue
            except KubernetesError as e:
                failures += 1
                reason = str(e)
            delay = self._backoff.delay(failures, self._rng)
            self._on_restart()
            log.warning(
                "kubernetes watch restarting %s attempt=%d retry_in=%.2fs error=%r",
                self._where,
                failures,
                delay,
                reason,
            )
            await asyncio.sleep(delay)

    async def _list(self, session: aiohttp.ClientSession, *, first: bool) -> str:
        """Replace the records with a full (paginated) list; return its resourceVersion."""
        records: dict[Key, T] = {}
        cont = ""
        rv = ""
        while True:
            params = self._params(limit=str(LIST_PAGE))
            if cont:
                params["continue"] = cont
            elif first:
                # The first list may come from the API server's watch cache (cheap when many proxies start at
                # once); relists read the latest state, so the view never goes back in time.
                params["resourceVersion"] = "0"
            try:
                limits = aiohttp.ClientTimeout(total=LIST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
                async with self._get(session, params, limits) as resp:
                    page = _map(orjson.loads(await resp.read()))
            except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as e:
                raise KubernetesError(f"list {self.kind.plural}: {type(e).__name__}: {e}") from e
            meta = _map(page.get("metadata"))
            rv = _str(meta.get("resourceVersion")) or rv
            for item in _list(page.get("items")):
                obj = _map(item)
                key = object_key(obj)
                record = self.kind.parse(obj)
                if key is not None and record is not None:
                    records[key] = record
            cont = _str(meta.get("continue"))
            if not cont:
                break
        if records != self.records or not self.synced:
            self.records = records
            self._changed.set()
        self.synced = True
        log.info("kubernetes listed %s items=%d resource_version=%s", self._where, len(records), rv)
        return rv

    @contextlib.asynccontextmanager
    async def _get(
        self, session: aiohttp.ClientSession, params: dict[str, str], limits: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET this reflector's collection with the credentials' headers and TLS; any status but 200 raises."""
        async with session.get(
            self._url,
            params=params,
            headers=await self._headers(),
            timeout=limits,
            ssl=self._ssl,
            server_hostname=self._creds.server_hostname,
            proxy=self._creds.proxy,
        ) as resp:
            if resp.status != 200:
                raise await _api_error(resp)
            yield resp

    async def _watch(self, session: aiohttp.ClientSession, rv: str) -> tuple[str, bool]:
        """Apply watch events from `rv` until the server ends the stream; return the last rv and whether
        the watch was healthy. Raises Gone when rv is too old, KubernetesError on any other failure."""
        seconds = self._rng.randint(*WATCH_SECONDS)
        params = self._params(
            watch="true", allowWatchBookmarks="true", timeoutSeconds=str(seconds), resourceVersion=rv
        )
        started = self._clock()
        events = 0
        try:
            limits = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=seconds + WATCH_READ_SLACK)
            async with self._get(session, params, limits) as resp:
                async for line in _lines(resp.content):
                    event = _map(orjson.loads(line))
                    events += 1
                    rv = self._apply(event) or rv
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as e:
            raise KubernetesError(f"watch {self.kind.plural}: {type(e).__name__}: {e}") from e
        return rv, events > 0 or self._clock() - started >= HEALTHY_WATCH_SECONDS

    def _apply(self, event: Mapping[str, object]) -> str:
        """Apply one watch event to the records; return its resourceVersion ("" if none)."""
        kind = _str(event.get("type"))
        obj = _map(event.get("object"))
        if kind == "ERROR":
            code = obj.get("code")
            raise _status_error(
                code if isinstance(code, int) else 500, _str(obj.get("message")) or "watch error"
            )
        if kind == "BOOKMARK":
            return resource_version(obj)  # nothing changed, but a later watch may start from here
        key = object_key(obj)
        if key is None:
            log.debug("kubernetes watch event without a name ignored %s type=%s", self._where, kind)
            return resource_version(obj)
        record = self.kind.parse(obj) if kind in ("ADDED", "MODIFIED") else None
        if record is None:
            # DELETED, or no longer one of ours (a Pod whose mesh label was removed, a slice without a Service).
            if self.records.pop(key, None) is not None:
                self._changed.set()
        elif self.records.get(key) != record:  # most Pod updates (status, probes) change nothing we keep
            self.records[key] = record
            self._changed.set()
        return resource_version(obj)


class KubernetesDiscovery:
    """Direct mode: this proxy watches Services, EndpointSlices and meshed Pods itself.

    The first Catalog is published once every kind has been listed completely, so a proxy never turns
    ready with a partial view (its first calls would fail with "unknown service"). After that, bursts of
    events are coalesced: at most one rebuild per `coalesce` seconds, published only when it differs.
    A watch that fails is restarted with backoff; meanwhile the last good catalog stays in service.
    `on_restart(service)` is called for each Service of the current catalog when a watch restarts.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        namespaces: Iterable[str] = (),
        on_restart: Callable[[str], None] = lambda service: None,
        coalesce: float = 0.1,
        backoff: Backoff = Backoff(),
        pod: Key | None = None,
    ) -> None:
        if not coalesce >= 0:
            raise ValueError(f"coalesce must not be negative, not {coalesce!r}")
        self._creds = credentials
        self._rng = rng
        self._clock = clock
        self._namespaces: tuple[str | None, ...] = tuple(dict.fromkeys(namespaces)) or (None,)
        self._on_restart = on_restart
        self._coalesce = coalesce
        self._backoff = backoff
        self._pod = pod  # (namespace, name) of this proxy's pod: its labels decide which Services select it
        self._services: tuple[str, ...] = ()  # of the last published catalog, for on_restart

    def _restarted(self) -> None:
        for service in self._services:
            self._on_restart(service)

    async def run(self, publish: Callable[[Catalog], None]) -> None:
        changed = asyncio.Event()

        def reflector(kind: Kind[T], ns: str | None) -> _Reflector[T]:
            return _Reflector(
                kind,
                ns,
                credentials=self._creds,
                changed=changed,
                on_restart=self._restarted,
                backoff=self._backoff,
                rng=self._rng,
                clock=self._clock,
            )

        services = [reflector(SERVICES, ns) for ns in self._namespaces]
        slices = [reflector(ENDPOINT_SLICES, ns) for ns in self._namespaces]
        pods = [reflector(PODS, ns) for ns in self._namespaces]
        everyone: list[_Reflector[ServiceRecord] | _Reflector[SliceRecord] | _Reflector[PodRecord]] = [
            *services,
            *slices,
            *pods,
        ]
        problems = ProblemLog(log, "kubernetes discovery problem problem=%r")
        log.info(
            "kubernetes discovery starting api=%s namespaces=%s",
            self._creds.host,
            ",".join(n or "*" for n in self._namespaces),
        )
        # limit=0: one connection per watch (HTTP/1.1 streams cannot share one), plus the occasional list.
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
            for r in everyone:
                tg.create_task(r.run(session))
            published: Catalog | None = None
            while True:
                await changed.wait()
                # Let the rest of a burst land (a rollout sends hundreds of events within seconds).
                await asyncio.sleep(self._coalesce)
                changed.clear()
                if not all(r.synced for r in everyone):
                    continue
                all_pods: dict[Key, PodRecord] = {}
                for r in pods:
                    all_pods.update(r.records)
                catalog, found = build_catalog(
                    [s for r in services for s in r.records.values()],
                    [s for r in slices for s in r.records.values()],
                    all_pods,
                    self._pod,
                )
                problems.report(found)
                if catalog == published:
                    continue
                published = catalog
                self._services = tuple(str(k) for k in catalog.services)
                log.info(
                    "kubernetes catalog built services=%d endpoints=%d problems=%d",
                    len(catalog),
                    sum(len(es.endpoints) for es in catalog.services.values()),
                    len(found),
                )
                publish(catalog)
