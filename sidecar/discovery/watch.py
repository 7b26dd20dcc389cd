"""The one Kubernetes watcher: keeps the records of one kind in step with the API (list, then watch from the
list's resourceVersion with bookmarks; relist at once on 410 Gone; jittered backoff only while the server fails).

Used by direct mode (the proxy) and by the control plane (its catalog and trust-anchor sync). Knows how to talk
to the API and nothing of what the records mean: no catalog, no policy, no writes.
"""

# Why aiohttp and not the official client for the streams: the `kubernetes` package is synchronous, and a
# blocking watch parked in a thread cannot be cancelled at shutdown (the thread sits in a socket read until
# the server's timeout, up to minutes). `kubernetes_asyncio` would be a second large dependency tree to pin
# for a few GET requests. So the official client does only what is hard to get right: loading credentials
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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiohttp
import orjson

from sidecar.discovery.objects import Key, Kind, json_list, json_map, json_str, object_key, resource_version

log = logging.getLogger(__name__)

LIST_PAGE = 500
CONNECT_TIMEOUT = 10.0
LIST_TIMEOUT = 60.0
# The server ends a watch after timeoutSeconds (randomised so that clients do not re-watch in step); a read
# timeout a little longer catches a connection that died silently (no RST: a node gone, a NAT entry lost).
WATCH_SECONDS = (300, 600)
WATCH_READ_SLACK = 30.0
# A watch that ends cleanly this soon without sending anything is not healthy (it is re-tried with backoff,
# so a server that closes every watch at once is not hammered).
HEALTHY_WATCH_SECONDS = 1.0
# aiohttp's readline() refuses lines over 128 KiB; a Pod with large annotations or managedFields can be
# bigger, so watch lines are split here, with this bound on one event.
MAX_EVENT_BYTES = 16 << 20

T = TypeVar("T")


class KubernetesError(Exception):
    """Talking to the Kubernetes API failed: credentials, transport, or an error answer."""


class ApiError(KubernetesError):
    """The API answered with an error status (HTTP, or a watch ERROR event)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {message}")


class Gone(ApiError):
    """410 Gone: the resourceVersion we hold is older than the API keeps; only a new list helps."""


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


def credentials_from(conf: Any) -> Credentials:
    """The Credentials of a loaded `kubernetes.client.Configuration` (the control plane's own client's).

    Raises KubernetesError when its TLS files cannot be read.
    """
    context: ssl.SSLContext | None = None
    try:
        if str(conf.host).startswith("https:"):
            context = ssl.create_default_context(cafile=conf.ssl_ca_cert or None)
            if not conf.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if conf.cert_file:
                context.load_cert_chain(conf.cert_file, conf.key_file or None)
    except (OSError, ssl.SSLError) as e:
        raise KubernetesError(f"cannot read the Kubernetes client's TLS files: {e}") from e

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


def load_credentials(*, service_host: str = "", service_port: str = "", kubeconfig: str | None = None) -> Credentials:
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
        return credentials_from(conf)
    # The loaders raise a zoo (ConfigException, YAML and exec-plugin errors, OSError, ssl.SSLError): at
    # this boundary they all mean the same thing, and the message names the cause.
    except Exception as e:
        raise KubernetesError(f"cannot load Kubernetes credentials from {source}: {e}") from e


# ---- list + watch --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in [d/2, d], d = min(cap, base·2^(n-1))."""

    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        d = min(self.cap, self.base * 2 ** min(max(attempt - 1, 0), 32))
        return rng.uniform(d / 2, d)


DEFAULT_BACKOFF = Backoff()


def _status_error(status: int, message: str, hint: str) -> ApiError:
    if status in (401, 403) and hint:
        message = f"{message} ({hint})"
    return Gone(status, message) if status == 410 else ApiError(status, message)


async def _api_error(resp: aiohttp.ClientResponse, hint: str) -> ApiError:
    body = await resp.read()
    try:
        message = json_str(json_map(orjson.loads(body)).get("message"))
    except orjson.JSONDecodeError:
        message = ""
    message = message or body[:200].decode("utf-8", "replace") or str(resp.reason)
    return _status_error(resp.status, message, hint)


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


def _ignore_change(key: Key, old: object, new: object) -> None:
    pass


def _nothing() -> None:
    pass


