"""What the control plane asks the Kubernetes API: the server version, namespace labels, token reviews.

Wraps the synchronous kubernetes client in threads with bounded timeouts; makes no decisions, logs no token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from webhook.config import parse_kubernetes_version
from webhook.identity import TokenReview, Unavailable

log = logging.getLogger(__name__)


class NamespaceLookupError(RuntimeError):
    """The namespace's labels could not be read; the API server's failurePolicy decides what happens."""


def load_api_client() -> client.ApiClient | None:
    """In-cluster credentials, else the local kubeconfig, else None (no cluster: namespace opt-in unavailable)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except ConfigException:
        try:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        except (ConfigException, OSError) as e:
            log.warning("event=no_kubernetes_credentials error=%s", type(e).__name__)
            return None
    return client.ApiClient()


async def fetch_version(api: client.ApiClient, *, request_timeout: float = 5.0) -> tuple[int, int]:
    """The API server's (major, minor), read from /version."""

    def get() -> tuple[int, int]:
        info = client.VersionApi(api).get_code(_request_timeout=request_timeout)
        return parse_kubernetes_version(f"{info.major}.{info.minor}")

    return await asyncio.to_thread(get)


class NamespaceLabels:
    """namespace name -> its labels, cached for `ttl` seconds so a rollout's burst costs one lookup."""

    def __init__(
        self,
        api: client.ApiClient | None,
        *,
        ttl: float = 5.0,
        timeout: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._cache: dict[str, tuple[float, Mapping[str, str]]] = {}

    def _read(self, name: str) -> Mapping[str, str]:
        if self._api is None:
            raise NamespaceLookupError("no Kubernetes credentials to read namespace labels")
        try:
            ns = client.CoreV1Api(self._api).read_namespace(name, _request_timeout=self._timeout)
        except ApiException as e:
            if e.status == 404:
                return {}
            raise NamespaceLookupError(f"reading namespace {name}: HTTP {e.status}") from e
        except Exception as e:  # urllib3 and socket errors have no common base worth naming
            raise NamespaceLookupError(f"reading namespace {name}: {type(e).__name__}") from e
        labels = ns.metadata.labels if ns.metadata is not None else None
        return dict(labels or {})

    async def __call__(self, name: str) -> Mapping[str, str]:
        now = self._clock()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        labels = await asyncio.to_thread(self._read, name)
        self._cache[name] = (self._clock(), labels)
        return labels


async def review_token(
    api: client.ApiClient | None, token: str, *, audience: str, request_timeout: float = 5.0
) -> TokenReview:
    """What the TokenReview API says of `token` for `audience`; Unavailable when it cannot be asked.

    A rejected token is an answer (authenticated false), not an error: the caller decides what it means.
    """
    if api is None:
        raise Unavailable("no Kubernetes credentials to review tokens")

    def create() -> TokenReview:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        try:
            answer = client.AuthenticationV1Api(api).create_token_review(body, _request_timeout=request_timeout)
        except ApiException as e:
            # Only the status: the exception's text carries the response, which echoes the request's spec.
            raise Unavailable(f"TokenReview failed: HTTP {e.status}") from e
        except Exception as e:  # urllib3 and socket errors have no common base worth naming
            raise Unavailable(f"TokenReview failed: {type(e).__name__}") from e
        status = answer.status
        if status is None:
            return TokenReview(authenticated=False, error="the TokenReview has no status")
        return TokenReview(
            authenticated=bool(status.authenticated),
            username=(status.user.username if status.user is not None else None) or "",
            audiences=tuple(status.audiences or ()),
            error=status.error or "",
        )

    try:
        # urllib3 may retry a refused connection, each try bounded by request_timeout: bound the whole call too.
        async with asyncio.timeout(2 * request_timeout):
            return await asyncio.to_thread(create)
    except TimeoutError as e:
        raise Unavailable(f"TokenReview failed: no answer within {2 * request_timeout:g} s") from e
