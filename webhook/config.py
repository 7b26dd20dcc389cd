"""The injector's configuration (config.yaml): one frozen dataclass, validated as a whole.

Parses text it is given and collects every problem into one ConfigError; reads no files and no cluster.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Literal

import yaml
from kubernetes.utils.quantity import parse_quantity

from sidecar.address import parse_dial_address
from sidecar.spiffe import is_dns_label, is_trust_domain
from webhook import __version__
from webhook import annotations as a

NativeSidecarMode = Literal["auto", "true", "false"]
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
KEYS = (
    "image",
    "imagePullPolicy",
    "trustDomain",
    "identityAddr",
    "discoveryAddr",
    "controlPlaneNamespace",
    "nativeSidecar",
    "kubernetesVersion",
    "startupHold",
    "logLevel",
    "resources",
)

# The apimachinery quantity grammar; kubernetes.utils.parse_quantity alone is too lenient
# (it hands the number to Decimal, which accepts "NaN", "1_0" and surrounding spaces).
_QUANTITY = re.compile(r"^[+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)")


class ConfigError(ValueError):
    """Every problem found in the injector configuration, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid injector configuration:\n  - " + "\n  - ".join(problems))


def quantity_value(text: str) -> Decimal:
    """The value of a quantity that already matched the grammar (kubernetes' parser is untyped)."""
    value: Decimal = parse_quantity(text)  # type: ignore[no-untyped-call]
    return value


