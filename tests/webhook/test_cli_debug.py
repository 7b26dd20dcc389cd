"""`kuberpc debug`: a real proxy's /debug rendered for a person (routes, endpoints with weights and state,
ejections and why, connections with each peer's SPIFFE ID), or printed as the document with -o json|yaml; and
`debug POD`/`tap POD` going through the cluster's port-forward rather than an address."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.sidecar.harness import Pair, backend, mesh_certs, pair
from tests.sidecar.test_mesh import channel
from webhook.cli import debug
from webhook.cli.kube import CliError, Cluster
from webhook.cli.main import main

__all__ = ["backend", "mesh_certs", "pair"]  # fixtures used below

ARITH = "spiffe://cluster.local/ns/default/sa/arith"


async def kuberpc(*args: str, cluster: Any = Cluster) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(args), cluster=cluster, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_debug_shows_the_route_the_endpoint_its_state_and_the_peer_identity_of_each_connection(pair: Pair) -> None:
    async with channel(pair.target) as ch:
        await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)

        code, out, err = await kuberpc("debug", "--admin", pair.client_side.debug)
        _, server_out, _ = await kuberpc("debug", "--admin", pair.server_side.debug)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "Ready:      yes" in lines
    port = pair.server_side.inbound_port
    (endpoint,) = [line for line in lines if f"127.0.0.1:{port}" in line and line.startswith("  echo.default")]
    assert endpoint.split() == ["echo.default", f"127.0.0.1:{port}", "-", "100", "ready", "yes", "-"]
    assert "  0 ejected" in lines
    (to_peer,) = [line for line in lines if line.startswith("  to peer")]
    assert to_peer.split()[2:4] == [f"127.0.0.1:{port}", ARITH]  # the server proxy's identity, as verified
    # The server side knows who called: the client proxy's identity on its inbound connection.
    (inbound,) = [line for line in server_out.splitlines() if line.startswith("  inbound (from peer)")]
    assert "spiffe://cluster.local/ns/default/sa/" in inbound


async def test_debug_json_and_yaml_print_the_proxys_own_document(pair: Pair) -> None:
    _, as_json, _ = await kuberpc("debug", "--admin", pair.client_side.debug, "-o", "json")
    _, as_yaml, _ = await kuberpc("debug", "--admin", pair.client_side.debug, "-o", "yaml")

    doc = json.loads(as_json)
    assert doc["routes"]["services"]["echo.default"]["endpoints"][0]["weight"] == 100
    assert yaml.safe_load(as_yaml)["routes"] == doc["routes"]


def test_an_ejected_endpoint_is_shown_with_why_and_when_it_is_tried_again() -> None:
    doc = {
        "pod": {"name": "web-1", "namespace": "shop", "ip": "10.0.0.7"},
        "ready": True,
        "not_ready_because": [],
        "routes": {"upstreams": {"9001": "cart.shop:50051"}, "services": {"cart.shop": {
            "policy": "p2c-ewma", "timeout": 2.0, "retry_on": ["unavailable"], "endpoints": [
                {"address": "10.0.0.8", "port": 15443, "weight": 100, "pod": "cart-a", "state": "ready", "tls": True},
                {"address": "10.0.0.9", "port": 15443, "weight": 50, "pod": "cart-b", "state": "ejected", "tls": True,
                 "why": "5 consecutive failures (last: connect refused)", "ejections_in_a_row": 2, "back_in_s": 1.5},
            ]}}},
        "identity": {"source": "identity-service", "identity": "spiffe://cluster.local/ns/shop/sa/web",
                     "serial": "ab", "not_after": "2026-12-07T20:00:00+00:00"},
    }

    lines = debug.render(doc, dt.datetime(2026, 12, 6, 20, 0, tzinfo=dt.UTC))

    assert lines[0] == "Pod:        shop/web-1 (10.0.0.7)"
    assert "Identity:   spiffe://cluster.local/ns/shop/sa/web (certificate from identity-service)" in lines
    assert "Certificate: serial ab, expires 2026-12-07T20:00:00+00:00 (in 1d)" in lines
    assert any(line.split() == ["127.0.0.1:9001", "cart.shop:50051"] for line in lines)
    assert any(line.split() == ["cart.shop", "p2c-ewma", "2.0", "unavailable", "2"] for line in lines)
    assert "  1 ejected:" in lines
    assert ("    cart.shop 10.0.0.9:15443: 5 consecutive failures (last: connect refused) "
            "(2 ejection(s) in a row, back in 1.5 s)") in lines


def test_a_proxy_of_an_older_version_missing_sections_is_rendered_with_dashes() -> None:
    lines = debug.render({"ready": False, "not_ready_because": ["no workload certificate yet"]},
                         dt.datetime(2026, 12, 6, tzinfo=dt.UTC))

    assert lines[:3] == ["Pod:        -/-", "Ready:      no (no workload certificate yet)",
                         "Identity:   - (no workload certificate source: plaintext only)"]
    assert "  none yet (no Service called, no upstream declared)" in lines


class PortForwarding(Cluster):
    """The real adapter, with port-forwards to one pod reaching a proxy the test runs on loopback."""

    target = ""
    asked: list[tuple[str, str, int]] = []  # noqa: RUF012  (reset by the test)

    @contextlib.contextmanager
    def forward(self, namespace: str, pod: str, port: int) -> Iterator[str]:
        self.asked.append((namespace, pod, port))
        if pod != "web-1":
            raise CliError(f"port-forward to {namespace}/{pod}:{port}: Handshake status 404 Not Found")
        yield self.target


async def test_debug_pod_goes_through_a_port_forward_to_the_loopback_debug_port(pair: Pair, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": "http://127.0.0.1:1"}}],
        "users": [{"name": "t", "user": {}}], "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
    }))
    PortForwarding.target, PortForwarding.asked = pair.client_side.debug, []

    code, out, _ = await kuberpc("debug", "web-1", "-n", "shop", "--kubeconfig", str(kubeconfig), cluster=PortForwarding)
    missing, _, err = await kuberpc("debug", "nope", "-n", "shop", "--kubeconfig", str(kubeconfig), cluster=PortForwarding)

    assert code == 0 and "Routes:" in out
    assert PortForwarding.asked == [("shop", "web-1", 15091), ("shop", "nope", 15091)]
    assert missing == 1 and err == "kuberpc debug: port-forward to shop/nope:15091: Handshake status 404 Not Found\n"


async def test_naming_both_a_pod_and_an_address_or_neither_is_a_usage_error() -> None:
    for args in (["debug"], ["tap", "web-1", "--admin", "127.0.0.1:1"], ["top"]):
        code, _, err = await kuberpc(*args)
        assert code == 2 and "name a POD or give --admin HOST:PORT" in err


def test_the_local_port_carries_each_connection_through_its_own_tunnel_both_ways() -> None:
    """forward.local_port with TCP connections to an echo server standing in for the pods/portforward tunnel."""
    import socket
    import threading

    from webhook.cli.forward import local_port

    server = socket.create_server(("127.0.0.1", 0))

    def echo() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1024):
                    conn.sendall(data.upper())

    threading.Thread(target=echo, daemon=True).start()
    opened: list[socket.socket] = []

    def tunnel() -> socket.socket:
        opened.append(socket.create_connection(server.getsockname()))
        return opened[-1]

    with local_port(tunnel) as address:
        host, _, port = address.rpartition(":")
        assert host == "127.0.0.1"
        for word in (b"first", b"second"):
            with socket.create_connection((host, int(port)), timeout=10) as c:
                c.sendall(word)
                assert c.recv(1024) == word.upper()
    assert len(opened) == 2  # one tunnel per connection, as kubectl port-forward opens one stream each
    server.close()
