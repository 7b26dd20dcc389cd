"""KUBERPC_DISCOVERY's grammar: control-plane:host:port[,host:port...] | kubernetes | file:/path, with every problem
reported at once."""

from __future__ import annotations

import pytest

from sidecar import config as config_mod
from sidecar.config import Address, ConfigError

BASE = {
    "KUBERPC_TLS_CERT": "/c.pem",
    "KUBERPC_TLS_KEY": "/k.pem",
    "KUBERPC_TRUST_ANCHORS": "/ca.pem",
    "KUBERPC_INBOUND_ADDR": "off",
}


def test_a_control_plane_address_list_is_parsed_in_order_without_duplicates() -> None:
    cfg = config_mod.load(
        BASE | {"KUBERPC_DISCOVERY": "control-plane:kuberpc-webhook.kuberpc-system.svc:8082, 10.0.0.7:8082,10.0.0.7:8082"}
    )
    assert cfg.discovery == "control-plane"
    assert cfg.discovery_addresses == (
        Address("kuberpc-webhook.kuberpc-system.svc", 8082),
        Address("10.0.0.7", 8082),
    )


def test_every_bad_control_plane_address_is_reported_with_the_other_problems() -> None:
    with pytest.raises(ConfigError) as e:
        config_mod.load(BASE | {"KUBERPC_DISCOVERY": "control-plane:nowhere,good.svc:8082,x:99999", "KUBERPC_LOG_LEVEL": "loud"})
    problems = e.value.problems
    assert any("'nowhere'" in p and p.startswith("KUBERPC_DISCOVERY") for p in problems)
    assert any("99999" in p and p.startswith("KUBERPC_DISCOVERY") for p in problems)
    assert any(p.startswith("KUBERPC_LOG_LEVEL") for p in problems)


def test_an_unknown_discovery_source_names_the_three_forms() -> None:
    with pytest.raises(ConfigError) as e:
        config_mod.load(BASE | {"KUBERPC_DISCOVERY": "consul"})
    assert "control-plane:host:port" in e.value.problems[0] and "kubernetes" in e.value.problems[0]


def test_control_plane_discovery_with_inbound_needs_the_pod_name() -> None:
    env = BASE | {"KUBERPC_DISCOVERY": "control-plane:cp.svc:8082", "KUBERPC_INBOUND_ADDR": "0.0.0.0:15443", "KUBERPC_APP_PORT": "8080"}
    with pytest.raises(ConfigError) as e:
        config_mod.load(env)
    assert any(p.startswith("POD_NAME") and "control-plane" in p for p in e.value.problems)
    assert config_mod.load(env | {"POD_NAME": "arith-0"}).pod_name == "arith-0"
