"""What to inject into a Pod, decided by pure functions: skip, deny or a JSON Patch with its warnings.

No I/O, no clock and no cluster access: the caller passes the Pod, its namespace's labels and the config.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, NamedTuple, NotRequired, TypedDict

from sidecar.policy import UpstreamsError, format_upstreams, parse_upstreams, parse_weight
from webhook import annotations as a
from webhook.config import InjectorConfig, parse_positive_quantity, quantity_value

Json = dict[str, "Json"] | list["Json"] | str | int | float | bool | None
JsonObject = dict[str, Json]


class JsonPatchOp(TypedDict):
    op: Literal["add", "replace", "remove"]
    path: str
    value: NotRequired[Json]


Result = Literal["injected", "skipped", "denied"]

_INTEGER = re.compile(r"^[+-]?\d{1,12}$")
_SECONDS = re.compile(r"^\d{1,7}(?:\.\d{1,6})?$")
_SHOWN_CHARS = 40  # API servers truncate warnings past 120 characters: keep echoed values short


def show(value: str) -> str:
    """An annotation value as it may appear in a message: quoted, escaped, truncated."""
    text = value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
    return ascii(text)


def escape(key: str) -> str:
    """A map key as one JSON Pointer segment (RFC 6901): `~` -> `~0`, `/` -> `~1`."""
    return key.replace("~", "~0").replace("/", "~1")


# --- tolerant readers: a fuzzed Pod may hold any JSON where a map or list is expected ---
# JSON objects always decode to dict, so `dict` is the type checked (cheaper than the `Mapping` ABC).


def _map(obj: object, key: str) -> Mapping[str, object] | None:
    v = obj.get(key) if isinstance(obj, dict) else None
    return v if isinstance(v, dict) else None


def _list(obj: object, key: str) -> Sequence[object] | None:
    v = obj.get(key) if isinstance(obj, dict) else None
    return v if isinstance(v, list) else None


def _str_map(obj: object, key: str) -> dict[str, str]:
    m = _map(obj, key)
    return {k: v for k, v in m.items() if isinstance(k, str) and isinstance(v, str)} if m else {}


def pod_labels(pod: Mapping[str, object]) -> dict[str, str]:
    return _str_map(_map(pod, "metadata"), "labels")


def _all_are(items: Iterable[object], kind: type) -> bool:
    # A plain loop: all() over a generator costs a generator frame per call, on every admission.
    for item in items:
        if not isinstance(item, kind):
            return False
    return True


def shape_problem(pod: Mapping[str, object]) -> str | None:
    """Why this object cannot be patched as a Pod (the API server would reject it anyway), or None."""
    metadata = pod.get("metadata", {})
    if not isinstance(metadata, dict):
        return "metadata is not an object"
    for key in ("annotations", "labels"):
        m = metadata.get(key)
        if m is not None and not (isinstance(m, dict) and _all_are(m.values(), str)):
            return f"metadata.{key} is not a map of strings"
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return "spec is missing"
    containers = spec.get("containers")
    if not isinstance(containers, list) or not containers:
        return "spec.containers is empty"
    for key in ("containers", "initContainers", "volumes"):
        items = spec.get(key)
        if items is not None and not (isinstance(items, list) and _all_are(items, dict)):
            return f"spec.{key} is not a list of objects"
    return None


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether a Pod should get the proxy, and why (the reason is shown as an admission warning on skip)."""

    inject: bool
    reason: str


def needs_namespace_labels(facts: PodFacts) -> bool:
    """False when the Pod's own `kuberpc.io/inject`, or an injection already made, decides without its namespace."""
    return facts.inject not in (a.INJECT_ENABLED, a.INJECT_DISABLED) and not facts.injected


def _already_injected(
    annotations: Mapping[str, object] | None, labels: Mapping[str, object] | None, spec: Mapping[str, object] | None
) -> bool:
    """Either marker, or a container already named like the proxy (a hand-made or half-removed injection)."""
    if (annotations is not None and isinstance(annotations.get(a.INJECTED), str)) or (
        labels is not None and labels.get(a.INJECTED) == a.INJECTED_LABEL_VALUE
    ):
        return True
    for key in ("containers", "initContainers"):
        for c in _list(spec, key) or ():
            if isinstance(c, dict) and c.get("name") == a.PROXY_CONTAINER:
                return True
    return False


