"""The mesh as a user sees it: weighted balancing across replicas, bad input refused without harm to others,
authorization, metrics, drain. Real proxies, real gRPC, real TLS, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import dead_port
from tests.sidecar.harness import (
    GRPC_OPTIONS,
    Backend,
    MeshCerts,
    Pair,
    endpoints_yaml,
    run_pair,
    run_proxy,
    start_backend,
    wait_for_endpoints,
)

AUTHORITY = "echo.default:50051"


def channel(target: str, authority: str = AUTHORITY) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[*GRPC_OPTIONS, ("grpc.default_authority", authority)])


async def unary(target: str, **kw: object) -> grpc.aio.UnaryUnaryCall:
    async with channel(target) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10, **kw)  # type: ignore[arg-type]
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call
        return call


async def scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The proxies run in this event loop: fetch from a thread."""
    return await asyncio.to_thread(_scrape, admin)


def _scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_calls_are_shared_across_replicas_exactly_by_weight(mesh_certs: MeshCerts, tmp_path: Path) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    weights = {"r1": 1, "r2": 2, "r3": 3}
    async with contextlib.AsyncExitStack() as stack:
        endpoints = []
        for name, w in weights.items():
            b = stack.enter_context(start_backend(name))
            p = await stack.enter_async_context(
                run_proxy(
                    mesh_certs.server,
                    disc,
                    KUBERPC_INBOUND_ADDR="127.0.0.1:0",
                    KUBERPC_APP_PORT=str(b.port),
                    KUBERPC_POD_LABELS="app=echo",
                )
            )
            endpoints.append({"address": "127.0.0.1", "port": p.inbound_port, "weight": w, "tls": True})
        disc.write_text(endpoints_yaml({"echo.default": endpoints}))
        client = await stack.enter_async_context(run_proxy(mesh_certs.client, disc))
        await wait_for_endpoints(client, "echo.default", 3)
        seen: Counter[str] = Counter()
        async with channel(client.outbound) as ch:
            for _ in range(600):
                call = ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
                await call
                seen[dict(await call.initial_metadata())["x-served-by"]] += 1
    # Smooth weighted round-robin: over every window of sum(w) picks, each endpoint gets exactly w.
    assert seen == {"r1": 100, "r2": 200, "r3": 300}


async def test_the_app_being_down_is_unavailable_naming_the_service_and_the_endpoint(mesh_certs: MeshCerts, tmp_path: Path) -> None:
    async with run_pair(mesh_certs, dead_port(), tmp_path) as p:
        call = await unary(p.target)
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
        # The endpoint's proxy refused the call unprocessed (its app is down) and there was no other endpoint.
        details = await call.details() or ""
        assert "service echo.default" in details and f"127.0.0.1:{p.server_side.inbound_port}" in details
        assert "app is unreachable" in details


async def test_a_tls_client_without_a_certificate_is_refused_and_others_are_served(pair: Pair) -> None:
    port = pair.server_side.inbound_port
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await writer.drain()
    # TLS 1.3 reports a missing client certificate after the handshake: the server alerts and closes.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        data = await asyncio.wait_for(reader.read(100), 5)
        if not data:
            raise ConnectionResetError("closed")
    writer.close()
    assert await (await unary(pair.target)).code() == grpc.StatusCode.OK
    m = await scrape(pair.server_side.admin)
    assert m[("kuberpc_tls_handshake_failures_total", (("reason", "no_client_certificate"),))] >= 1


async def test_a_certificate_from_another_ca_is_refused(mesh_certs: MeshCerts, backend: Backend, tmp_path: Path) -> None:
    rogue = mesh_certs.rogue
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(rogue.cert, rogue.key)
    ctx.set_alpn_protocols(["h2"])
    async with run_pair(mesh_certs, backend.port, tmp_path) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.server_side.inbound_port, ssl=ctx)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            await writer.drain()
            if not await asyncio.wait_for(reader.read(100), 5):
                raise ConnectionResetError("closed")
        writer.close()
        assert await (await unary(p.target)).code() == grpc.StatusCode.OK


async def test_a_client_proxy_with_a_foreign_certificate_cannot_reach_the_app(
    mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path, client_workload=mesh_certs.rogue) as p:
        call = await unary(p.target)
        assert await call.code() == grpc.StatusCode.UNAVAILABLE
    assert backend.state.seen_metadata == []


async def test_http1_on_the_outbound_port_gets_505_and_others_are_served(pair: Pair) -> None:
    reader, writer = await asyncio.open_connection(*pair.target.split(":"))
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 505")
    assert await (await unary(pair.target)).code() == grpc.StatusCode.OK


