"""Failure as the mesh's users see it: a replica whose app is down refuses calls unprocessed (REFUSED_STREAM), so
they are placed on another replica with or without a retry policy, and it is ejected (metrics and /debug say so);
calls the Service's `kuberpc.io/retry` allows are retried on another replica within the deadline.

Real proxies, real gRPC, real TLS on loopback; the failures are real (nothing listens on the dead app's port).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.errors
import h2.events
import pytest

from sidecar import identity
from sidecar.balancer import CONSECUTIVE_FAILURES
from sidecar.pool import PEER_KEEPALIVE_S
from sidecar.relay import MAX_PLACEMENTS
from sidecar.retry import MAX_ATTEMPTS, MAX_REPLAY_BYTES
from tests.ports import dead_port
from tests.sidecar.h2peer import client_tls, connect, grpc_frame, request_headers
from tests.sidecar.harness import (
    GRPC_OPTIONS,
    MeshCerts,
    RunningProxy,
    endpoints_yaml,
    run_proxy,
    wait_for,
    wait_for_endpoints,
)
from tests.sidecar.test_mesh import scrape

SERVICE = "echo.default"
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class App:
    """A gRPC app answering trailers-only with the status named by a call's `x-fail` (as gRPC servers do for an
    early failure), else echoing the request; it records each call's metadata."""

    port: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def app() -> Iterator[App]:
    state = App()

    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        md = {k: v for k, v in ctx.invocation_metadata() if isinstance(v, str)}
        state.seen.append(md)
        # `x-fail-once`: only the first attempt fails (a retry carries grpc-previous-rpc-attempts).
        if "x-fail" in md and not ("x-fail-once" in md and "grpc-previous-rpc-attempts" in md):
            ctx.abort(grpc.StatusCode[md["x-fail"]], "app says no")
        return req

    server = grpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    handler = grpc.method_handlers_generic_handler("test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
    server.add_generic_rpc_handlers((handler,))
    state.port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield state
    finally:
        server.stop(0)


@dataclass
class TwoReplicas:
    client: RunningProxy
    healthy: RunningProxy
    broken: RunningProxy  # its proxy is up, its app is not

    async def unary(self, body: bytes = b"x", timeout: float = 10, **metadata: str) -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(
            self.client.outbound, options=[*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")]
        ) as ch:
            call = ch.unary_unary("/test.Echo/Unary")(body, timeout=timeout, metadata=tuple(metadata.items()))  # type: ignore[arg-type]
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call
            return await call.code()

    def debug_endpoints(self) -> list[dict[str, object]]:
        with urllib.request.urlopen(f"http://{self.client.debug}/debug", timeout=5) as resp:
            doc = json.loads(resp.read())
        endpoints: list[dict[str, object]] = doc["routes"]["services"][SERVICE]["endpoints"]
        return endpoints


@contextlib.asynccontextmanager
async def two_replicas(
    mesh_certs: MeshCerts, app: App, tmp_path: Path, annotations: dict[str, str] | None = None
) -> AsyncIterator[TwoReplicas]:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({SERVICE: []}))
    # The replicas are selected by SERVICE (the harness' selector app=<name>): inbound opens once they know it.
    inbound = {"KUBERPC_INBOUND_ADDR": "127.0.0.1:0", "KUBERPC_POD_LABELS": f"app={SERVICE.split('.')[0]}"}
    async with (
        run_proxy(mesh_certs.server, disc, KUBERPC_APP_PORT=str(app.port), **inbound) as healthy,
        run_proxy(mesh_certs.server, disc, KUBERPC_APP_PORT=str(dead_port()), **inbound) as broken,
    ):
        disc.write_text(
            endpoints_yaml(
                {SERVICE: [{"address": "127.0.0.1", "port": p.inbound_port, "tls": True} for p in (broken, healthy)]},
                {SERVICE: {"kuberpc.io/grpc-services": "test.Echo", **(annotations or {})}},
            )
        )
        async with run_proxy(mesh_certs.client, disc) as client:
            await wait_for_endpoints(client, SERVICE, 2)
            for p in (healthy, broken):
                await wait_for(lambda p=p: bool(p.proxy.inbound and p.proxy.inbound.catalog.selecting), "the replicas to know their Service")
            yield TwoReplicas(client, healthy, broken)


def value(m: Metrics, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_without_a_retry_policy_no_call_fails_while_a_replica_app_is_down(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path) as mesh:
        codes = [await mesh.unary() for _ in range(40)]
        m = await scrape(mesh.client.admin)

        # The broken replica's proxy refuses each call unprocessed; the caller's proxy places it on the other.
        assert codes == [grpc.StatusCode.OK] * 40
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="refused") >= CONSECUTIVE_FAILURES
        assert len(app.seen) == 40  # every call reached the healthy app exactly once
        # No attempt reached an app before: nothing tells the app it is a retry.
        assert not [md for md in app.seen if "grpc-previous-rpc-attempts" in md]


async def test_a_replica_whose_app_is_down_is_ejected_after_a_few_refusals(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path) as mesh:
        for _ in range(2 * CONSECUTIVE_FAILURES):
            await mesh.unary()
        m = await scrape(mesh.client.admin)
        refused = value(m, "kuberpc_retries_total", service=SERVICE, reason="refused")
        for _ in range(20):  # well within the first ejection (~1 s): the broken replica is not even probed
            await mesh.unary()
        m = await scrape(mesh.client.admin)

        assert refused == CONSECUTIVE_FAILURES  # alternating picks: every other call refused until ejected
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="refused") <= refused + 2  # a probe or two


