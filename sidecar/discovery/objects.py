"""Kubernetes objects as the mesh sees them: Services, EndpointSlices and meshed Pods parsed into small records,
and the pure rules turning the records of one Service into its EndpointSet.

Pure: no I/O, no logging, no clock. Shared by direct mode (the proxy watches the API itself) and the control
plane's catalog (one watch for every proxy), so both sides compute an endpoint set the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from sidecar.discovery import port_or_none
from sidecar.model import DEFAULT_WEIGHT, Catalog, Endpoint, EndpointSet, ServiceKey, selecting
from sidecar.policy import INJECTED, PREFIX, WEIGHT, parse_service_annotations, parse_weight
from sidecar.ports import INBOUND_PORT

INJECTED_LABEL = INJECTED  # set to "true" by the webhook on every meshed pod
SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by Kubernetes on every EndpointSlice of a Service
# Service ports whose appProtocol says the backend speaks HTTP/2 (gRPC) in plaintext.
GRPC_APP_PROTOCOLS = frozenset({"grpc", "h2c", "kubernetes.io/h2c", "http2"})
# What a pod's spec.serviceAccountName means when it is empty (the API server fills it in anyway).
DEFAULT_SERVICE_ACCOUNT = "default"


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
    zone: str = ""


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
    # spec.serviceAccountName: the control plane serves a pod's data only to a proxy with that identity.
    service_account: str = DEFAULT_SERVICE_ACCOUNT


# ---- parsing API objects (untyped JSON) into records --------------------------------------------------


def json_map(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}


def json_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def json_str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _flag(value: object, default: bool) -> bool:
    return value if isinstance(value, bool) else default


def object_key(obj: Mapping[str, object]) -> Key | None:
    meta = json_map(obj.get("metadata"))
    name = json_str(meta.get("name"))
    return (json_str(meta.get("namespace")), name) if name else None


def resource_version(obj: object) -> str:
    return json_str(json_map(json_map(obj).get("metadata")).get("resourceVersion"))


def parse_service(obj: Mapping[str, object]) -> ServiceRecord | None:
    key = object_key(obj)
    if key is None:
        return None
    ports = []
    for raw in json_list(json_map(obj.get("spec")).get("ports")):
        p = json_map(raw)
        number = port_or_none(p.get("port"))
        if number is not None:
            ports.append(
                ServicePort(
                    json_str(p.get("name")), number, json_str(p.get("protocol")) or "TCP", json_str(p.get("appProtocol"))
                )
            )
    annotations = json_map(json_map(obj.get("metadata")).get("annotations"))
    ours = tuple(
        sorted((k, v) for k, v in annotations.items() if k.startswith(PREFIX) and isinstance(v, str))
    )
    raw_selector = json_map(json_map(obj.get("spec")).get("selector"))
    selector = tuple(sorted((k, v) for k, v in raw_selector.items() if isinstance(v, str)))
    return ServiceRecord(key[0], key[1], tuple(ports), ours, selector)


def parse_slice(obj: Mapping[str, object]) -> SliceRecord | None:
    key = object_key(obj)
    meta = json_map(obj.get("metadata"))
    service = json_str(json_map(meta.get("labels")).get(SERVICE_NAME_LABEL))
    if key is None or not service:
        return None
    ports = []
    for raw in json_list(obj.get("ports")):
        p = json_map(raw)
        number = port_or_none(p.get("port"))
        if number is not None:  # a nil port means "all ports" (headless without ports): nothing to call
            ports.append(SlicePort(json_str(p.get("name")), number, json_str(p.get("protocol")) or "TCP"))
    endpoints = []
    for raw in json_list(obj.get("endpoints")):
        e = json_map(raw)
        addresses = tuple(a for a in (json_str(x) for x in json_list(e.get("addresses"))) if a)
        if not addresses:
            continue
        cond = json_map(e.get("conditions"))
        # discovery.k8s.io/v1: an unset `ready` or `serving` means ready, an unset `terminating` means not.
        ready = _flag(cond.get("ready"), True)
        ref = json_map(e.get("targetRef"))
        same_ns = json_str(ref.get("namespace")) in ("", key[0])
        pod = json_str(ref.get("name")) if json_str(ref.get("kind")) == "Pod" and same_ns else ""
        endpoints.append(
            SliceEndpoint(
                addresses,
                ready=ready,
                serving=_flag(cond.get("serving"), ready),
                terminating=_flag(cond.get("terminating"), False),
                pod=pod,
                zone=json_str(e.get("zone")),
            )
        )
    return SliceRecord(key[0], key[1], service, tuple(ports), tuple(endpoints))


def parse_pod(obj: Mapping[str, object]) -> PodRecord | None:
    """A meshed pod's record; None for a pod that is not meshed (the label selector is checked here too)."""
    key = object_key(obj)
    meta = json_map(obj.get("metadata"))
    if key is None or json_str(json_map(meta.get("labels")).get(INJECTED_LABEL)) != "true":
        return None
    ip = json_str(json_map(obj.get("status")).get("podIP"))
    raw_weight = json_map(meta.get("annotations")).get(WEIGHT)
    weight, problem = DEFAULT_WEIGHT, ""
    if raw_weight is not None:
        try:
            weight = parse_weight(json_str(raw_weight))
        except ValueError as e:
            problem = f"pod {key[0]}/{key[1]}: {WEIGHT}: {e} (using {DEFAULT_WEIGHT})"
    raw_labels = json_map(meta.get("labels"))
    labels = tuple(sorted((k, v) for k, v in raw_labels.items() if isinstance(v, str)))
    account = json_str(json_map(obj.get("spec")).get("serviceAccountName")) or DEFAULT_SERVICE_ACCOUNT
    return PodRecord(key[0], key[1], ip, weight, problem, labels, account)


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