# PatchLayout and PodFacts are NamedTuples rather than frozen dataclasses: every admission builds one of each,
# and a frozen dataclass's __init__ (one object.__setattr__ per field) costs several times a tuple's.


class PatchLayout(NamedTuple):
    """What the patch reads from the Pod besides the settings: which lists and maps exist, which keys it keeps."""

    containers: bool  # spec.containers is a non-empty list (else the patch writes the whole list)
    init_containers: bool
    volumes: bool
    annotations: bool  # metadata.annotations is a map (else the patch writes the whole map)
    labels: bool
    kept: tuple[str, ...]  # annotations the injector would write that the Pod already has (the Pod's win)


_KEEPABLE = (a.PROMETHEUS_SCRAPE, a.PROMETHEUS_PORT, a.PROMETHEUS_PATH, a.DEFAULT_CONTAINER)


class PodFacts(NamedTuple):
    """Everything the injector reads from a Pod, read once: decisions and patches are functions of these alone.

    So pods with equal facts (a StatefulSet's replicas, say, that differ only in names and their own labels)
    get the same answer, and the facts can key a memo of it.
    """

    annotations: tuple[tuple[str, str], ...]  # those with string values, in the Pod's order
    inject: str | None  # the `kuberpc.io/inject` annotation
    namespace: str  # metadata.namespace as text, "" when absent
    injected: bool  # either marker, or a container already named like the proxy
    problem: str | None  # see shape_problem
    host_network: bool
    clashing_volumes: tuple[str, ...]  # the Pod's volumes named like the proxy's, in order
    app_container: str | None  # the first container's name
    container_ports: tuple[tuple[str, int], ...]  # (container name, port) of every valid containerPort
    first_port: int | None  # the first container's first valid port
    grace_seconds: int  # terminationGracePeriodSeconds, or its default
    layout: PatchLayout


def read_pod(pod: Mapping[str, object]) -> PodFacts:
    """The facts of any JSON object handed over as a Pod (a malformed one included: see `problem`)."""
    metadata = _map(pod, "metadata")
    spec = _map(pod, "spec")
    raw_annotations = _map(metadata, "annotations")
    raw_labels = _map(metadata, "labels")
    ann = _str_map(metadata, "annotations")
    containers = _list(spec, "containers") or []
    volumes = _list(spec, "volumes") or ()
    first = containers[0] if containers else None
    app_container = first.get("name") if isinstance(first, dict) else None
    first_ports = _container_ports([first]) if first is not None else []
    grace = spec.get("terminationGracePeriodSeconds") if spec is not None else None
    clashing = []
    for v in volumes:
        name = v.get("name") if isinstance(v, dict) else None
        if isinstance(name, str) and name in PROXY_VOLUME_NAMES:
            clashing.append(name)
    kept = []
    for key in _KEEPABLE:
        if key in ann:
            kept.append(key)
    # Positional: a NamedTuple built from keywords costs a dict's worth more (field order as in the class).
    return PodFacts(
        tuple(ann.items()),
        ann.get(a.INJECT),
        str((metadata or {}).get("namespace") or ""),
        _already_injected(raw_annotations, raw_labels, spec),
        shape_problem(pod),
        spec is not None and spec.get("hostNetwork") is True,
        tuple(clashing),
        app_container if isinstance(app_container, str) else None,
        tuple(_container_ports(containers)),
        first_ports[0][1] if first_ports else None,
        grace if isinstance(grace, int) and not isinstance(grace, bool) else a.DEFAULT_GRACE_SECONDS,
        PatchLayout(
            bool(containers),
            bool(_list(spec, "initContainers")),
            bool(volumes),
            raw_annotations is not None,
            raw_labels is not None,
            tuple(kept),
        ),
    )


