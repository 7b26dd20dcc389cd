"""A fake Kubernetes API server for tests, on kmock: Services, EndpointSlices, Pods and ConfigMaps with real
list/watch semantics, and the TokenReview API for the ServiceAccount tokens it issued. Test support only."""

from __future__ import annotations

import asyncio
import copy
import random
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import kmock
import pytest

Obj = dict[str, Any]
TOKEN_REVIEWS = "post /apis/authentication.k8s.io/v1/tokenreviews"
# The audience of a projected token that names none: the API server's own (its --api-audiences default).
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


@dataclass
class Watcher:
    plural: str
    namespace: str | None
    bookmarks: bool
    queue: asyncio.Queue[Obj | None] = field(default_factory=asyncio.Queue)


def _matches(obj: Obj, selector: str) -> bool:
    """The two label selector forms the proxy uses: `key` (exists) and `key=value`."""
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, eq, value = term.partition("=")
        if key not in labels or (eq and labels[key] != value):
            return False
    return True


class FakeCluster:
    """Objects with resourceVersions, lists (paginated) and watches from a resourceVersion; TokenReviews.

    Like the real API server: a watch from a resourceVersion older than the kept history is answered 410;
    `expire` sends the ERROR 410 event a live watch gets when it falls behind; `bookmark` sends BOOKMARK
    events to watches that asked for them; `end_watches` ends streams as the server's timeoutSeconds does.
    `stop`/`start` take the server off the network and back on the same port.

    `issue_token` is what TokenRequest gives the kubelet for a projected volume: a token the TokenReview
    API then vouches for, for its audience only, as the real API server does.

    kmock serves it (HTTP, request parsing and recording, Kubernetes error bodies); the list and watch
    answers are these reactions because kmock's own emulator replays every object as ADDED on each watch,
    ignores resourceVersion and label selectors, and has no 410 or bookmarks: the behaviours under test.
    The handler is kmock's stateless scaffold, not its emulator: the emulator stores every created object,
    so it would answer a second TokenReview (a create-only kind, never stored by the API server) with 409.
    """

    PLURALS: ClassVar[dict[str, str]] = {
        "Service": "services",
        "EndpointSlice": "endpointslices",
        "Pod": "pods",
        "ConfigMap": "configmaps",
    }

    def __init__(self, handler: kmock.KubernetesScaffold) -> None:
        self.handler = handler
        self.rv = 1000
        self.objects: dict[tuple[str, str, str], Obj] = {}
        self.history: list[tuple[int, str, Obj]] = []
        self.oldest = 0  # watches from an older resourceVersion get 410 Gone
        self.watchers: list[Watcher] = []
        # Lists of these plurals (and TokenReviews, under "tokenreviews") wait for the event.
        self.gates: dict[str, asyncio.Event] = {}
        self.forbidden: set[str] = set()
        self.down = False  # while stopping: answer 503 so no new stream holds the server open
        self.server: kmock.Server | None = None
        self.port: int | None = None
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}  # token -> (username, audiences)
        self.reviews: list[tuple[str, tuple[str, ...]]] = []  # (token, audiences asked), as received
        # authenticate=True: lists and watches need a bearer token issued for API_AUDIENCE (else 401), and
        # `readers` records who made them, as the API server's authentication would see them.
        self.authenticate = False
        self.readers: set[str] = set()
        handler[kmock.action.LIST] << self._list
        handler[kmock.action.WATCH] << self._watch
        handler[TOKEN_REVIEWS] << self._review

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.down = False
        self.server = kmock.Server(self.handler, port=self.port)
        await self.server.__aenter__()
        self.port = self.server.port

    async def stop(self) -> None:
        assert self.server is not None
        self.down = True
        self.end_watches()  # otherwise the server waits for open streams before it closes
        await asyncio.sleep(0)
        await self.server.__aexit__(None, None, None)
        self.server = None

    def requests(self, action: kmock.action, plural: str) -> list[kmock.Request]:
        return [
            r
            for r in self.handler
            if r.action == action and r.resource is not None and r.resource.plural == plural
        ]

    # -- changing the cluster

    def put(self, *objects: Obj, silent: bool = False) -> None:
        """Create or update objects; `silent`: the change is never sent to watches (their history is lost)."""
        for obj in objects:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            plural, meta = self.PLURALS[obj["kind"]], obj["metadata"]
            key = (plural, meta["namespace"], meta["name"])
            event = {"type": "MODIFIED" if key in self.objects else "ADDED", "object": obj}
            self.objects[key] = obj
            self._emit(plural, event, silent)

    def delete(self, obj: Obj) -> None:
        plural, meta = self.PLURALS[obj["kind"]], obj["metadata"]
        gone = self.objects.pop((plural, meta["namespace"], meta["name"]))
        self.rv += 1
        gone = copy.deepcopy(gone)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(plural, {"type": "DELETED", "object": gone}, silent=False)

    def _emit(self, plural: str, event: Obj, silent: bool) -> None:
        if silent:
            self.oldest = self.rv
            return
        self.history.append((self.rv, plural, event))
        for w in self.watchers:
            if w.plural == plural:
                w.queue.put_nowait(event)

    def expire(self, plural: str) -> None:
        self.oldest = self.rv
        status = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
        for w in self.watchers:
            if w.plural == plural:
                w.queue.put_nowait({"type": "ERROR", "object": status})

    def bookmark(self, plural: str) -> None:
        kind = next(k for k, p in self.PLURALS.items() if p == plural)
        for w in self.watchers:
            if w.plural == plural and w.bookmarks:
                w.queue.put_nowait(
                    {
                        "type": "BOOKMARK",
                        "object": {"kind": kind, "metadata": {"resourceVersion": str(self.rv)}},
                    }
                )

    def compact(self) -> None:
        """Forget the event history: only watches from the current resourceVersion are still served."""
        self.oldest = self.rv
        self.history.clear()

    def end_watches(self, plural: str | None = None) -> None:
        for w in self.watchers:
            if plural is None or w.plural == plural:
                w.queue.put_nowait(None)

    def issue_token(self, namespace: str, service_account: str, *, audience: str) -> str:
        """A new ServiceAccount token for `audience` (opaque here: the API server alone reads it)."""
        token = f"eyJhbGciOiJSUzI1NiJ9.{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(16)}"
        self.tokens[token] = (f"system:serviceaccount:{namespace}:{service_account}", (audience,))
        return token

    # -- serving

    async def _review(self, request: kmock.Request) -> Obj:
        """authentication.k8s.io/v1 TokenReview: valid for the asked audiences it was issued for, or rejected."""
        if self.down:
            raise kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="shutting down")
        spec = request.data.get("spec") or {}
        token, asked = str(spec.get("token", "")), tuple(spec.get("audiences") or ())
        self.reviews.append((token, asked))
        if (gate := self.gates.get("tokenreviews")) is not None:
            await gate.wait()
        status: Obj = {"authenticated": False, "error": "invalid bearer token"}
        if token in self.tokens:
            username, issued_for = self.tokens[token]
            granted = [a for a in issued_for if a in asked] if asked else list(issued_for)
            if granted:
                groups = ["system:serviceaccounts", f"system:serviceaccounts:{username.split(':')[2]}"]
                status = {
                    "authenticated": True,
                    "user": {"username": username, "groups": groups},
                    "audiences": granted,
                }
            else:
                status = {
                    "authenticated": False,
                    "error": "token audiences are invalid for the target audiences",
                }
        # The real API server echoes the spec, token included.
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec,
            "status": status,
        }

    def _authenticate(self, request: kmock.Request) -> None:
        if not self.authenticate:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        username, audiences = self.tokens.get(token, ("", ()))
        if scheme != "Bearer" or API_AUDIENCE not in audiences:
            raise kmock.KubernetesError(status=401, reason="Unauthorized", message="Unauthorized")
        self.readers.add(username)

    def _visible(self, plural: str, namespace: str | None, obj: Obj, selector: str) -> bool:
        return (namespace is None or obj["metadata"]["namespace"] == namespace) and _matches(obj, selector)

    async def _list(self, request: kmock.Request) -> Obj:
        assert request.resource is not None and request.resource.plural is not None
        plural = request.resource.plural
        if self.down:
            raise kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="shutting down")
        self._authenticate(request)
        if plural in self.forbidden:
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f'{plural} is forbidden: User "system:serviceaccount:default:client" cannot list resource',
            )
        if (gate := self.gates.get(plural)) is not None:
            await gate.wait()
        selector = request.params.get("labelSelector", "")
        items = [
            o
            for (p, _, _), o in sorted(self.objects.items())
            if p == plural and self._visible(p, request.namespace, o, selector)
        ]
        start = int(request.params.get("continue") or 0)
        limit = int(request.params.get("limit") or len(items) or 1)
        page = items[start : start + limit]
        more = start + limit < len(items)
        return {
            "kind": "List",
            "metadata": {
                "resourceVersion": str(self.rv),
                **({"continue": str(start + limit)} if more else {}),
            },
            "items": page,
        }

    def _watch(self, request: kmock.Request) -> AsyncIterator[bytes | Obj]:
        assert request.resource is not None and request.resource.plural is not None
        plural = request.resource.plural
        if self.down:
            raise kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="shutting down")
        self._authenticate(request)
        since = int(request.params.get("resourceVersion") or 0)
        if since < self.oldest:
            raise kmock.KubernetesError(
                status=410, reason="Expired", message=f"too old resource version: {since} ({self.oldest})"
            )
        watcher = Watcher(plural, request.namespace, request.params.get("allowWatchBookmarks") == "true")
        backlog = [e for rv, p, e in self.history if p == plural and rv > since]
        self.watchers.append(watcher)  # no await between taking the backlog and subscribing: no gap
        return self._stream(watcher, backlog, request.params.get("labelSelector", ""))

    async def _stream(
        self, watcher: Watcher, backlog: list[Obj], selector: str
    ) -> AsyncIterator[bytes | Obj]:
        try:
            yield b""  # send the response headers now, as the API server does
            for event in backlog:
                if self._visible(watcher.plural, watcher.namespace, event["object"], selector):
                    yield event
            while (event := await watcher.queue.get()) is not None:
                if event["type"] in ("ERROR", "BOOKMARK") or self._visible(
                    watcher.plural, watcher.namespace, event["object"], selector
                ):
                    yield event
        finally:
            self.watchers.remove(watcher)


