"""Discovery from a YAML endpoints file (the demo and tests, runs outside Kubernetes), reloaded on change.

Parsing is pure (parse_endpoints_file); FileDiscovery only watches the file and publishes. Never talks to Kubernetes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from sidecar.address import is_host_name
from sidecar.discovery import ProblemLog, port_or_none
from sidecar.model import DEFAULT_WEIGHT, MAX_WEIGHT, Catalog, Endpoint, EndpointSet, ServiceKey, selecting
from sidecar.policy import parse_service_annotations
from sidecar.spiffe import is_dns_label

log = logging.getLogger(__name__)

try:
    _Loader: type[yaml.CSafeLoader] | type[yaml.SafeLoader] = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

_TOP_KEYS = frozenset({"services"})
_SERVICE_KEYS = frozenset({"name", "namespace", "ports", "annotations", "endpoints", "selector"})
_ENDPOINT_KEYS = frozenset({"address", "port", "weight", "tls", "ready", "serving", "terminating", "pod"})
_FLAGS = {"tls": True, "ready": True, "serving": True, "terminating": False}


def _annotation_value(value: object) -> str | None:
    """Kubernetes annotations are strings; in YAML people write `retry-budget: 0.5`, so scalars are accepted."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return None


def _parse_endpoint(raw: object, where: str, problems: list[str]) -> Endpoint | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping like {{address: 10.0.0.1, port: 15443}}, got {raw!r}")
        return None
    for k in sorted(str(k) for k in raw if k not in _ENDPOINT_KEYS):
        problems.append(f"{where}: unknown field {k!r} (known: {', '.join(sorted(_ENDPOINT_KEYS))})")
    address = raw.get("address")
    if isinstance(address, str):
        address = address.strip().strip("[]")
    ok_address = isinstance(address, str) and (_is_ip(address) or bool(is_host_name(address)))
    port = port_or_none(raw.get("port"))
    if not ok_address:
        problems.append(
            f"{where}: address: {raw.get('address')!r} is not an IP address or host name (endpoint skipped)"
        )
    if port is None:
        problems.append(
            f"{where}: port: {raw.get('port')!r} is not a port from 1 to 65535 (endpoint skipped)"
        )
    if not ok_address or port is None:
        return None
    assert isinstance(address, str)
    where = f"{where} ({address}:{port})"
    weight = DEFAULT_WEIGHT
    if "weight" in raw:
        w = raw["weight"]
        if isinstance(w, int) and not isinstance(w, bool) and 0 <= w <= MAX_WEIGHT:
            weight = w
        else:
            problems.append(
                f"{where}: weight: {w!r} is not an integer from 0 to {MAX_WEIGHT} (using {DEFAULT_WEIGHT})"
            )
    flags = dict(_FLAGS)
    for name, default in _FLAGS.items():
        if name in raw:
            v = raw[name]
            if isinstance(v, bool):
                flags[name] = v
            else:
                problems.append(f"{where}: {name}: {v!r} is not true or false (using {str(default).lower()})")
    pod = raw.get("pod", "")
    if not isinstance(pod, str):
        problems.append(f"{where}: pod: {pod!r} is not a string (ignored)")
        pod = ""
    return Endpoint(
        address,
        port,
        weight,
        tls=flags["tls"],
        ready=flags["ready"],
        serving=flags["serving"],
        terminating=flags["terminating"],
        pod=pod,
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _parse_service(raw: object, index: int, namespace: str, problems: list[str]) -> EndpointSet | None:
    where = f"services[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping with name, ports, endpoints; got {raw!r}")
        return None
    name = raw.get("name")
    if not isinstance(name, str) or not is_dns_label(name):
        problems.append(f"{where}: name: {name!r} is not a Service name (a DNS label) (service skipped)")
        return None
    ns = raw.get("namespace", namespace)
    if not isinstance(ns, str) or not is_dns_label(ns):
        problems.append(
            f"{where} ({name}): namespace: {ns!r} is not a namespace (a DNS label) (service skipped)"
        )
        return None
    key = ServiceKey(name, ns)
    where = f"service {key}"
    for k in sorted(str(k) for k in raw if k not in _SERVICE_KEYS):
        problems.append(f"{where}: unknown field {k!r} (known: {', '.join(sorted(_SERVICE_KEYS))})")

    ports: list[int] = []
    raw_ports = raw.get("ports", [])
    if not isinstance(raw_ports, list):
        problems.append(f"{where}: ports: {raw_ports!r} is not a list of ports")
        raw_ports = []
    for p in raw_ports:
        port = port_or_none(p)
        if port is None:
            problems.append(f"{where}: ports: {p!r} is not a port from 1 to 65535 (ignored)")
        elif port not in ports:
            ports.append(port)

    annotations: dict[str, str] = {}
    raw_ann = raw.get("annotations", {})
    if raw_ann is None:
        raw_ann = {}
    if not isinstance(raw_ann, dict):
        problems.append(f"{where}: annotations: {raw_ann!r} is not a mapping")
        raw_ann = {}
    for k, v in raw_ann.items():
        text = _annotation_value(v)
        if not isinstance(k, str) or text is None:
            problems.append(f"{where}: annotations: {k!r}: {v!r} is not a string value (ignored)")
            continue
        annotations[k] = text
    policy, policy_problems = parse_service_annotations(annotations)
    problems.extend(f"{where}: {p}" for p in policy_problems)

    # The Service's pod selector, as in its spec: which pods' policies it speaks for (inbound authorization).
    selector: dict[str, str] = {}
    raw_sel = raw.get("selector", {})
    if raw_sel is None:
        raw_sel = {}
    if not isinstance(raw_sel, dict):
        problems.append(f"{where}: selector: {raw_sel!r} is not a mapping of labels (selects no pod)")
        raw_sel = {}
    for k, v in raw_sel.items():
        text = _annotation_value(v)
        if not isinstance(k, str) or text is None:
            problems.append(f"{where}: selector: {k!r}: {v!r} is not a label (selects no pod)")
            selector = {}
            break
        selector[k] = text

    endpoints: dict[tuple[str, int], Endpoint] = {}
    raw_eps = raw.get("endpoints", [])
    if raw_eps is None:
        raw_eps = []
    if not isinstance(raw_eps, list):
        problems.append(f"{where}: endpoints: {raw_eps!r} is not a list")
        raw_eps = []
    for j, raw_ep in enumerate(raw_eps):
        ep = _parse_endpoint(raw_ep, f"{where} endpoints[{j}]", problems)
        if ep is None:
            continue
        if ep.key in endpoints:
            problems.append(f"{where} endpoints[{j}]: {ep} is listed twice (first kept)")
            continue
        endpoints[ep.key] = ep
    return EndpointSet(key, tuple(endpoints.values()), policy, tuple(ports), tuple(sorted(selector.items())))