def _needs_injection(
    f: PodFacts,
    ann: Mapping[str, str],
    ns_labels: Mapping[str, str],
    cfg: InjectorConfig,
    *,
    namespace: str,
) -> Decision:
    ns = namespace or f.namespace
    if ns == cfg.control_plane_namespace:
        return Decision(False, f"namespace {ns} is kuberpc's control plane")
    if f.injected:
        return Decision(False, "already injected")
    wanted = ann.get(a.INJECT)
    if wanted == a.INJECT_DISABLED:
        return Decision(False, f"{a.INJECT} is {a.INJECT_DISABLED}")
    if wanted != a.INJECT_ENABLED and ns_labels.get(a.NAMESPACE_INJECT_LABEL) != a.INJECT_ENABLED:
        if wanted is not None:  # e.g. "true": say what was expected rather than only "not opted in"
            return Decision(False, f"{a.INJECT} is {show(wanted)}, not {a.INJECT_ENABLED} or {a.INJECT_DISABLED}")
        return Decision(False, f"not opted in ({a.INJECT}: {a.INJECT_ENABLED} on the pod or its namespace)")
    if f.problem is not None:
        return Decision(False, f"not a valid pod: {f.problem}")
    if f.host_network:
        return Decision(False, "hostNetwork pods share the node's ports and cannot carry a proxy")
    return Decision(True, "opted in")


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """Everything the injected container depends on, after annotations were validated."""

    image: str
    app_port: int | None  # None: the app serves nothing, inbound is off
    upstreams: str  # normalised `svc.ns:port=localport,...`
    log_level: str
    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str
    drain_seconds: str
    native: bool
    startup_hold: bool
    app_container: str | None
    weight: str | None  # corrected `kuberpc.io/weight` to write back, or None to leave it
    discovery: str = a.DEFAULT_DISCOVERY  # control-plane | direct
    discovery_scope: str = a.DEFAULT_DISCOVERY_SCOPE  # direct only
    access_log: str = "off"  # KUBERPC_ACCESS_LOG: "json" writes one line per call


@dataclass(frozen=True, slots=True)
class Plan:
    settings: ProxySettings
    warnings: tuple[str, ...]