async def test_an_ejection_shows_in_metrics_and_in_debug_with_its_reason(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path) as mesh:
        for _ in range(3 * CONSECUTIVE_FAILURES):
            await mesh.unary()

        m = await scrape(mesh.client.admin)
        endpoints = await asyncio.to_thread(mesh.debug_endpoints)

        assert value(m, "kuberpc_ejections_total", service=SERVICE) == 1
        assert value(m, "kuberpc_endpoints", service=SERVICE, state="ejected") == 1
        assert value(m, "kuberpc_endpoints", service=SERVICE, state="ready") == 1
        broken = next(e for e in endpoints if e["port"] == mesh.broken.inbound_port)
        healthy = next(e for e in endpoints if e["port"] == mesh.healthy.inbound_port)
        assert broken["state"] == "ejected"
        assert "consecutive failures" in str(broken["why"]) and "refused unprocessed" in str(broken["why"])
        assert healthy["state"] == "ready"


async def test_the_proxy_of_a_pod_whose_app_is_down_refuses_calls_with_refused_stream(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path) as mesh:
        peer = await connect("127.0.0.1", mesh.broken.inbound_port, client_tls(mesh_certs))
        try:
            sid = peer.conn.get_next_available_stream_id()
            peer.conn.send_headers(sid, request_headers())
            await peer.send_body(sid, grpc_frame(b"x"))
            ev = await peer.read_until(lambda e: getattr(e, "stream_id", None) == sid)
        finally:
            peer.writer.close()

        # RFC 9113 §8.7: closed before any processing, so the caller may send it again elsewhere.
        assert isinstance(ev, h2.events.StreamReset) and ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM


async def test_a_call_refused_by_every_endpoint_fails_unavailable_naming_the_service(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path) as mesh:
        disc = tmp_path / "endpoints.yaml"
        disc.write_text(
            endpoints_yaml(
                {SERVICE: [{"address": "127.0.0.1", "port": mesh.broken.inbound_port, "tls": True}]},
                {SERVICE: {"kuberpc.io/grpc-services": "test.Echo"}},
            )
        )
        await wait_for_endpoints(mesh.client, SERVICE, 1)
        async with grpc.aio.insecure_channel(
            mesh.client.outbound, options=[*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")]
        ) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)  # type: ignore[arg-type]
        m = await scrape(mesh.client.admin)

        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"service {SERVICE}" in str(failed.value.details())
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="refused") == MAX_PLACEMENTS
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="attempts_exhausted") == 1


async def test_with_retry_on_unavailable_a_call_the_app_fails_is_retried_on_another_replica(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path, {"kuberpc.io/retry": "unavailable"}) as mesh:
        for _ in range(3 * CONSECUTIVE_FAILURES):  # the broken replica gets ejected: only the app answers
            await mesh.unary()
        app.seen.clear()

        code = await mesh.unary(**{"x-fail": "UNAVAILABLE", "x-fail-once": "1"})
        m = await scrape(mesh.client.admin)

        assert code == grpc.StatusCode.OK
        assert [md.get("grpc-previous-rpc-attempts") for md in app.seen] == [None, "1"]
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="unavailable") == 1


async def test_a_status_outside_the_retry_codes_is_not_retried(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path, {"kuberpc.io/retry": "unavailable"}) as mesh:
        for _ in range(3 * CONSECUTIVE_FAILURES):  # the broken replica gets ejected: only the app answers
            await mesh.unary()
        app.seen.clear()

        code = await mesh.unary(**{"x-fail": "NOT_FOUND"})

        assert code == grpc.StatusCode.NOT_FOUND
        assert len(app.seen) == 1