def parse_positive_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity greater than zero; ValueError otherwise."""
    if len(text) > 32 or not _QUANTITY.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100m, 0.5, 128Mi)")
    value = quantity_value(text)
    if not value > 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return value


def parse_kubernetes_version(text: str) -> tuple[int, int]:
    """`1.29`, `v1.29.3`, `1.29+` (as some providers report it) -> (1, 29)."""
    m = _VERSION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a Kubernetes version like 1.29")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True, slots=True)
class Resources:
    cpu_request: str = a.DEFAULT_CPU_REQUEST
    memory_request: str = a.DEFAULT_MEMORY_REQUEST
    cpu_limit: str = a.DEFAULT_CPU_LIMIT
    memory_limit: str = a.DEFAULT_MEMORY_LIMIT


@dataclass(frozen=True, slots=True)
class InjectorConfig:
    image: str = f"{a.PROXY_IMAGE_REPO}:{__version__}"
    image_pull_policy: str = a.DEFAULT_IMAGE_PULL_POLICY
    trust_domain: str = a.DEFAULT_TRUST_DOMAIN
    identity_addr: str = a.DEFAULT_IDENTITY_ADDR
    discovery_addr: str = a.DEFAULT_DISCOVERY_ADDR  # where injected proxies stream discovery from
    control_plane_namespace: str = a.DEFAULT_CONTROL_PLANE_NAMESPACE
    native_sidecar: NativeSidecarMode = "auto"
    kubernetes_version: tuple[int, int] | None = None  # None with "auto": not known, so not native
    startup_hold: bool = True
    log_level: str = a.DEFAULT_LOG_LEVEL
    resources: Resources = field(default_factory=Resources)
    version: str = __version__

    @property
    def native_by_default(self) -> bool:
        """Whether a pod without `kuberpc.io/native-sidecar` gets the native sidecar."""
        if self.native_sidecar != "auto":
            return self.native_sidecar == "true"
        return self.kubernetes_version is not None and self.kubernetes_version >= a.NATIVE_SIDECAR_MIN_VERSION


def _string(data: Mapping[str, object], key: str, problems: list[str]) -> str | None:
    if key not in data or data[key] is None:
        return None
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key}: {value!r} must be a non-empty string")
        return None
    return value.strip()


def _resources(value: object, problems: list[str]) -> Resources:
    default = Resources()
    if value is None:
        return default
    if not isinstance(value, Mapping):
        problems.append(f"resources: {value!r} must be a mapping with requests and limits")
        return default
    out: dict[str, str] = {}
    for section in value:
        if section not in ("requests", "limits"):
            problems.append(f"resources.{section}: unknown key (requests, limits)")
    for section, suffix in (("requests", "request"), ("limits", "limit")):
        part = value.get(section) or {}
        if not isinstance(part, Mapping):
            problems.append(f"resources.{section}: {part!r} must be a mapping with cpu and memory")
            continue
        for res in part:
            if res not in ("cpu", "memory"):
                problems.append(f"resources.{section}.{res}: unknown key (cpu, memory)")
        for res in ("cpu", "memory"):
            if res not in part:
                continue
            text = str(part[res]) if isinstance(part[res], int | float | str) else repr(part[res])
            try:
                parse_positive_quantity(text)
                out[f"{res}_{suffix}"] = text
            except ValueError as e:
                problems.append(f"resources.{section}.{res}: {e}")
    res = Resources(**out)
    for kind in ("cpu", "memory"):
        req, lim = getattr(res, f"{kind}_request"), getattr(res, f"{kind}_limit")
        try:
            if quantity_value(req) > quantity_value(lim):
                problems.append(f"resources: {kind} request {req} exceeds its limit {lim}")
        except ValueError:  # already reported above
            pass
    return res


def load_config(text: str, *, base: InjectorConfig | None = None) -> InjectorConfig:
    """Parse config.yaml over `base` (default: all defaults); raise ConfigError listing every problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"not YAML: {e}"]) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"the document must be a mapping, not {type(data).__name__}"])
    problems: list[str] = []
    values: dict[str, object] = {}
    for key in data:
        if key not in KEYS:
            problems.append(f"{key}: unknown key (expected one of {', '.join(KEYS)})")

    if (image := _string(data, "image", problems)) is not None:
        values["image"] = image
    if (policy := _string(data, "imagePullPolicy", problems)) is not None:
        if policy not in PULL_POLICIES:
            problems.append(f"imagePullPolicy: {policy!r} is not one of {', '.join(PULL_POLICIES)}")
        values["image_pull_policy"] = policy
    if (td := _string(data, "trustDomain", problems)) is not None:
        if not is_trust_domain(td):
            problems.append(f"trustDomain: {td!r} is not a SPIFFE trust domain")
        values["trust_domain"] = td
    for key, attr in (("identityAddr", "identity_addr"), ("discoveryAddr", "discovery_addr")):
        if (addr := _string(data, key, problems)) is not None:
            try:
                parse_dial_address(addr)  # the proxy's own parser: it reads the value the injector sets
            except ValueError as e:
                problems.append(f"{key}: {e}")
            values[attr] = addr
    if (ns := _string(data, "controlPlaneNamespace", problems)) is not None:
        if not is_dns_label(ns):
            problems.append(f"controlPlaneNamespace: {ns!r} is not a namespace name")
        values["control_plane_namespace"] = ns

    native = data.get("nativeSidecar")
    if native is not None:
        # YAML reads a bare true/false as a boolean: accept both spellings.
        mode = str(native).lower() if isinstance(native, bool | str) else None
        if mode not in ("auto", "true", "false"):
            problems.append(f"nativeSidecar: {native!r} is not auto, true or false")
        else:
            values["native_sidecar"] = mode
    kv = data.get("kubernetesVersion")
    if kv is not None:
        if not isinstance(kv, str):
            # An unquoted 1.30 is the float 1.3: refuse rather than guess.
            problems.append(f"kubernetesVersion: {kv!r} must be a quoted string like \"1.30\"")
        else:
            try:
                values["kubernetes_version"] = parse_kubernetes_version(kv)
            except ValueError as e:
                problems.append(f"kubernetesVersion: {e}")
    hold = data.get("startupHold")
    if hold is not None:
        if not isinstance(hold, bool):
            problems.append(f"startupHold: {hold!r} must be true or false")
        else:
            values["startup_hold"] = hold
    if (lvl := _string(data, "logLevel", problems)) is not None:
        if lvl.lower() not in a.LOG_LEVELS:
            problems.append(f"logLevel: {lvl!r} is not one of {', '.join(a.LOG_LEVELS)}")
        values["log_level"] = lvl.lower()
    if "resources" in data:
        values["resources"] = _resources(data.get("resources"), problems)

    if problems:
        raise ConfigError(problems)
    return replace(base or InjectorConfig(), **values)  # type: ignore[arg-type]