class Denied(Exception):
    """The pod could not work with these annotations; the message names each one and its value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("kuberpc: " + "; ".join(problems))


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError
    return int(text)


def _container_ports(containers: Sequence[object]) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for c in containers:
        for p in _list(c, "ports") or ():
            port = p.get("containerPort") if isinstance(p, dict) else None
            if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
                name = (c.get("name") if isinstance(c, dict) else None) or "?"
                out.append((str(name), port))
    return out


def _max_quantity(x: str, y: str) -> str:
    return x if quantity_value(x) >= quantity_value(y) else y


def _seconds(value: Decimal) -> str:
    return str(int(value)) if value == value.to_integral_value() else str(value)


def unknown_annotations(ann: Mapping[str, str]) -> list[str]:
    """One warning per kuberpc.io/ annotation the injector does not know (a typo is otherwise silently ignored)."""
    warnings = []
    for key in sorted(k for k in ann if k.startswith(a.PREFIX) and k not in a.POD_ANNOTATIONS):
        if key in a.SERVICE_ANNOTATIONS:
            warnings.append(f"{key}={show(ann[key])}: a Service annotation, it does nothing on a pod")
            continue
        # Compared without the shared prefix, which would make every key look close to every other.
        names = sorted(k.removeprefix(a.PREFIX) for k in a.POD_ANNOTATIONS)
        near = difflib.get_close_matches(key.removeprefix(a.PREFIX), names, n=1, cutoff=0.75)
        hint = f"; did you mean {a.PREFIX}{near[0]}?" if near else ""
        warnings.append(f"{show(key)}={show(ann[key])}: unknown annotation, ignored{hint}")
    return warnings


def _plan_injection(f: PodFacts, ann: Mapping[str, str], cfg: InjectorConfig, *, namespace: str) -> Plan:
    ns = namespace or f.namespace or "default"
    problems = [f"volume {show(name)} already exists; the proxy needs that name" for name in f.clashing_volumes]
    warnings: list[str] = []

    app_ports = f.container_ports
    for cname, port in app_ports:
        if port in a.PROXY_PORTS:
            problems.append(f"container {show(cname)} port {port} is one of the proxy's ports (15001, 15443, 15090, 15091)")

    app_port: int | None = None
    if a.APP_PORT in ann:
        try:
            app_port = _port(ann[a.APP_PORT].strip())
            if app_port in a.PROXY_PORTS:
                problems.append(f"{a.APP_PORT}: {app_port} is one of the proxy's ports (15001, 15443, 15090, 15091)")
        except ValueError:
            problems.append(f"{a.APP_PORT}: {show(ann[a.APP_PORT])} is not a port (1-65535)")
    else:
        app_port = f.first_port

    upstreams = ""
    if a.UPSTREAMS in ann:
        try:
            parsed = parse_upstreams(ann[a.UPSTREAMS], ns)
        except UpstreamsError as e:
            problems += [f"{a.UPSTREAMS}: {p}" for p in e.problems]
        else:
            # The parser refused the proxy's ports and repeats; what else this pod listens on is known only here.
            taken: dict[int, str] = {}
            for cname, port in app_ports:
                taken.setdefault(port, f"a port of container {show(cname)}")
            if app_port is not None:
                taken.setdefault(app_port, "the app port")
            for up in parsed:
                if up.local_port in taken:
                    problems.append(
                        f"{a.UPSTREAMS}: {up.service}:{up.port}={up.local_port}: "
                        f"local port {up.local_port} is {taken[up.local_port]}"
                    )
            upstreams = format_upstreams(parsed)

    res = cfg.resources
    cpu_req, mem_req, cpu_lim, mem_lim = res.cpu_request, res.memory_request, res.cpu_limit, res.memory_limit
    for key, kind in ((a.PROXY_CPU, "cpu"), (a.PROXY_MEMORY, "memory")):
        if key not in ann:
            continue
        value = ann[key].strip()
        try:
            parse_positive_quantity(value)
        except ValueError:
            problems.append(f"{key}: {show(ann[key])} is not a Kubernetes quantity (e.g. 100m, 128Mi)")
            continue
        # The annotation sets the request; the limit rises with it so the pod stays valid (request <= limit).
        if kind == "cpu":
            cpu_req, cpu_lim = value, _max_quantity(cpu_lim, value)
        else:
            mem_req, mem_lim = value, _max_quantity(mem_lim, value)

    image = cfg.image
    if a.PROXY_IMAGE in ann:
        image = ann[a.PROXY_IMAGE].strip()
        if not image or any(ch.isspace() for ch in image) or len(image) > 512:
            problems.append(f"{a.PROXY_IMAGE}: {show(ann[a.PROXY_IMAGE])} is not an image reference")

    grace_s = f.grace_seconds
    drain = Decimal(min(a.MAX_DRAIN_SECONDS, max(a.MIN_DRAIN_SECONDS, grace_s - a.DRAIN_MARGIN_SECONDS)))
    if a.DRAIN_SECONDS in ann:
        text = ann[a.DRAIN_SECONDS].strip()
        if not _SECONDS.match(text) or Decimal(text) > a.MAX_DRAIN_SECONDS:
            problems.append(f"{a.DRAIN_SECONDS}: {show(ann[a.DRAIN_SECONDS])} is not a number of seconds (0-3600)")
        else:
            drain = Decimal(text)
            if drain > grace_s:
                warnings.append(
                    f"{a.DRAIN_SECONDS}: {_seconds(drain)} exceeds terminationGracePeriodSeconds {grace_s}"
                )

    weight: str | None = None
    if a.WEIGHT in ann:
        text = ann[a.WEIGHT].strip()
        try:
            parse_weight(text)  # the proxies' reading: what it takes is left as it is
        except ValueError:
            # Rewritten to a value the proxies read as meant (else they would fall back to the default).
            if not _INTEGER.match(text):
                weight = str(a.DEFAULT_WEIGHT)
                warnings.append(f"{a.WEIGHT}: {show(ann[a.WEIGHT])} is not an integer; using {weight}")
            else:
                weight = str(min(a.MAX_WEIGHT, max(0, int(text))))
                if 0 <= int(text) <= a.MAX_WEIGHT:  # "+5", "-0": in range, but not as the proxies spell it
                    warnings.append(f"{a.WEIGHT}: {show(text)} is written {weight}")
                else:
                    warnings.append(f"{a.WEIGHT}: {show(text)} is outside 0-{a.MAX_WEIGHT}; using {weight}")

    native = cfg.native_by_default
    if a.NATIVE_SIDECAR in ann:
        text = ann[a.NATIVE_SIDECAR].strip().lower()
        if text in ("true", "false"):
            native = text == "true"
            if native and cfg.kubernetes_version is not None and cfg.kubernetes_version < a.NATIVE_SIDECAR_MIN_VERSION:
                warnings.append(f"{a.NATIVE_SIDECAR}: true on Kubernetes {cfg.kubernetes_version[0]}.{cfg.kubernetes_version[1]} (needs 1.29)")
        else:
            warnings.append(f"{a.NATIVE_SIDECAR}: {show(ann[a.NATIVE_SIDECAR])} is not true/false; using {str(native).lower()}")

    log_level = cfg.log_level
    if a.PROXY_LOG_LEVEL in ann:
        text = ann[a.PROXY_LOG_LEVEL].strip().lower()
        if text in a.LOG_LEVELS:
            log_level = text
        else:
            warnings.append(f"{a.PROXY_LOG_LEVEL}: {show(ann[a.PROXY_LOG_LEVEL])} is unknown; using {log_level}")

    discovery = a.DEFAULT_DISCOVERY
    if a.DISCOVERY in ann:
        text = ann[a.DISCOVERY].strip().lower()
        if text in a.DISCOVERY_MODES:
            discovery = text
        else:
            warnings.append(
                f"{a.DISCOVERY}: {show(ann[a.DISCOVERY])} is not one of {', '.join(a.DISCOVERY_MODES)}; using {discovery}"
            )
    scope = a.DEFAULT_DISCOVERY_SCOPE
    if a.DISCOVERY_SCOPE in ann and discovery != a.DISCOVERY_DIRECT:
        warnings.append(f"{a.DISCOVERY_SCOPE}: applies to {a.DISCOVERY}: {a.DISCOVERY_DIRECT} only; ignored")
    elif a.DISCOVERY_SCOPE in ann:
        text = ann[a.DISCOVERY_SCOPE].strip().lower()
        if text in a.DISCOVERY_SCOPES:
            scope = text
        else:
            warnings.append(
                f"{a.DISCOVERY_SCOPE}: {show(ann[a.DISCOVERY_SCOPE])} is not one of {', '.join(a.DISCOVERY_SCOPES)}; using {scope}"
            )

    access_log = "off"
    if a.ACCESS_LOG in ann:
        text = ann[a.ACCESS_LOG].strip().lower()
        if text in a.ACCESS_LOG_FORMATS:
            access_log = text
        else:
            warnings.append(f"{a.ACCESS_LOG}: {show(ann[a.ACCESS_LOG])} is not json or off; using off")

    warnings.extend(unknown_annotations(ann))

    if problems:
        raise Denied(problems)
    settings = ProxySettings(
        image=image,
        app_port=app_port,
        upstreams=upstreams,
        log_level=log_level,
        cpu_request=cpu_req,
        memory_request=mem_req,
        cpu_limit=cpu_lim,
        memory_limit=mem_lim,
        drain_seconds=_seconds(drain),
        native=native,
        startup_hold=cfg.startup_hold,
        app_container=f.app_container,
        weight=weight,
        discovery=discovery,
        discovery_scope=scope,
        access_log=access_log,
    )
    return Plan(settings, tuple(warnings))


def _field_env(name: str, path: str) -> JsonObject:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _probe(path: str, *, period: int, failures: int) -> JsonObject:
    return {
        "httpGet": {"path": path, "port": a.ADMIN_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 1,
    }


def proxy_container(cfg: InjectorConfig, s: ProxySettings) -> JsonObject:
    """The `kuberpc-proxy` container; its env is exactly what sidecar/config.py reads."""
    env: list[Json] = []
    if s.app_port is not None:
        env.append({"name": "KUBERPC_APP_PORT", "value": str(s.app_port)})
    else:
        env.append({"name": "KUBERPC_INBOUND_ADDR", "value": "off"})
    if s.upstreams:
        env.append({"name": "KUBERPC_UPSTREAMS", "value": s.upstreams})
    if s.access_log != "off":
        env.append({"name": "KUBERPC_ACCESS_LOG", "value": s.access_log})
    direct = s.discovery == a.DISCOVERY_DIRECT
    if direct:
        env.append({"name": "KUBERPC_DISCOVERY", "value": "kubernetes"})
        if s.discovery_scope == "namespace":
            env.append(_field_env("KUBERPC_DISCOVERY_NAMESPACES", "metadata.namespace"))
    else:
        env.append({"name": "KUBERPC_DISCOVERY", "value": f"control-plane:{cfg.discovery_addr}"})
    env += [
        {"name": "KUBERPC_TLS_CERT", "value": a.TLS_CERT_PATH},
        {"name": "KUBERPC_TLS_KEY", "value": a.TLS_KEY_PATH},
        {"name": "KUBERPC_TRUST_ANCHORS", "value": a.TRUST_ANCHORS_PATH},
        {"name": "KUBERPC_IDENTITY_ADDR", "value": cfg.identity_addr},
        {"name": "KUBERPC_IDENTITY_TOKEN", "value": a.TOKEN_PATH},
        {"name": "KUBERPC_TRUST_DOMAIN", "value": cfg.trust_domain},
        {"name": "KUBERPC_LOG_LEVEL", "value": s.log_level},
        {"name": "KUBERPC_DRAIN_SECONDS", "value": s.drain_seconds},
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("POD_IP", "status.podIP"),
        _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ]
    mounts: list[Json] = [
        {"name": a.IDENTITY_VOLUME, "mountPath": a.IDENTITY_DIR},
        {"name": a.TRUST_ANCHORS_VOLUME, "mountPath": a.TRUST_ANCHORS_DIR, "readOnly": True},
        {"name": a.TOKEN_VOLUME, "mountPath": a.TOKEN_DIR, "readOnly": True},
    ]
    if direct:  # with the control plane the pod holds no Kubernetes API token at all
        mounts.append({"name": a.API_ACCESS_VOLUME, "mountPath": a.API_ACCESS_DIR, "readOnly": True})
    container: JsonObject = {
        "name": a.PROXY_CONTAINER,
        "image": s.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "args": list(a.PROXY_ARGS),
        "ports": [
            {"name": a.PORT_NAMES[p], "containerPort": p, "protocol": "TCP"}
            for p in (a.OUTBOUND_PORT, a.INBOUND_PORT, a.ADMIN_PORT)
        ],
        "env": env,
        "resources": {
            "requests": {"cpu": s.cpu_request, "memory": s.memory_request},
            "limits": {"cpu": s.cpu_limit, "memory": s.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": a.PROXY_UID,
            "runAsGroup": a.PROXY_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
        # Startup allows two minutes for the first certificate; readiness then follows /ready.
        "startupProbe": _probe(a.READY_PATH, period=1, failures=120),
        "readinessProbe": _probe(a.READY_PATH, period=5, failures=3),
        "livenessProbe": _probe(a.LIVE_PATH, period=10, failures=3),
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if s.native:
        # A native sidecar starts before the app, outlives it, and does not keep a Job running.
        container["restartPolicy"] = "Always"
    elif s.startup_hold:
        # The kubelet starts the next container only when this hook returns: the app starts after the proxy.
        container["lifecycle"] = {"postStart": {"exec": {"command": list(a.WAIT_READY_COMMAND)}}}
    return container


PROXY_VOLUME_NAMES: frozenset[str] = frozenset(
    {a.IDENTITY_VOLUME, a.TRUST_ANCHORS_VOLUME, a.TOKEN_VOLUME, a.API_ACCESS_VOLUME}
)


def proxy_volumes(*, direct: bool = True) -> list[JsonObject]:
    """The proxy's volumes; the Kubernetes API credentials only for direct discovery."""
    volumes: list[JsonObject] = [
        {"name": a.IDENTITY_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": a.IDENTITY_VOLUME_SIZE}},
        {
            "name": a.TRUST_ANCHORS_VOLUME,
            "configMap": {"name": a.TRUST_ANCHORS_CONFIGMAP, "items": [{"key": a.TRUST_ANCHORS_KEY, "path": a.TRUST_ANCHORS_KEY}]},
        },
        {
            "name": a.TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": a.TOKEN_AUDIENCE,
                            "expirationSeconds": a.TOKEN_EXPIRATION_SECONDS,
                            "path": a.TOKEN_FILE,
                        }
                    }
                ]
            },
        },
    ]
    if not direct:
        return volumes
    return [
        *volumes,
        {
            "name": a.API_ACCESS_VOLUME,
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": a.API_TOKEN_EXPIRATION_SECONDS, "path": "token"}},
                    {"configMap": {"name": a.API_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {
                        "downwardAPI": {
                            "items": [
                                {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
                            ]
                        }
                    },
                ]
            },
        },
    ]


def _set_map_entries(key: str, exists: bool, entries: dict[str, str]) -> list[JsonPatchOp]:
    if not entries:
        return []
    base = f"/metadata/{key}"
    if not exists:
        return [{"op": "add", "path": base, "value": dict(entries)}]
    return [{"op": "add", "path": f"{base}/{escape(k)}", "value": v} for k, v in entries.items()]


def _append_items(key: str, exists: bool, items: list[JsonObject], *, first: bool) -> list[JsonPatchOp]:
    base = f"/spec/{key}"
    if not exists:
        return [{"op": "add", "path": base, "value": list[Json](items)}]
    pos = "0" if first else "-"
    return [{"op": "add", "path": f"{base}/{pos}", "value": item} for item in (reversed(items) if first else items)]


def patch_ops(cfg: InjectorConfig, settings: ProxySettings, layout: PatchLayout) -> list[JsonPatchOp]:
    """The JSON Patch that injects the proxy described by `settings` into a Pod of this layout."""
    ops: list[JsonPatchOp] = []
    if settings.native:
        ops += _append_items("initContainers", layout.init_containers, [proxy_container(cfg, settings)], first=True)
    else:
        ops += _append_items("containers", layout.containers, [proxy_container(cfg, settings)], first=True)
    ops += _append_items(
        "volumes", layout.volumes, proxy_volumes(direct=settings.discovery == a.DISCOVERY_DIRECT), first=False
    )
    ops += _metadata_ops(cfg, settings, layout)
    return ops


def _metadata_ops(cfg: InjectorConfig, settings: ProxySettings, layout: PatchLayout) -> list[JsonPatchOp]:
    new_ann: dict[str, str] = {}
    # The app's own scrape annotations win: overwriting them would hide the app's metrics.
    for key, value in (
        (a.PROMETHEUS_SCRAPE, "true"),
        (a.PROMETHEUS_PORT, str(a.ADMIN_PORT)),
        (a.PROMETHEUS_PATH, a.METRICS_PATH),
    ):
        if key not in layout.kept:
            new_ann[key] = value
    if a.DEFAULT_CONTAINER not in layout.kept and settings.app_container:
        new_ann[a.DEFAULT_CONTAINER] = settings.app_container
    if settings.weight is not None:
        new_ann[a.WEIGHT] = settings.weight
    new_ann[a.INJECTED] = cfg.version
    return _set_map_entries("annotations", layout.annotations, new_ann) + _set_map_entries(
        "labels", layout.labels, {a.INJECTED: a.INJECTED_LABEL_VALUE}
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """The whole answer for one Pod: what the metric counts, the patch, and what the user is told."""

    result: Result
    patch: tuple[JsonPatchOp, ...] = ()
    warnings: tuple[str, ...] = ()
    message: str = ""


def _admit(f: PodFacts, ns_labels: Mapping[str, str], cfg: InjectorConfig, *, namespace: str) -> Outcome | Plan:
    """A skip or a denial as its Outcome, or the Plan to inject with the warnings the user is shown."""
    ann = dict(f.annotations)
    decision = _needs_injection(f, ann, ns_labels, cfg, namespace=namespace)
    if not decision.inject:
        # A typo in kuberpc.io/inject is the likeliest reason for a skip: name it too.
        typos = (f"kuberpc: {w}" for w in unknown_annotations(ann))
        return Outcome("skipped", warnings=(f"kuberpc: not injected: {decision.reason}", *typos))
    try:
        plan = _plan_injection(f, ann, cfg, namespace=namespace)
    except Denied as e:
        return Outcome("denied", message=str(e))
    warnings = [f"kuberpc: {w}" for w in plan.warnings]
    for key in (a.PROMETHEUS_SCRAPE, a.PROMETHEUS_PORT, a.PROMETHEUS_PATH):
        if key in ann:
            warnings.append(f"kuberpc: {key} already set; the proxy's metrics are not scraped through it")
            break
    return Plan(plan.settings, tuple(warnings))


def mutate(
    pod: Mapping[str, object],
    ns_labels: Mapping[str, str],
    cfg: InjectorConfig,
    *,
    namespace: str = "",
) -> Outcome:
    """Whether to inject (opted in, not injected yet, able to carry a proxy), the plan read from every
    annotation (a denial listing each that would break the pod), then the JSON Patch."""
    return decide(read_pod(pod), ns_labels, cfg, namespace=namespace)


def decide(facts: PodFacts, ns_labels: Mapping[str, str], cfg: InjectorConfig, *, namespace: str = "") -> Outcome:
    """`mutate` for a Pod with these facts: pods with equal facts get equal outcomes (the server memoises it)."""
    verdict = _admit(facts, ns_labels, cfg, namespace=namespace)
    if isinstance(verdict, Outcome):
        return verdict
    return Outcome("injected", tuple(patch_ops(cfg, verdict.settings, facts.layout)), verdict.warnings)
