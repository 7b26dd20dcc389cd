"""The injector's config.yaml: defaults, every key, and one error listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from webhook.config import ConfigError, InjectorConfig, Resources, load_config, parse_positive_quantity

MANIFEST_CONFIG = Path(__file__).parents[2] / "manifests" / "injector-config.yaml"


def test_an_empty_document_means_every_default() -> None:
    cfg = load_config("")
    assert cfg.native_sidecar == "auto" and cfg.startup_hold is True
    assert cfg.resources == Resources("50m", "64Mi", "1", "256Mi")
    assert cfg.control_plane_namespace == "kuberpc-system"
    assert cfg.image.startswith("ghcr.io/kuberpc/proxy:")


def test_every_key_is_read() -> None:
    cfg = load_config(
        """
image: registry.local/proxy:1
imagePullPolicy: Always
trustDomain: example.org
identityAddr: identity.mesh.svc:9000
controlPlaneNamespace: mesh
nativeSidecar: false
kubernetesVersion: "v1.30.2"
startupHold: false
logLevel: DEBUG
resources: {requests: {cpu: 10m, memory: 32Mi}, limits: {cpu: 500m, memory: 64Mi}}
"""
    )
    assert cfg == InjectorConfig(
        image="registry.local/proxy:1",
        image_pull_policy="Always",
        trust_domain="example.org",
        identity_addr="identity.mesh.svc:9000",
        control_plane_namespace="mesh",
        native_sidecar="false",
        kubernetes_version=(1, 30),
        startup_hold=False,
        log_level="debug",
        resources=Resources("10m", "32Mi", "500m", "64Mi"),
    )


def test_the_discovery_address_is_read_and_checked() -> None:
    assert InjectorConfig().discovery_addr == "kuberpc-webhook.kuberpc-system.svc:8082"
    assert load_config("discoveryAddr: discovery.mesh.svc:9443").discovery_addr == "discovery.mesh.svc:9443"
    with pytest.raises(ConfigError) as e:
        load_config("discoveryAddr: nowhere\nidentityAddr: nor-here")
    assert e.value.problems == ["identityAddr: 'nor-here' is not host:port", "discoveryAddr: 'nowhere' is not host:port"]
    with pytest.raises(ConfigError) as e:
        load_config("identityAddr: '..:8081'")  # accepted before, refused by every proxy it was injected into
    assert e.value.problems == ["identityAddr: '..:8081': '..' is not a host name or IP address"]


@pytest.mark.parametrize(
    "addr",
    [
        "identity.mesh.svc:9000", "10.0.0.1:8081", "[fd00::1]:8081", "..:8081", "-bad-.svc:8081", "a_b.svc:8081",
        "host:0", "host:65536", ":8081", "host:", "host:80:80", " spaced.svc:8081", "x" * 254 + ":8081",
    ],
)  # fmt: skip
def test_the_injector_accepts_an_address_exactly_when_the_proxy_would(addr: str) -> None:
    """The injector writes identityAddr/discoveryAddr into every proxy's environment, where
    sidecar.config.parse_dial_address reads it: an address one accepts and the other refuses would start
    pods whose proxies cannot start."""
    from sidecar.config import parse_dial_address

    try:
        parse_dial_address(addr)
        proxy_accepts = True
    except ValueError:
        proxy_accepts = False
    try:
        load_config(f"identityAddr: {addr!r}\ndiscoveryAddr: {addr!r}")
        injector_accepts = True
    except ConfigError as e:
        assert all(p.startswith(("identityAddr: ", "discoveryAddr: ")) for p in e.problems)
        injector_accepts = False
    assert injector_accepts == proxy_accepts


def test_the_shipped_manifest_config_is_valid() -> None:
    import yaml

    text = yaml.safe_load(MANIFEST_CONFIG.read_text())["data"]["config.yaml"]
    assert load_config(text).control_plane_namespace == "kuberpc-system"


def test_values_not_in_the_file_come_from_the_base() -> None:
    assert load_config("logLevel: warning", base=InjectorConfig(control_plane_namespace="ops")).control_plane_namespace == "ops"


@pytest.mark.parametrize(
    ("version", "native"), [("1.28", False), ("1.29", True), ("1.31+", True)]
)
def test_auto_native_sidecar_follows_the_kubernetes_version(version: str, native: bool) -> None:
    assert load_config(f'kubernetesVersion: "{version}"').native_by_default is native


def test_auto_with_an_unknown_version_is_not_native() -> None:
    assert load_config("nativeSidecar: auto").native_by_default is False


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(
            """
imagePullPolicy: Sometimes
nativeSidecar: maybe
kubernetesVersion: 1.30
startupHold: "yes"
logLevel: loud
identityAddr: nowhere
resources: {requests: {cpu: lots}, limits: {memory: 1Mi}}
colour: blue
"""
        )
    text = str(e.value)
    for needle in (
        "imagePullPolicy: 'Sometimes'",
        "nativeSidecar: 'maybe'",
        "kubernetesVersion: 1.3 must be a quoted string",
        "startupHold: 'yes'",
        "logLevel: 'loud'",
        "identityAddr: 'nowhere'",
        "resources.requests.cpu: 'lots'",
        "memory request 64Mi exceeds its limit 1Mi",
        "colour: unknown key",
    ):
        assert needle in text
    assert len(e.value.problems) == 9


def test_a_document_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config("- image: x")


@pytest.mark.parametrize("text", ["NaN", "1_000", " 1", "1 Gi", "1Ki ", "Infinity", "0", "-1", "1e", "Mi"])
def test_quantities_follow_the_kubernetes_grammar_and_are_positive(text: str) -> None:
    with pytest.raises(ValueError):
        parse_positive_quantity(text)


@pytest.mark.parametrize("text", ["1", "0.5", "100m", "128Mi", "1.5Gi", "2e3", "1k", ".5"])
def test_valid_quantities_parse(text: str) -> None:
    assert parse_positive_quantity(text) > 0
