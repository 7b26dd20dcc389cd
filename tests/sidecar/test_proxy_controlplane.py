"""The proxy with control-plane discovery, as a user sees it: readiness waits for the declared upstreams, a Service
first named by a call is subscribed on demand, the last known endpoints serve while no control plane answers (and
/debug and /metrics say so), a removed endpoint finishes its open calls, inbound follows the Services selecting
the pod. Real proxies and real gRPC on loopback; the control plane is the test double of its wire."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from proto import discovery_pb2 as pb
from sidecar import config as config_mod
from sidecar import pki as _pki
from sidecar.app import Proxy, serve
from tests.ports import free_port
from tests.sidecar.fake_control_plane import (
    FakeControlPlane,
    FakeService,
    RunningPlane,
    ServerCert,
    endpoint,
    server_cert,
)
from tests.sidecar.harness import (
    GRPC_OPTIONS,
    Backend,
    RunningProxy,
    Workload,
    _issue,
    endpoints_yaml,
    run_proxy,
    start_backend,
    wait_for,
)
from tests.sidecar.test_mesh import scrape
from tests.sidecar.test_resilience import App, app

__all__ = ["app"]  # the fixture


@dataclass(frozen=True)
class Pki:
    client: Workload
    server: Workload
    plane: ServerCert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("cp-mesh")
    _ca = _pki.create_ca(trust_domain="cluster.local")
    ca_key, ca_cert = _ca.key_pem, _ca.cert_pem
    return Pki(
        _issue(ca_key, ca_cert, root / "client", "default", "client"),
        _issue(ca_key, ca_cert, root / "server", "default", "arith"),
        server_cert(ca_key, ca_cert),
    )


@pytest.fixture
def plane() -> FakeControlPlane:
    return FakeControlPlane()


@pytest.fixture
def replica(plane: FakeControlPlane, pki: Pki) -> Iterator[RunningPlane]:
    r = RunningPlane(plane, pki.plane)
    r.start()
    yield r
    r.stop()


@contextlib.asynccontextmanager
async def server_side(pki: Pki, backend: Backend | App, tmp_path: Path, name: str) -> AsyncIterator[RunningProxy]:
    """A proxy in front of `backend` whose inbound admits any mesh identity (file discovery: not under test)."""
    disc = tmp_path / f"{name}.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    async with run_proxy(
        pki.server, disc, KUBERPC_INBOUND_ADDR="127.0.0.1:0", KUBERPC_APP_PORT=str(backend.port),
        KUBERPC_POD_LABELS="app=echo",
    ) as p:  # fmt: skip
        yield p


@contextlib.asynccontextmanager
async def echo_and_client(
    replica: RunningPlane, pki: Pki, tmp_path: Path
) -> AsyncIterator[tuple[Backend, RunningProxy, Proxy]]:
    """Backend "a" behind its proxy (file discovery), and a client proxy fed by `replica`."""
    with start_backend("a") as backend:
        async with server_side(pki, backend, tmp_path, "a") as srv, cp_proxy(cp_env(replica, pki)) as client:
            yield backend, srv, client


def echo(*endpoints: pb.Endpoint, allow: list[str] | None = None) -> FakeService:
    policy = pb.Policy(grpc_services=["test.Echo"], allow=allow or [], allow_any=allow is None)
    return FakeService(list(endpoints), policy=policy, selector={"app": "echo"})


def cp_env(replica: RunningPlane, pki: Pki, workload: Workload | None = None, **env: str) -> dict[str, str]:
    w = workload or pki.client
    return {
        "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0",
        "KUBERPC_ADMIN_ADDR": "127.0.0.1:0",
        "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
        "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_DISCOVERY": f"control-plane:localhost:{replica.port}",
        "KUBERPC_TLS_CERT": w.cert,
        "KUBERPC_TLS_KEY": w.key,
        "KUBERPC_TRUST_ANCHORS": w.ca,
        "KUBERPC_DRAIN_SECONDS": "1",
        "POD_NAMESPACE": "default",
        **env,
    }


@contextlib.asynccontextmanager
async def cp_proxy(environ: dict[str, str], *, ready_within: float = 10.0) -> AsyncIterator[Proxy]:
    cfg = config_mod.load(environ)
    stop = asyncio.Event()
    started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    try:
        done, _ = await asyncio.wait({task, started}, timeout=ready_within, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
        assert started in done, f"proxy not ready within {ready_within} s"
        yield started.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def outbound(p: Proxy) -> str:
    return f"127.0.0.1:{p.bound_port('outbound')}"


async def call(target: str, authority: str, path: str = "/test.Echo/Unary", timeout: float = 10) -> tuple[grpc.StatusCode, str, str]:
    """(status, details, the backend that served it)."""
    async with grpc.aio.insecure_channel(target, options=[*GRPC_OPTIONS, ("grpc.default_authority", authority)]) as ch:
        c = ch.unary_unary(path)(b"x", timeout=timeout)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await c
        md = dict(await c.initial_metadata() or ())
        return await c.code(), await c.details() or "", str(md.get("x-served-by", ""))


async def discovery_debug(p: Proxy) -> dict[str, object]:
    """/debug's discovery section, fetched from a thread (the proxy runs in this event loop)."""

    def fetch() -> dict[str, object]:
        url = f"http://127.0.0.1:{p.bound_port('debug')}/debug"
        with urllib.request.urlopen(url, timeout=5) as resp:
            out: dict[str, object] = json.loads(resp.read())["discovery"]
            return out

    return await asyncio.to_thread(fetch)