def parse_endpoints_file(
    text: str, *, namespace: str, labels: Mapping[str, str] | None = None
) -> tuple[Catalog, list[str]]:
    """The Catalog an endpoints file describes, and one problem per bad service, field or value.

    With this pod's `labels`, the Catalog also says which Services select it (their `selector`); without
    them (None) it says nothing, and inbound stays closed.

    Bad parts are skipped or defaulted and reported; a file that is not YAML, is empty, or has no
    `services` list raises ValueError (the caller keeps its last good catalog).
    """
    try:
        doc: Any = yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise ValueError(f"not valid YAML: {e}") from e
    if doc is None:
        # An empty file is more likely a half-written one than a wish to drop every endpoint;
        # `services: []` says the latter explicitly.
        raise ValueError("the file is empty (expected a mapping with a 'services' list)")
    if not isinstance(doc, dict):
        raise ValueError(f"expected a mapping with a 'services' list, got {type(doc).__name__}")
    services = doc.get("services")
    if not isinstance(services, list):
        raise ValueError(f"'services' must be a list, got {services!r}")
    problems: list[str] = []
    for k in sorted(str(k) for k in doc if k not in _TOP_KEYS):
        problems.append(f"unknown top-level field {k!r} (known: services)")
    sets: dict[ServiceKey, EndpointSet] = {}
    for i, raw in enumerate(services):
        es = _parse_service(raw, i, namespace, problems)
        if es is None:
            continue
        if es.service in sets:
            problems.append(f"services[{i}]: service {es.service} is listed twice (first kept)")
            continue
        sets[es.service] = es
    chosen = selecting(sets.values(), namespace, labels) if labels is not None else None
    return Catalog(sets.values(), selecting=chosen), problems


_Signature = tuple[int, int, int, int]  # st_dev, st_ino, st_mtime_ns, st_size


def _signature(st: os.stat_result) -> _Signature:
    # The inode matters: a ConfigMap mount swaps a symlink to a new file, which may keep mtime and size.
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _read(path: str) -> tuple[_Signature, str]:
    with open(path, "rb") as f:
        # fstat of the open file: the signature describes exactly the bytes read.
        sig = _signature(os.fstat(f.fileno()))
        data = f.read()
    try:
        return sig, data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text: {e}") from e


class FileDiscovery:
    """Watches one endpoints file by stat every `interval` seconds and publishes each changed Catalog.

    A missing file at start publishes nothing until the file appears: with no catalog yet the proxy
    stays not-ready, which is more honest than being ready with no routes. A file that goes missing
    or breaks later keeps the last good catalog in service. Each problem is logged once per
    appearance (again only if it goes away and comes back).
    """

    def __init__(
        self, path: str, *, namespace: str, labels: Mapping[str, str] | None = None, interval: float = 0.5
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval!r}")
        self._path = path
        self._namespace = namespace
        self._labels = dict(labels) if labels is not None else None
        self._interval = interval

    async def run(self, publish: Callable[[Catalog], None]) -> None:
        seen: _Signature | None = None
        published: Catalog | None = None
        problems_log = ProblemLog(log, "endpoints file problem path=%s problem=%r", self._path)
        while True:
            keeping = "keeping the last catalog" if published is not None else "no catalog yet"
            try:
                # stat is one cheap syscall on a local mount; the read below goes to a thread.
                current: _Signature | None = _signature(os.stat(self._path))
            except FileNotFoundError:
                current = None
                problems_log.report([f"file missing ({keeping})"])
                seen = None
            except OSError as e:
                current = None
                problems_log.report([f"cannot stat ({keeping}): {e}"])
                seen = None
            if current is not None and current != seen:
                try:
                    seen, text = await asyncio.to_thread(_read, self._path)
                    catalog, problems = parse_endpoints_file(text, namespace=self._namespace, labels=self._labels)
                except (OSError, ValueError) as e:
                    # Remember the broken version so it is not re-read every tick; a fix changes it.
                    seen = current
                    problems_log.report([f"unreadable ({keeping}): {e}"])
                else:
                    problems_log.report(problems)
                    if catalog != published:
                        published = catalog
                        log.info(
                            "endpoints file loaded path=%s services=%d endpoints=%d problems=%d",
                            self._path,
                            len(catalog),
                            sum(len(es.endpoints) for es in catalog.services.values()),
                            len(problems),
                        )
                        publish(catalog)
                    else:
                        log.debug("endpoints file re-read, catalog unchanged path=%s", self._path)
            await asyncio.sleep(self._interval)
