"""Authorization that holds, attack by attack (issue 15): real proxies, real gRPC and mTLS, on loopback.

Each test sets up what an attacker could (a Service in another namespace, a hand-written endpoint listing the
victim, a second CA in the trust anchors) and shows the call refused and the attacker's backend untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml

from sidecar import identity, pki
from tests.sidecar.harness import (
    GRPC_OPTIONS,
    Backend,
    MeshCerts,
    RunningProxy,
    Workload,
    run_proxy,
    start_backend,
    wait_for,
)

SECRET = ("authorization", "Bearer victim-secret")


def service(
    name: str,
    endpoints: list[dict[str, object]],
    *,
    annotations: dict[str, str] | None = None,
    selector: dict[str, str] | None = None,
) -> dict[str, object]:
    svc, ns = name.split(".")
    return {
        "name": svc,
        "namespace": ns,
        "ports": [50051],
        "annotations": annotations or {},
        "selector": selector or {},
        "endpoints": endpoints,
    }


def meshed(proxy: RunningProxy) -> dict[str, object]:
    return {"address": "127.0.0.1", "port": proxy.inbound_port, "tls": True}


def plain(backend: Backend) -> dict[str, object]:
    return {"address": "127.0.0.1", "port": backend.port, "tls": False}


def write(path: Path, *services: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"services": list(services)}))
    tmp.replace(path)


async def call(target: str, authority: str | None = None) -> grpc.aio.UnaryUnaryCall:
    """One unary call carrying a secret, as an app would make it (gRPC's default authority unless given)."""
    options = [*GRPC_OPTIONS] + ([("grpc.default_authority", authority)] if authority else [])
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        c = ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10, metadata=(SECRET,))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await c
        return c


async def served_by(c: grpc.aio.UnaryUnaryCall) -> str:
    return str(dict(await c.initial_metadata()).get("x-served-by", ""))


@contextlib.asynccontextmanager
async def victim_pod(
    mesh_certs: MeshCerts, disc: Path, app: Backend, workload: Workload | None = None
) -> AsyncIterator[RunningProxy]:
    """The victim: a meshed pod labelled app=echo in `default`, its proxy in front of `app`."""
    write(disc)
    async with run_proxy(
        workload or mesh_certs.server,
        disc,
        KUBERPC_INBOUND_ADDR="127.0.0.1:0",
        KUBERPC_APP_PORT=str(app.port),
        KUBERPC_POD_LABELS="app=echo",
    ) as server:
        yield server


async def selected(p: RunningProxy, *services: str) -> None:
    """Wait until the pod's inbound is open and knows these Services select it."""
    inbound = p.proxy.inbound
    assert inbound is not None
    names = set(services)
    await wait_for(
        lambda: inbound.closed_because() is None and names == {str(k) for k in inbound.catalog.selecting or ()},
        f"inbound to see {names} selecting the pod",
    )


async def loaded(p: RunningProxy, *services: str) -> None:
    names = set(services)
    await wait_for(lambda: names <= {str(k) for k in p.proxy.outbound.catalog.services}, f"{names} in the catalog")


# ---- finding 1: calls hijacked across namespaces by path routing -------------------------------------