@pytest.fixture
async def cluster() -> AsyncIterator[FakeCluster]:
    async with kmock.KubernetesScaffold() as handler:
        fake = FakeCluster(handler)
        await fake.start()
        try:
            yield fake
        finally:
            if fake.server is not None:
                await fake.stop()


def kubeconfig(path: Path, url: str, *, token_file: Path | None = None) -> Path:
    """A kubeconfig for the fake API at `url`: a fixed token, or the token in `token_file` (read by the client)."""
    user = f'tokenFile: "{token_file}"' if token_file is not None else "token: t0k3n"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{url}"}}}}]
users: [{{name: proxy, user: {{{user}}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: proxy}}}}]
current-context: fake
"""
    )
    return path


def free_loopback_addresses(n: int, ports: Iterable[int] = (15443,)) -> list[str]:
    """127.0.0.x addresses whose `ports` are all free: pods' fixed ports (meshed peers are called on 15443)."""
    wanted = tuple(ports)
    found: list[str] = []
    for x in random.Random().sample(range(2, 250), 60):
        if all(_free(f"127.0.0.{x}", port) for port in wanted):
            found.append(f"127.0.0.{x}")
            if len(found) == n:
                return found
    raise AssertionError(f"no {n} free 127.0.0.x with ports {wanted} free")


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