async def test_a_call_failing_every_attempt_stops_at_the_attempt_limit(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path, {"kuberpc.io/retry": "unavailable"}) as mesh:
        for _ in range(3 * CONSECUTIVE_FAILURES):  # the broken replica gets ejected: only the backend answers
            await mesh.unary()
        app.seen.clear()

        code = await mesh.unary(**{"x-fail": "UNAVAILABLE"})
        m = await scrape(mesh.client.admin)

        assert code == grpc.StatusCode.UNAVAILABLE
        attempts = [md.get("grpc-previous-rpc-attempts") for md in app.seen]
        assert attempts == [None, *(str(n) for n in range(1, MAX_ATTEMPTS))]
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="attempts_exhausted") == 1


async def test_a_request_larger_than_the_replay_buffer_is_not_retried_and_counted(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with two_replicas(mesh_certs, app, tmp_path, {"kuberpc.io/retry": "unavailable"}) as mesh:
        big = b"x" * (MAX_REPLAY_BYTES + 1)
        codes = [await mesh.unary(big, **{"x-fail": "UNAVAILABLE"}) for _ in range(2)]
        m = await scrape(mesh.client.admin)

        assert codes == [grpc.StatusCode.UNAVAILABLE] * 2
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="body_too_large") == 2


# ---- dead peers: a peer that accepts connections and never answers (a stopped process, a black hole) ------


@contextlib.asynccontextmanager
async def silent_peer(mesh_certs: MeshCerts) -> AsyncIterator[int]:
    """A mesh peer that completes TLS and then never sends a byte: the port it listens on."""
    ctx = identity.server_context(mesh_certs.server.cert, mesh_certs.server.key, mesh_certs.server.ca)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=ctx)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for w in held:
            w.transport.abort()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def silent_and_healthy(mesh_certs: MeshCerts, app: App, tmp_path: Path) -> AsyncIterator[tuple[TwoReplicas, int]]:
    async with two_replicas(mesh_certs, app, tmp_path) as mesh, silent_peer(mesh_certs) as silent:
        # The proxies already run: point the Service at the silent peer and the healthy replica.
        disc = tmp_path / "endpoints.yaml"
        disc.write_text(
            endpoints_yaml(
                {SERVICE: [{"address": "127.0.0.1", "port": p, "tls": True} for p in (silent, mesh.healthy.inbound_port)]},
                {SERVICE: {"kuberpc.io/grpc-services": "test.Echo"}},
            )
        )
        await wait_for(
            lambda: any(
                e.port == silent for st in mesh.client.proxy.outbound.services.values() for e in st.set.endpoints
            ),
            "the client proxy to load the silent peer",
        )
        yield mesh, silent


async def test_a_call_held_by_a_peer_that_never_answers_fails_within_seconds_not_at_its_deadline(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with silent_and_healthy(mesh_certs, app, tmp_path) as (mesh, silent_port):
        loop = asyncio.get_running_loop()
        started = loop.time()
        codes = await asyncio.gather(mesh.unary(), mesh.unary())  # one each: round robin over the two
        elapsed = loop.time() - started

        assert sorted(codes, key=str) == sorted([grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE], key=str)
        assert elapsed < 3 * PEER_KEEPALIVE_S + 2  # the keepalive PING went unanswered; the deadline was 10 s


async def test_a_peer_that_never_answers_is_ejected_after_calls_time_out_on_it(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    async with silent_and_healthy(mesh_certs, app, tmp_path) as (mesh, silent_port):
        codes = [await mesh.unary(timeout=0.3) for _ in range(3 * CONSECUTIVE_FAILURES)]
        endpoints = await asyncio.to_thread(mesh.debug_endpoints)

        assert 1 <= codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) <= CONSECUTIVE_FAILURES
        assert codes[-CONSECUTIVE_FAILURES:] == [grpc.StatusCode.OK] * CONSECUTIVE_FAILURES
        silent = next(e for e in endpoints if e["port"] == silent_port)
        assert silent["state"] == "ejected"
        assert "no response before the deadline" in str(silent["why"])


async def test_once_the_retry_budget_is_spent_retryable_calls_fail_and_are_counted(
    mesh_certs: MeshCerts, app: App, tmp_path: Path
) -> None:
    # A ratio of 0 leaves the reserve alone: 10 retries a second over the 10 s window, 100 in all.
    annotations = {"kuberpc.io/retry": "unavailable", "kuberpc.io/retry-budget": "0"}
    async with two_replicas(mesh_certs, app, tmp_path, annotations) as mesh:
        calls = 100 // (MAX_ATTEMPTS - 1) + 5  # each failing call spends MAX_ATTEMPTS - 1 retries
        codes = [await mesh.unary(**{"x-fail": "UNAVAILABLE"}) for _ in range(calls)]
        m = await scrape(mesh.client.admin)

        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="unavailable") <= 100
        assert value(m, "kuberpc_retries_total", service=SERVICE, reason="budget_exhausted") >= 5