async def test_the_proxy_is_ready_only_once_its_declared_upstream_is_answered(
    plane: FakeControlPlane, pki: Pki
) -> None:
    plane.set_service("default", "echo", echo(endpoint("127.0.0.1", 1)))
    replica = RunningPlane(plane, pki.plane)
    replica.start()
    plane.refuse = "UNAVAILABLE"  # no control plane answers yet
    cfg = config_mod.load(cp_env(replica, pki, KUBERPC_UPSTREAMS=f"echo.default:50051={free_port()}"))
    stop = asyncio.Event()
    started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    try:
        await asyncio.sleep(0)  # let serve() bind and start its source
        done, _ = await asyncio.wait({task, started}, timeout=1.5, return_when=asyncio.FIRST_COMPLETED)
        assert not done, "ready (or dead) with no control plane answering"
        plane.refuse = None
        done, _ = await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert started in done
        proxy = started.result()
        assert proxy.not_ready_because() == []
        assert [(s.namespace, s.name) for s in plane.requests[0].subscribe] == [("default", "echo")]
    finally:
        replica.stop()
        stop.set()
        await asyncio.wait_for(task, 15)


async def test_a_service_first_named_by_authority_is_subscribed_and_the_first_call_waits_for_it(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    async with echo_and_client(replica, pki, tmp_path) as (backend, srv, client):
        plane.set_service("default", "echo", echo(endpoint("127.0.0.1", srv.inbound_port)))
        assert await call(outbound(client), "echo.default:50051") == (grpc.StatusCode.OK, "", "a")
        assert any(s.name == "echo" for r in plane.requests for s in r.subscribe)
        # The next calls find it in the catalog (no second subscription).
        assert (await call(outbound(client), "echo"))[0] == grpc.StatusCode.OK
        assert sum(s.name == "echo" for r in plane.requests for s in r.subscribe) == 1


async def test_the_first_call_to_a_service_named_on_demand_gets_the_services_default_deadline(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    async with echo_and_client(replica, pki, tmp_path) as (backend, srv, client):
        svc = echo(endpoint("127.0.0.1", srv.inbound_port))
        svc.policy.timeout_seconds = 0.5
        plane.set_service("default", "echo", svc)
        opts = [*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")]
        started = time.monotonic()
        async with grpc.aio.insecure_channel(outbound(client), options=opts) as ch:
            # No deadline of the caller's; the app would take 3 s. Nothing about echo is known yet: this call
            # is the one that subscribes to it.
            first = ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-sleep-ms", "3000"),))  # type: ignore[arg-type]
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await first
        took = time.monotonic() - started
        assert sum(s.name == "echo" for r in plane.requests for s in r.subscribe) == 1
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < 2.0, f"the Service's 0.5 s deadline was not applied ({took:.2f} s)"
        seen = backend.state.seen_deadline[0]
        assert seen is not None and seen <= 0.5, f"the app was not told the deadline ({seen})"


async def test_the_callers_deadline_is_cut_by_the_time_the_first_call_waited_for_the_control_plane(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    async with echo_and_client(replica, pki, tmp_path) as (backend, srv, client):
        plane.set_service("default", "echo", echo(endpoint("127.0.0.1", srv.inbound_port)))
        opts = [*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")]
        held = threading.Event()

        def slow_control_plane() -> None:
            with plane.lock:  # the fake answers subscriptions under this lock: 1 s late
                held.set()
                time.sleep(1.0)

        holder = threading.Thread(target=slow_control_plane)
        holder.start()
        held.wait(5)
        try:
            async with grpc.aio.insecure_channel(outbound(client), options=opts) as ch:
                assert await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=3.0) == b"x"  # type: ignore[arg-type]
        finally:
            holder.join()
        seen = backend.state.seen_deadline[0]
        assert seen is not None and 1.0 < seen < 2.2, f"the app was told {seen} s of a 3 s call that waited 1 s"


async def test_the_first_call_to_a_service_named_on_demand_is_retried_by_the_services_policy(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path, app: App
) -> None:
    async with server_side(pki, app, tmp_path, "a") as srv, cp_proxy(cp_env(replica, pki)) as client:
        svc = echo(endpoint("127.0.0.1", srv.inbound_port))
        svc.policy.retry_on.append("UNAVAILABLE")
        plane.set_service("default", "echo", svc)
        opts = [*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")]
        async with grpc.aio.insecure_channel(outbound(client), options=opts) as ch:
            md = (("x-fail", "UNAVAILABLE"), ("x-fail-once", "1"))
            first = ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10, metadata=md)  # type: ignore[arg-type]
            assert await first == b"x"
        assert sum(s.name == "echo" for r in plane.requests for s in r.subscribe) == 1
        assert [m.get("grpc-previous-rpc-attempts") for m in app.seen] == [None, "1"]
        metrics = await scrape(f"127.0.0.1:{client.bound_port('admin')}")
        assert metrics[("kuberpc_retries_total", (("reason", "unavailable"), ("service", "echo.default")))] == 1


async def test_a_call_named_only_by_its_grpc_service_is_routed_once_the_claims_arrive(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    async with echo_and_client(replica, pki, tmp_path) as (backend, srv, client):
        plane.set_service("default", "echo", echo(endpoint("127.0.0.1", srv.inbound_port)))
        assert await call(outbound(client), outbound(client)) == (grpc.StatusCode.OK, "", "a")
        assert [r.grpc_services for r in plane.requests if r.grpc_services] == [["test.Echo"]]


async def test_a_service_the_control_plane_does_not_know_fails_unavailable_naming_it(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki
) -> None:
    async with cp_proxy(cp_env(replica, pki)) as client:
        started = time.monotonic()
        code, details, _ = await call(outbound(client), "ghost.default:50051", path="/ghost.Ghost/Boo")
        assert code == grpc.StatusCode.UNAVAILABLE and "ghost.default" in details
        assert time.monotonic() - started < 3.0  # answered by the control plane, not by the bounded wait


async def test_with_no_control_plane_known_services_keep_working_new_ones_fail_after_the_bounded_wait(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    with start_backend("a") as backend:
        async with server_side(pki, backend, tmp_path, "a") as srv:
            plane.set_service("default", "echo", echo(endpoint("127.0.0.1", srv.inbound_port)))
            env = cp_env(replica, pki, KUBERPC_UPSTREAMS=f"echo.default:50051={free_port()}")
            async with cp_proxy(env) as client:
                metrics = await scrape(f"127.0.0.1:{client.bound_port('admin')}")
                assert metrics[("kuberpc_discovery_last_update_age_seconds", ())] == 0.0
                replica.stop()
                deadline = time.monotonic() + 10
                while (seen := await discovery_debug(client))["current"] is not False:
                    assert time.monotonic() < deadline, "the stream never seen down"
                    await asyncio.sleep(0.05)
                assert (await call(outbound(client), "echo.default:50051"))[0] == grpc.StatusCode.OK
                seen = await discovery_debug(client)
                assert seen["last_error"] and isinstance(seen["last_update_age_seconds"], float)
                assert seen["last_update_age_seconds"] > 0
                metrics = await scrape(f"127.0.0.1:{client.bound_port('admin')}")
                assert metrics[("kuberpc_discovery_last_update_age_seconds", ())] > 0
                started = time.monotonic()
                code, details, _ = await call(outbound(client), "other.default:50051", path="/other.Other/X")
                assert code == grpc.StatusCode.UNAVAILABLE
                assert "no answer from the control plane" in details and "other.default" in details
                assert 4.0 <= time.monotonic() - started < 9.0


async def test_a_removed_endpoint_takes_no_new_calls_while_its_open_call_finishes(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    with start_backend("a") as backend_a, start_backend("b") as backend_b:
        async with (
            server_side(pki, backend_a, tmp_path, "a") as srv_a,
            server_side(pki, backend_b, tmp_path, "b") as srv_b,
        ):
            a = endpoint("127.0.0.1", srv_a.inbound_port)
            plane.set_service("default", "echo", echo(a))
            env = cp_env(replica, pki, KUBERPC_UPSTREAMS=f"echo.default:50051={free_port()}")
            async with cp_proxy(env) as client, grpc.aio.insecure_channel(
                outbound(client), options=[("grpc.default_authority", "echo.default")]
            ) as ch:
                stream = ch.stream_stream("/test.Echo/Bidi")(timeout=20)
                await stream.write(b"one")
                assert await stream.read() == b"one"
                assert dict(await stream.initial_metadata())["x-served-by"] == "a"
                plane.delta("default", "echo", pb.ServiceUpdate(
                    endpoints=[endpoint("127.0.0.1", srv_b.inbound_port)], removed=[pb.EndpointKey(address="127.0.0.1", port=a.port)],
                ))  # fmt: skip
                await wait_for(
                    lambda: [e.port for e in client.outbound.catalog.services[_echo()].endpoints] == [srv_b.inbound_port],
                    "the delta",
                )
                served = [(await call(outbound(client), "echo.default"))[2] for _ in range(5)]
                assert served == ["b"] * 5
                await stream.write(b"two")  # the open call on the removed endpoint goes on
                assert await stream.read() == b"two"
                await stream.done_writing()
                assert await stream.code() == grpc.StatusCode.OK


def _echo() -> object:
    from sidecar.model import ServiceKey

    return ServiceKey("echo", "default")


async def test_inbound_follows_the_services_selecting_the_pod_and_their_allow_changes_without_restart(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki
) -> None:
    plane.pod_labels[("default", "echo-0")] = {"app": "echo"}
    with start_backend("a") as backend:
        server_env = cp_env(
            replica, pki, pki.server, KUBERPC_INBOUND_ADDR="127.0.0.1:0", KUBERPC_APP_PORT=str(backend.port),
            POD_NAME="echo-0",
        )  # fmt: skip
        plane.set_service("default", "echo", echo(allow=["default/client"]))
        async with cp_proxy(server_env) as srv:
            plane.set_service(
                "default", "echo", echo(endpoint("127.0.0.1", srv.bound_port("inbound")), allow=["default/client"])
            )
            async with cp_proxy(cp_env(replica, pki)) as client:
                assert (await call(outbound(client), "echo.default"))[0] == grpc.StatusCode.OK
                plane.set_service(
                    "default", "echo", echo(endpoint("127.0.0.1", srv.bound_port("inbound")), allow=["default/other"])
                )

                async def denied() -> bool:
                    return (await call(outbound(client), "echo.default"))[0] == grpc.StatusCode.PERMISSION_DENIED

                deadline = time.monotonic() + 10
                while not await denied():
                    assert time.monotonic() < deadline, "the allow change never took effect"
                    await asyncio.sleep(0.05)


async def test_a_proxy_whose_pod_the_control_plane_does_not_know_says_so_until_it_does(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    plane.known_pods_only = True
    plane.set_service("default", "echo", echo())
    debug_port = free_port()
    with start_backend("a") as backend:
        env = cp_env(
            replica, pki, pki.server, KUBERPC_INBOUND_ADDR="127.0.0.1:0", KUBERPC_APP_PORT=str(backend.port),
            POD_NAME="echo-0", KUBERPC_DEBUG_ADDR=f"127.0.0.1:{debug_port}",
        )  # fmt: skip
        stop = asyncio.Event()
        started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
        monkey = pytest.MonkeyPatch()
        monkey.setattr("sidecar.discovery.controlplane.WAITING_WARN_S", 0.5)
        task = asyncio.create_task(serve(config_mod.load(env), stop=stop, started=started))
        try:

            def reasons() -> list[str]:
                with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/debug", timeout=5) as resp:
                    why: list[str] = json.loads(resp.read())["not_ready_because"]
                    return why

            deadline = time.monotonic() + 10
            while True:
                why = await asyncio.to_thread(_or_empty, reasons)
                if any("pod default/echo-0" in w for w in why):
                    break
                assert time.monotonic() < deadline, f"readiness never named the pod: {why}"
                await asyncio.sleep(0.1)
            assert any("kuberpc.io/injected=true" in w for w in why)
            await asyncio.sleep(0.7)
            assert not started.done()
            assert "still not ready" in caplog.text and "pod default/echo-0" in caplog.text
            with plane.lock:
                plane.pod_labels[("default", "echo-0")] = {"app": "echo"}
            plane.set_service("default", "echo", echo())  # any push: the pod is now known and answered
            await asyncio.wait_for(asyncio.shield(started), 10)
            assert started.result().not_ready_because() == []
        finally:
            monkey.undo()
            stop.set()
            await asyncio.wait_for(task, 15)


def _or_empty(fetch: Callable[[], list[str]]) -> list[str]:
    """`fetch()`, or [] while the debug listener is not bound yet."""
    try:
        return fetch()
    except OSError:
        return []


async def test_an_authority_naming_a_service_not_yet_known_wins_over_a_known_grpc_service_claim(
    plane: FakeControlPlane, replica: RunningPlane, pki: Pki, tmp_path: Path
) -> None:
    with start_backend("a") as backend_a, start_backend("b") as backend_b:
        async with (
            server_side(pki, backend_a, tmp_path, "a") as srv_a,
            server_side(pki, backend_b, tmp_path, "b") as srv_b,
        ):
            plane.set_service("default", "echo", echo(endpoint("127.0.0.1", srv_a.inbound_port)))  # claims test.Echo
            plane.set_service("default", "other", FakeService([endpoint("127.0.0.1", srv_b.inbound_port)]))
            env = cp_env(replica, pki, KUBERPC_UPSTREAMS=f"echo.default:50051={free_port()}")
            async with cp_proxy(env) as client:
                # The path's gRPC name is claimed by a Service the proxy holds; the authority names another.
                assert await call(outbound(client), "other.default:50051") == (grpc.StatusCode.OK, "", "b")