def endpoint_set(
    svc: ServiceRecord, slices: Iterable[SliceRecord], pods: Mapping[Key, PodRecord]
) -> tuple[EndpointSet, list[str]]:
    """The EndpointSet of one Service from its own slices and the meshed pods they name, and one problem per
    bad annotation that matters (its policy's, and the weights of the pods it uses).

    An endpoint backed by a meshed pod is called at the pod IP on the proxy's inbound port with mTLS and the
    pod's weight; any other on the slice's port for the Service's call port, in plaintext. Work is
    proportional to this Service's slices: the control plane calls it for each Service that changed.
    """
    key = ServiceKey(svc.name, svc.namespace)
    policy, policy_problems = parse_service_annotations(dict(svc.annotations))
    problems = [f"service {key}: {p}" for p in policy_problems]
    plain_port = call_port(svc.ports)
    endpoints: dict[tuple[str, int], Endpoint] = {}
    for sl in sorted(slices, key=lambda s: s.name):
        target = None
        if plain_port is not None:
            target = next((p.port for p in sl.ports if p.name == plain_port.name and p.protocol == "TCP"), None)
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
                        zone=se.zone,
                        **conditions,
                    )
                ]
            elif target is not None:
                found = [
                    Endpoint(a, target, tls=False, pod=se.pod, zone=se.zone, **conditions) for a in se.addresses
                ]
            else:
                found = []  # not meshed, and the slice has no port for the Service's call port
            for ep in found:
                # A pod moving between slices is briefly in both: keep its most usable state.
                old = endpoints.get(ep.key)
                if old is None or _rank(ep) > _rank(old):
                    endpoints[ep.key] = ep
    ports = tuple(dict.fromkeys(p.port for p in svc.ports if p.protocol == "TCP"))
    return EndpointSet(key, tuple(endpoints.values()), policy, ports, svc.selector), problems


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
    service"); each one's endpoints as `endpoint_set` says.
    """
    by_service: dict[Key, list[SliceRecord]] = {}
    for sl in slices:
        by_service.setdefault((sl.namespace, sl.service), []).append(sl)
    problems: list[str] = []
    sets: list[EndpointSet] = []
    for svc in services:
        es, found = endpoint_set(svc, by_service.get((svc.namespace, svc.name), ()), pods)
        sets.append(es)
        problems.extend(found)
    own = pods.get(local) if local is not None else None
    chosen = selecting(sets, own.namespace, dict(own.labels)) if own is not None else None
    return Catalog(sets, selecting=chosen), list(dict.fromkeys(problems))


# ---- the kinds the mesh watches -------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Kind(Generic[T]):
    """A collection of the API (its plural, API path and label selector) and how one object becomes a record
    (None: not one of ours, as if it did not exist)."""

    plural: str
    api: str
    label_selector: str
    parse: Callable[[Mapping[str, object]], T | None]

    def path(self, namespace: str | None) -> str:
        return f"{self.api}/namespaces/{namespace}/{self.plural}" if namespace else f"{self.api}/{self.plural}"


SERVICES = Kind("services", "/api/v1", "", parse_service)
ENDPOINT_SLICES = Kind("endpointslices", "/apis/discovery.k8s.io/v1", SERVICE_NAME_LABEL, parse_slice)
PODS = Kind("pods", "/api/v1", f"{INJECTED_LABEL}=true", parse_pod)