async def test_a_service_of_another_namespace_claiming_the_grpc_service_gets_no_call(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("victim") as victim_app, start_backend("attacker") as attacker_app:
        async with victim_pod(mesh_certs, disc, victim_app) as server:
            # `a.attacker` sorts before `echo.default`: the first-sorted claimant in the cluster used to win.
            write(
                disc,
                service("a.attacker", [plain(attacker_app)], annotations={"kuberpc.io/grpc-services": "test.Echo"}),
                service(
                    "echo.default",
                    [meshed(server)],
                    annotations={"kuberpc.io/grpc-services": "test.Echo"},
                    selector={"app": "echo"},
                ),
            )
            async with run_proxy(mesh_certs.client, disc) as client:
                await loaded(client, "a.attacker", "echo.default")
                await selected(server, "echo.default")
                c = await call(client.outbound)  # authority 127.0.0.1:<port>: routed by path
                assert await c.code() == grpc.StatusCode.OK
                assert await served_by(c) == "victim"
    assert attacker_app.state.seen_metadata == []


async def test_with_no_claimant_in_the_callers_namespace_another_namespaces_claim_is_unavailable(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("attacker") as attacker_app:
        write(disc, service("a.attacker", [plain(attacker_app)], annotations={"kuberpc.io/grpc-services": "test.Echo"}))
        async with run_proxy(mesh_certs.client, disc) as client:
            await loaded(client, "a.attacker")
            c = await call(client.outbound)
            assert await c.code() == grpc.StatusCode.UNAVAILABLE
            assert "in namespace default" in (await c.details() or "")
    assert attacker_app.state.seen_metadata == []  # neither the call nor its authorization header


async def test_two_claimants_in_the_callers_namespace_are_unavailable_naming_both(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("one") as one, start_backend("two") as two:
        claims = {"kuberpc.io/grpc-services": "test.Echo"}
        write(
            disc,
            service("echo.default", [plain(one)], annotations=claims),
            service("impostor.default", [plain(two)], annotations=claims),
        )
        async with run_proxy(mesh_certs.client, disc) as client:
            await loaded(client, "echo.default", "impostor.default")
            c = await call(client.outbound)
            assert await c.code() == grpc.StatusCode.UNAVAILABLE
            assert "'echo.default' and 'impostor.default'" in (await c.details() or "")
    assert one.state.seen_metadata == two.state.seen_metadata == []


async def test_a_service_exporting_its_grpc_names_is_reached_from_another_namespace(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("shared") as shared:
        exported = {"kuberpc.io/grpc-services": "test.Echo", "kuberpc.io/export-grpc-services": "true"}
        write(disc, service("echo.platform", [plain(shared)], annotations=exported))
        async with run_proxy(mesh_certs.client, disc) as client:
            await loaded(client, "echo.platform")
            c = await call(client.outbound)
            assert await c.code() == grpc.StatusCode.OK
            assert await served_by(c) == "shared"


async def test_calls_to_a_non_meshed_endpoint_are_labelled_tls_false_in_metrics_and_debug(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("plain") as plain_app:
        write(disc, service("echo.default", [plain(plain_app)], annotations={"kuberpc.io/grpc-services": "test.Echo"}))
        async with run_proxy(mesh_certs.client, disc) as client:
            await loaded(client, "echo.default")
            assert await (await call(client.outbound)).code() == grpc.StatusCode.OK
            metrics, debug = await asyncio.to_thread(
                fetch, client.admin, f"127.0.0.1:{client.proxy.bound_port('debug')}"
            )
    assert (
        'kuberpc_requests_total{direction="outbound",grpc_code="0",method="/test.Echo/Unary",'
        'service="echo.default",tls="false"} 1.0'
    ) in metrics
    (endpoint,) = json.loads(debug)["routes"]["services"]["echo.default"]["endpoints"]
    assert (endpoint["port"], endpoint["tls"]) == (plain_app.port, False)


def fetch(admin: str, debug: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as m, urllib.request.urlopen(
        f"http://{debug}/debug", timeout=5
    ) as d:
        return m.read().decode(), d.read().decode()


# ---- finding 2: `allow` bypassed by naming another Service -----------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        # A Service of another namespace whose hand-written endpoints list the victim's pod (and even a
        # selector matching its labels: selectors apply in their own namespace only).
        "evil.attacker",
        # A second Service in the victim's namespace listing the victim's pod without selecting it.
        "evil.default",
    ],
)
async def test_naming_a_service_that_does_not_select_the_pod_does_not_weaken_allow(
    mesh_certs: MeshCerts, tmp_path: Path, other: str
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("victim") as victim_app:
        async with victim_pod(mesh_certs, disc, victim_app) as server:
            write(
                disc,
                service(
                    "echo.default",
                    [meshed(server)],
                    annotations={"kuberpc.io/allow": "default/payments"},
                    selector={"app": "echo"},
                ),
                service(other, [meshed(server)], selector={"app": "echo"} if "attacker" in other else {"app": "evil"}),
            )
            async with run_proxy(mesh_certs.client, disc) as client:
                await loaded(client, "echo.default", other)
                await selected(server, "echo.default")
                direct = await call(client.outbound, "echo.default:50051")
                assert await direct.code() == grpc.StatusCode.PERMISSION_DENIED
                around = await call(client.outbound, f"{other}:50051")
                assert await around.code() == grpc.StatusCode.PERMISSION_DENIED
                details = await around.details() or ""
                assert "spiffe://cluster.local/ns/default/sa/client is not allowed to call echo.default" in details
    assert victim_app.state.seen_metadata == []


async def test_a_caller_the_selecting_service_allows_is_served_whatever_else_lists_the_pod(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("victim") as victim_app:
        async with victim_pod(mesh_certs, disc, victim_app) as server:
            write(
                disc,
                service(
                    "echo.default",
                    [meshed(server)],
                    annotations={"kuberpc.io/allow": "default/client"},
                    selector={"app": "echo"},
                ),
                service("evil.attacker", [meshed(server)], annotations={"kuberpc.io/allow": "attacker/*"}),
            )
            async with run_proxy(mesh_certs.client, disc) as client:
                await loaded(client, "echo.default", "evil.attacker")
                await selected(server, "echo.default")
                for authority in ("echo.default:50051", "evil.attacker:50051"):
                    c = await call(client.outbound, authority)
                    assert await c.code() == grpc.StatusCode.OK, authority


async def test_a_pod_no_service_selects_refuses_every_caller(mesh_certs: MeshCerts, tmp_path: Path) -> None:
    disc = tmp_path / "endpoints.yaml"
    with start_backend("victim") as victim_app:
        async with victim_pod(mesh_certs, disc, victim_app) as server:
            write(disc, service("echo.default", [meshed(server)], selector={"app": "other"}))
            async with run_proxy(mesh_certs.client, disc) as client:
                await loaded(client, "echo.default")
                await selected(server)
                await wait_for(lambda: len(server.proxy.inbound.catalog) == 1, "the catalog")  # type: ignore[union-attr]
                c = await call(client.outbound, "echo.default:50051")
                assert await c.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "no Service in namespace default selects this pod" in (await c.details() or "")
    assert victim_app.state.seen_metadata == []


# ---- finding 4: a second trust domain in the anchors --------------------------------------------------


def second_trust_domain(mesh_certs: MeshCerts, tmp_path: Path) -> tuple[Workload, Workload]:
    """Rotation or federation: anchors holding a second CA, whose workload has the same ns/sa as the mesh's
    client. Returns (the foreign client, the mesh's server trusting both CAs)."""
    other = pki.create_ca(trust_domain="other.cluster")
    other_cert = other.cert_pem
    foreign_id = identity.SpiffeId("other.cluster", "default", "client")
    issued = pki.issue_workload(other, identity=foreign_id)
    key, chain = issued.key_pem, issued.cert_pem
    bundle = tmp_path / "anchors.pem"
    bundle.write_bytes(Path(mesh_certs.server.ca).read_bytes() + other_cert)
    (tmp_path / "foreign.key").write_bytes(key)
    (tmp_path / "foreign.pem").write_bytes(chain)
    foreign = Workload(str(tmp_path / "foreign.pem"), str(tmp_path / "foreign.key"), str(bundle), str(foreign_id))
    return foreign, Workload(mesh_certs.server.cert, mesh_certs.server.key, str(bundle), mesh_certs.server.spiffe)


async def test_an_identity_of_another_trust_domain_is_refused_before_allow(mesh_certs: MeshCerts, tmp_path: Path) -> None:
    foreign, server_wl = second_trust_domain(mesh_certs, tmp_path)
    disc = tmp_path / "endpoints.yaml"
    with start_backend("victim") as victim_app:
        async with victim_pod(mesh_certs, disc, victim_app, server_wl) as server:
            write(
                disc,
                service(
                    "echo.default",
                    [meshed(server)],
                    annotations={"kuberpc.io/allow": "default/client"},
                    selector={"app": "echo"},
                ),
            )
            async with run_proxy(foreign, disc) as client:
                await loaded(client, "echo.default")
                await selected(server, "echo.default")
                c = await call(client.outbound, "echo.default:50051")
                assert await c.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "not in the mesh trust domain 'cluster.local'" in (await c.details() or "")
    assert victim_app.state.seen_metadata == []


# ---- finding 3: closed until discovery has spoken and the certificate is valid -----------------------


def test_inbound_is_closed_until_it_knows_who_selects_the_pod_and_holds_a_valid_certificate() -> None:
    from prometheus_client import CollectorRegistry

    from sidecar.inbound import Inbound
    from sidecar.metrics import Metrics
    from sidecar.model import Catalog, Endpoint

    now = [1000.0]
    inbound = Inbound(
        app=Endpoint("127.0.0.1", 1, tls=False),
        namespace="default",
        trust_domain="cluster.local",
        metrics=Metrics(CollectorRegistry()),
        clock=lambda: now[0],
    )
    assert inbound.closed_because() == "discovery has not yet said which Services select this pod"
    inbound.update(Catalog([], selecting=frozenset()))
    assert inbound.closed_because() == "this proxy has no valid certificate"
    inbound.certified(2000.0)
    assert inbound.closed_because() is None
    now[0] = 2000.0
    assert inbound.closed_because() == "this proxy has no valid certificate"


async def test_a_changed_allow_applies_at_once_to_calls_on_an_open_connection(
    mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    disc = tmp_path / "endpoints.yaml"

    def echo(allow: str) -> dict[str, object]:
        return service("echo.default", [meshed(server)], annotations={"kuberpc.io/allow": allow}, selector={"app": "echo"})

    with start_backend("victim") as victim_app:
        async with victim_pod(mesh_certs, disc, victim_app) as server:
            write(disc, echo("default/client"))
            async with run_proxy(mesh_certs.client, disc) as client:
                await selected(server, "echo.default")
                await loaded(client, "echo.default")
                options = [*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")]
                async with grpc.aio.insecure_channel(client.outbound, options=options) as ch:
                    unary = ch.unary_unary("/test.Echo/Unary")
                    assert await unary(b"x", timeout=10) == b"x"
                    inbound = server.proxy.inbound
                    assert inbound is not None
                    before = inbound.catalog
                    write(disc, echo("default/payments"))
                    await wait_for(lambda: inbound.catalog is not before, "the new policy")
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await unary(b"x", timeout=10)
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(victim_app.state.seen_metadata) == 1