@pytest.mark.parametrize("garbage", [b"\x00" * 64, b"\x16\x03\x01\x02\x00" + b"\x01" * 100, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"])
async def test_garbage_on_the_outbound_port_is_refused_with_goaway(pair: Pair, garbage: bytes) -> None:
    reader, writer = await asyncio.open_connection(*pair.target.split(":"))
    writer.write(garbage)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer[3] == 0x7  # a GOAWAY frame (after our SETTINGS), then EOF
    assert await (await unary(pair.target)).code() == grpc.StatusCode.OK


async def test_a_plaintext_http2_preface_on_the_inbound_port_is_refused(pair: Pair) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", pair.server_side.inbound_port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"\x00\x00\x00\x04" not in answer  # never an HTTP/2 SETTINGS: the TLS layer refused it
    assert await (await unary(pair.target)).code() == grpc.StatusCode.OK


async def test_a_caller_outside_the_allow_policy_is_denied(mesh_certs: MeshCerts, backend: Backend, tmp_path: Path) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path, annotations={"kuberpc.io/allow": "payments/*"}) as p:
        call = await unary(p.target)
        assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spiffe://cluster.local/ns/default/sa/client" in (await call.details() or "")
        m = await scrape(p.server_side.admin)
        assert m[("kuberpc_authz_denied_total", (("service", "echo.default"),))] == 1
    assert backend.state.seen_metadata == []


async def test_a_caller_inside_the_allow_policy_is_served(mesh_certs: MeshCerts, backend: Backend, tmp_path: Path) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path, annotations={"kuberpc.io/allow": "other/x,default/client"}) as p:
        assert await (await unary(p.target)).code() == grpc.StatusCode.OK


async def test_the_service_timeout_applies_when_the_caller_sets_no_deadline(
    mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path, annotations={"kuberpc.io/timeout": "300ms"}) as p:
        async with channel(p.target) as ch:
            call = ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-sleep-ms", "3000"),))
            with pytest.raises(grpc.aio.AioRpcError):
                await asyncio.wait_for(call, 2)
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_metrics_count_calls_by_direction_service_method_and_code(pair: Pair) -> None:
    for _ in range(3):
        await unary(pair.target)
    await unary(pair.target, metadata=(("x-status", "NOT_FOUND"),))
    out = await scrape(pair.client_side.admin)
    inn = await scrape(pair.server_side.admin)
    key = lambda d, code: (
        "kuberpc_requests_total",
        (("direction", d), ("grpc_code", code), ("method", "/test.Echo/Unary"), ("service", "echo.default")),
    )
    assert out[key("outbound", "0")] == 3
    assert out[key("outbound", "5")] == 1
    assert inn[key("inbound", "0")] == 3
    assert out[("kuberpc_request_duration_seconds_count", (("direction", "outbound"), ("method", "/test.Echo/Unary"), ("service", "echo.default")))] == 4
    assert out[("kuberpc_endpoints", (("service", "echo.default"), ("state", "ready")))] == 1
    assert out[("kuberpc_inflight_requests", (("direction", "outbound"), ("service", "echo.default")))] == 0


async def test_drain_lets_an_in_flight_call_finish_and_refuses_new_connections(pair: Pair) -> None:
    async with channel(pair.target) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-sleep-ms", "500"),), timeout=10)
        await asyncio.sleep(0.2)  # the call is in flight
        pair.client_side.stop.set()
        assert await call == b"x"
    await asyncio.wait_for(pair.client_side.task, 5)
    with pytest.raises(OSError):
        await asyncio.open_connection(*pair.target.split(":"))


async def test_a_call_whose_endpoint_cannot_be_reached_is_placed_on_another(
    mesh_certs: MeshCerts, backend: Backend, tmp_path: Path
) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path) as p:
        alive = {"address": "127.0.0.1", "port": p.server_side.inbound_port, "tls": True}
        dead = {"address": "127.0.0.1", "port": dead_port(), "tls": True}
        p.discovery.write_text(
            endpoints_yaml({"echo.default": [dead, alive]}, {"echo.default": {"kuberpc.io/grpc-services": "test.Echo"}})
        )
        await wait_for_endpoints(p.client_side, "echo.default", 2)
        codes = [await (await unary(p.target)).code() for _ in range(10)]
        assert codes == [grpc.StatusCode.OK] * 10
        m = await scrape(p.client_side.admin)
        assert m[("kuberpc_retries_total", (("reason", "connect_failure"), ("service", "echo.default")))] >= 5
