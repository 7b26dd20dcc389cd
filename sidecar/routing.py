"""Naming the target Service of an outbound call: dedicated port, then :authority, then gRPC service.

Routing by gRPC service never leaves the caller's trust: it considers the Services of the caller's own
namespace, and Services elsewhere only when they export their gRPC names (`kuberpc.io/export-grpc-services`);
two claimants in the same scope are a miss naming both, never a silent choice.
Pure lookups over one Catalog snapshot: no I/O, no balancing, no answering the caller (a RouteMiss says why).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from sidecar.model import Catalog, ServiceKey

DEFAULT_MEMO_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class RouteMiss:
    """No Service matched; `looked_up` names everything that was tried, for the UNAVAILABLE message."""

    looked_up: str


def grpc_service_of(path: str) -> str:
    """`/arith.Arith/Add` -> `arith.Arith`; '' when the path is not `/service/method`."""
    end = path.rfind("/")
    if end <= 1 or path[0] != "/":
        return ""
    return path[1:end]


def split_authority(authority: str) -> tuple[str, int | None]:
    """`host[:port]` -> (lower-cased host without a trailing dot, port or None); IPv6 stays bracketed."""
    host, port = authority, None
    if authority.startswith("["):
        end = authority.find("]")
        if end > 0:
            host, rest = authority[: end + 1], authority[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
    else:
        h, sep, p = authority.rpartition(":")
        if sep and p.isdigit() and ":" not in h:
            host, port = h, int(p)
    return host.lower().rstrip("."), port


def _is_address(host: str) -> bool:
    if host == "localhost" or host.startswith("["):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def service_named(authority: str, namespace: str) -> ServiceKey | str:
    """The Service an `:authority` names, whether or not it exists, or why it names none."""
    host, _ = split_authority(authority)
    if not host:
        return "empty host"
    if _is_address(host):
        return "an address, not a service name"
    labels = host.split(".")
    # name | name.ns | name.ns.svc | name.ns.svc.<cluster domain>: the cluster domain is
    # configurable in Kubernetes, so any suffix after `svc` is accepted.
    if len(labels) == 1:
        return ServiceKey(labels[0], namespace)
    if len(labels) == 2 or labels[2] == "svc":
        return ServiceKey(labels[0], labels[1])
    return "not a cluster service name"


class Router:
    """Resolves calls against one Catalog; rebuilt on every catalog update, so its memo never goes stale.

    The memo exists because resolve runs on every call: a hit is one dict lookup. It is bounded
    (oldest entry evicted first) because authorities and paths come from the app and are unbounded.
    """

    __slots__ = ("_catalog", "_memo", "_memo_limit", "_namespace")

    def __init__(self, catalog: Catalog, *, namespace: str, memo_limit: int = DEFAULT_MEMO_LIMIT) -> None:
        if memo_limit < 1:
            raise ValueError(f"memo_limit must be at least 1, not {memo_limit}")
        self._catalog = catalog
        self._namespace = namespace
        self._memo: dict[tuple[str | None, str], ServiceKey | RouteMiss] = {}
        self._memo_limit = memo_limit

    @property
    def memo_size(self) -> int:
        return len(self._memo)

    def resolve(
        self, authority: str | None, path: str, upstream: ServiceKey | None = None
    ) -> ServiceKey | RouteMiss:
        if upstream is not None:
            if self._catalog.get(upstream) is not None:
                return upstream
            return RouteMiss(
                f"no service {str(upstream)!r} (named by the dedicated upstream port) in the catalog"
            )
        memo = self._memo
        k = (authority, path)
        hit = memo.get(k)
        if hit is not None:
            return hit
        result = self._resolve(authority, path)
        if len(memo) >= self._memo_limit:
            del memo[next(iter(memo))]
        memo[k] = result
        return result

    def _by_authority(self, authority: str) -> ServiceKey | str:
        """The Service named by `authority`, or why it names none (for the miss message)."""
        key = service_named(authority, self._namespace)
        if not isinstance(key, ServiceKey):
            return key
        _, port = split_authority(authority)
        es = self._catalog.get(key)
        if es is None:
            return f"no service {str(key)!r}"
        if port is not None and es.ports and port not in es.ports:
            ports = ", ".join(str(p) for p in es.ports)
            return f"service {str(key)!r} has no port {port} (ports {ports})"
        return key

    def _by_grpc_service(self, grpc_service: str) -> ServiceKey | str:
        """The one Service in scope claiming `grpc_service`; '' when none does, why not when several do.

        The caller's own namespace comes first, as a short DNS name would; exported Services of other
        namespaces are considered only when the caller's namespace has no claimant.
        """
        claims = self._catalog.claiming(grpc_service)
        local = [k for k in claims if k.namespace == self._namespace]
        scope = "namespace " + self._namespace
        if not local:
            local = [
                k
                for k in claims
                if (es := self._catalog.get(k)) is not None and es.policy.export_grpc_services
            ]
            scope = "Services exporting their gRPC names (kuberpc.io/export-grpc-services)"
        if len(local) == 1:
            return local[0]
        if not local:
            return ""
        names = " and ".join(repr(str(k)) for k in local)
        return (
            f"gRPC service {grpc_service!r} is claimed by {names} in {scope}: name the Service in "
            ":authority or with a dedicated upstream port"
        )

    def _resolve(self, authority: str | None, path: str) -> ServiceKey | RouteMiss:
        tried: list[str] = []
        if authority:
            found = self._by_authority(authority)
            if isinstance(found, ServiceKey):
                return found
            tried.append(f"authority {authority!r} ({found})")
        grpc_service = grpc_service_of(path)
        if grpc_service:
            found_gs = self._by_grpc_service(grpc_service)
            if isinstance(found_gs, ServiceKey):
                return found_gs
            if found_gs:
                return RouteMiss(found_gs)
            tried.append(f"gRPC service {grpc_service!r} (path {path})")
        else:
            tried.append(f"path {path!r} (not /service/method)")
        return RouteMiss(f"no service for {' or '.join(tried)} in namespace {self._namespace}")