class Watcher(Generic[T]):
    """Keeps `records` (key -> record) of one kind, in one namespace or all, in step with the API.

    `on_change(key, old, new)` is called for every record that changed (old None: added; new None: removed),
    after `records` holds the new state; `on_list()` after each complete list (the first, and every relist);
    `on_restart()` whenever the watch had to be restarted by an error or a 410. All three run on the event
    loop and must not block. `synced` turns true after the first complete list.

    A list is paginated; the first may come from the API server's watch cache (`resourceVersion=0`, cheap
    when many clients start at once), relists read the latest state so the view never goes back in time.
    The watch asks for bookmarks, so a watch the server ends (its timeoutSeconds) resumes from the newest
    resourceVersion it has heard of, not from one the server may have forgotten. A 410 relists at once
    (only a run of them with nothing healthy between is slowed down); any other failure backs off with
    jitter, growing while the server keeps failing and reset by the first healthy answer.
    """

    def __init__(
        self,
        kind: Kind[T],
        credentials: Credentials,
        *,
        namespace: str | None = None,
        on_change: Callable[[Key, T | None, T | None], None] = _ignore_change,
        on_list: Callable[[], None] = _nothing,
        on_restart: Callable[[], None] = _nothing,
        backoff: Backoff = DEFAULT_BACKOFF,
        rng: random.Random,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        window: tuple[int, int] = WATCH_SECONDS,
        forbidden_hint: str = "",
    ) -> None:
        if not 1 <= window[0] <= window[1]:
            raise ValueError(f"window must be 1 <= low <= high seconds, not {window!r}")
        self.kind = kind
        self.namespace = namespace
        self.records: dict[Key, T] = {}
        self.synced = False
        self.resource_version = ""  # the newest one heard of (list, event or bookmark)
        self._creds = credentials
        self._on_change = on_change
        self._on_list = on_list
        self._on_restart = on_restart
        self._backoff = backoff
        self._rng = rng
        self._clock = clock
        self._sleep = sleep
        self._window = window
        self._hint = forbidden_hint
        self._url = credentials.host + kind.path(namespace)
        # aiohttp: an SSLContext, or True (default verification); False only for a plain-HTTP host (tests).
        self._ssl: ssl.SSLContext | bool = credentials.ssl or not credentials.host.startswith("http:")
        self.where = f"kind={kind.plural} namespace={namespace or '*'}"

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
        """Run until cancelled; never raises for what the API answers (it retries)."""
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
                self._on_restart()
                if gone == 1:
                    log.info("kubernetes watch expired, relisting %s error=%r", self.where, reason)
                    continue
                delay = self._backoff.delay(gone - 1, self._rng)
                log.warning(
                    "kubernetes watch expired again, relisting %s attempt=%d retry_in=%.2fs error=%r",
                    self.where, gone, delay, reason,
                )  # fmt: skip
                await self._sleep(delay)
                continue
            except KubernetesError as e:
                failures += 1
                reason = str(e)
            delay = self._backoff.delay(failures, self._rng)
            self._on_restart()
            log.warning(
                "kubernetes watch restarting %s attempt=%d retry_in=%.2fs error=%r",
                self.where, failures, delay, reason,
            )  # fmt: skip
            await self._sleep(delay)

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
                params["resourceVersion"] = "0"
            try:
                limits = aiohttp.ClientTimeout(total=LIST_TIMEOUT, sock_connect=CONNECT_TIMEOUT)
                async with self._get(session, params, limits) as resp:
                    page = json_map(orjson.loads(await resp.read()))
            except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as e:
                raise KubernetesError(f"list {self.kind.plural}: {type(e).__name__}: {e}") from e
            meta = json_map(page.get("metadata"))
            rv = json_str(meta.get("resourceVersion")) or rv
            for item in json_list(page.get("items")):
                obj = json_map(item)
                key = object_key(obj)
                record = self.kind.parse(obj)
                if key is not None and record is not None:
                    records[key] = record
            cont = json_str(meta.get("continue"))
            if not cont:
                break
        old, self.records = self.records, records
        self.synced = True
        self.resource_version = rv
        for key, gone in old.items():
            if key not in records:
                self._on_change(key, gone, None)
        for key, record in records.items():
            was = old.get(key)
            if was != record:
                self._on_change(key, was, record)
        self._on_list()
        log.info("kubernetes listed %s items=%d resource_version=%s", self.where, len(records), rv)
        return rv

    @contextlib.asynccontextmanager
    async def _get(
        self, session: aiohttp.ClientSession, params: dict[str, str], limits: aiohttp.ClientTimeout
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """GET this watcher's collection with the credentials' headers and TLS; any status but 200 raises."""
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
                raise await _api_error(resp, self._hint)
            yield resp

    async def _watch(self, session: aiohttp.ClientSession, rv: str) -> tuple[str, bool]:
        """Apply watch events from `rv` until the server ends the stream; return the last rv and whether
        the watch was healthy. Raises Gone when rv is too old, KubernetesError on any other failure."""
        seconds = self._rng.randint(*self._window)
        params = self._params(
            watch="true", allowWatchBookmarks="true", timeoutSeconds=str(seconds), resourceVersion=rv
        )
        started = self._clock()
        events = 0
        try:
            limits = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=seconds + WATCH_READ_SLACK)
            async with self._get(session, params, limits) as resp:
                async for line in _lines(resp.content):
                    event = json_map(orjson.loads(line))
                    events += 1
                    rv = self._apply(event) or rv
                    self.resource_version = rv
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as e:
            raise KubernetesError(f"watch {self.kind.plural}: {type(e).__name__}: {e}") from e
        return rv, events > 0 or self._clock() - started >= HEALTHY_WATCH_SECONDS

    def _apply(self, event: Mapping[str, object]) -> str:
        """Apply one watch event to the records; return its resourceVersion ("" if none)."""
        kind = json_str(event.get("type"))
        obj = json_map(event.get("object"))
        if kind == "ERROR":
            code = obj.get("code")
            raise _status_error(
                code if isinstance(code, int) else 500, json_str(obj.get("message")) or "watch error", self._hint
            )
        if kind == "BOOKMARK":
            return resource_version(obj)  # nothing changed, but a later watch may start from here
        key = object_key(obj)
        if key is None:
            log.debug("kubernetes watch event without a name ignored %s type=%s", self.where, kind)
            return resource_version(obj)
        record = self.kind.parse(obj) if kind in ("ADDED", "MODIFIED") else None
        was = self.records.get(key)
        if record is None:
            # DELETED, or no longer one of ours (a Pod whose mesh label was removed, a slice without a Service).
            if was is not None:
                del self.records[key]
                self._on_change(key, was, None)
        elif was != record:  # most Pod updates (status, probes) change nothing we keep
            self.records[key] = record
            self._on_change(key, was, record)
        return resource_version(obj)
