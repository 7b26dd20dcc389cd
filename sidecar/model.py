"""Plain values shared by every layer of the proxy: services, endpoints, policies, the catalog.

No I/O and no imports from the rest of the package: everything else imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DEFAULT_WEIGHT = 100
MAX_WEIGHT = 10_000
LB_POLICIES = ("weighted-round-robin", "p2c-ewma", "round-robin", "random")
DEFAULT_LB = "weighted-round-robin"


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    """A Kubernetes Service, named the way the mesh names it: `name.namespace`."""

    name: str
    namespace: str

    def __str__(self) -> str:
        return f"{self.name}.{self.namespace}"

    @classmethod
    def parse(cls, text: str, default_namespace: str = "default") -> ServiceKey:
        """`arith`, `arith.ns`, `arith.ns.svc`, `arith.ns.svc.cluster.local` (no port)."""
        parts = text.split(".")
        if not parts[0]:
            raise ValueError(f"empty service name in {text!r}")
        if len(parts) == 1:
            return cls(parts[0], default_namespace)
        return cls(parts[0], parts[1])


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One backend of a Service.

    `tls=True`: a meshed pod, called at its proxy's inbound port (15443) with mTLS.
    `tls=False`: a plain pod, called at the Service's target port in plaintext.
    `pod` is for /debug only: never use it as a metric label.
    """

    address: str
    port: int
    weight: int = DEFAULT_WEIGHT
    tls: bool = True
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: str = ""
    zone: str = ""  # topology.kubernetes.io/zone of the endpoint, when the EndpointSlice says

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the endpoint across updates (weight and conditions may change)."""
        return (self.address, self.port)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """The `kuberpc.io/*` annotations of a Service, parsed."""

    lb: str = DEFAULT_LB
    grpc_services: tuple[str, ...] = ()
    allow: tuple[str, ...] | None = None  # None: any meshed identity
    timeout: float | None = None  # seconds; default deadline when the caller sets none
    retry_on: frozenset[str] = frozenset()
    retry_budget: float = 0.2
    # `kuberpc.io/export-grpc-services: "true"`: path routing in other namespaces may reach this Service by
    # its `grpc_services`; off by default, so a Service elsewhere cannot capture a namespace's calls.
    export_grpc_services: bool = False


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """Everything the proxy knows about one Service at one moment."""

    service: ServiceKey
    endpoints: tuple[Endpoint, ...] = ()
    policy: ServicePolicy = field(default_factory=ServicePolicy)
    ports: tuple[int, ...] = ()  # the Service's own ports, for `:authority` matching
    # The Service's pod selector (spec.selector), sorted pairs. Empty selects no pod (a Service whose
    # endpoints are written by hand): such a Service never authorizes an inbound call.
    selector: tuple[tuple[str, str], ...] = ()

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        """Whether this Service selects a pod of `namespace` with `labels` (Kubernetes' own rule)."""
        return (
            bool(self.selector)
            and self.service.namespace == namespace
            and all(labels.get(k) == v for k, v in self.selector)
        )

    def usable(self) -> tuple[Endpoint, ...]:
        """Ready endpoints; `serving && terminating` ones only when nothing else is left."""
        ready = tuple(e for e in self.endpoints if e.ready)
        if ready:
            return ready
        return tuple(e for e in self.endpoints if e.serving and e.terminating)


def selecting(sets: Iterable[EndpointSet], namespace: str, labels: Mapping[str, str]) -> frozenset[ServiceKey]:
    """The Services that select a pod of `namespace` with `labels`: the only ones whose policy may admit a
    call to it. Decided from selectors, never from which endpoints a Service lists (anyone who can write an
    EndpointSlice can list any address)."""
    return frozenset(es.service for es in sets if es.selects(namespace, labels))


class Catalog:
    """An immutable snapshot of every known Service, with the lookups routing needs.

    `selecting`: the Services that select this proxy's own pod (see `selecting()`), as the source computed
    them; None while the source has not told (inbound authorization stays closed until it has).
    """

    __slots__ = ("_by_grpc_service", "_by_key", "selecting")

    def __init__(self, sets: Iterable[EndpointSet] = (), *, selecting: frozenset[ServiceKey] | None = None) -> None:
        self._by_key: dict[ServiceKey, EndpointSet] = {}
        self._by_grpc_service: dict[str, list[ServiceKey]] = {}
        self.selecting = selecting
        for es in sorted(sets, key=lambda s: s.service):
            self._by_key[es.service] = es
            for gs in es.policy.grpc_services:
                self._by_grpc_service.setdefault(gs, []).append(es.service)

    @property
    def services(self) -> Mapping[ServiceKey, EndpointSet]:
        return self._by_key

    def get(self, key: ServiceKey) -> EndpointSet | None:
        return self._by_key.get(key)

    def claiming(self, grpc_service: str) -> tuple[ServiceKey, ...]:
        """Every Service (sorted) whose `kuberpc.io/grpc-services` lists `grpc_service`, in any namespace."""
        return tuple(self._by_grpc_service.get(grpc_service, ()))

    def __len__(self) -> int:
        return len(self._by_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self._by_key == other._by_key and self.selecting == other.selecting

    def __hash__(self) -> int:
        return hash((frozenset(self._by_key.items()), self.selecting))


@dataclass(frozen=True, slots=True)
class Upstream:
    """One entry of `kuberpc.io/upstreams`: `svc.ns:port=localport`."""

    service: ServiceKey
    port: int
    local_port: int
