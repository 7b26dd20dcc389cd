"""Finding 2 with the API's own objects: a victim proxy discovering through the (fake) Kubernetes API refuses a
caller who names a Service of another namespace whose hand-written EndpointSlice lists the victim's pod.

The caller runs its own proxy with its own endpoints file, as an attacker controlling their pod could.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import yaml

from tests.kubefake import FakeCluster, cluster, free_loopback_addresses, kubeconfig
from tests.sidecar.harness import GRPC_OPTIONS, MeshCerts, run_proxy, start_backend, wait_for
from tests.sidecar.test_kube_discovery import endpoint, endpoint_slice, pod, service

__all__ = ["cluster"]

SLICE_TO_INBOUND = [{"name": "grpc", "port": 15443, "protocol": "TCP"}]


async def test_a_hand_written_slice_in_another_namespace_does_not_bring_its_weaker_allow(
    cluster: FakeCluster, mesh_certs: MeshCerts, tmp_path: Path
) -> None:
    (ip,) = free_loopback_addresses(1)
    cluster.put(
        service("echo", annotations={"kuberpc.io/allow": "default/payments"}, selector={"app": "echo"}),
        endpoint_slice("echo-a", "echo", endpoint(ip, "echo-0")),
        pod("echo-0", ip),
        # The attacker's namespace: a Service with no allow (and even a selector matching the victim's labels)
        # and a slice written by hand listing the victim's address at its inbound port.
        service("evil", ns="attacker", selector={"app": "echo"}),
        endpoint_slice("evil-a", "evil", endpoint(ip), ns="attacker", ports=SLICE_TO_INBOUND),
    )
    attacker_file = tmp_path / "attacker.yaml"
    attacker_file.write_text(
        yaml.safe_dump(
            {
                "services": [
                    {"name": name, "namespace": ns, "endpoints": [{"address": ip, "port": 15443, "tls": True}]}
                    for name, ns in (("evil", "attacker"), ("echo", "default"))
                ]
            }
        )
    )
    config = kubeconfig(tmp_path / "kubeconfig", cluster.url)
    with start_backend("victim") as app:
        async with (
            run_proxy(
                mesh_certs.server,
                tmp_path / "unused.yaml",
                KUBERPC_DISCOVERY="kubernetes",
                KUBECONFIG=str(config),
                POD_NAME="echo-0",
                POD_IP=ip,
                KUBERPC_INBOUND_ADDR=f"{ip}:15443",
                KUBERPC_APP_PORT=str(app.port),
            ) as victim,
            run_proxy(mesh_certs.client, attacker_file) as attacker,
        ):
            inbound = victim.proxy.inbound
            assert inbound is not None
            await wait_for(
                lambda: {str(k) for k in inbound.catalog.services} >= {"echo.default", "evil.attacker"}
                and {str(k) for k in inbound.catalog.selecting or ()} == {"echo.default"},
                "the victim to see both Services, and only echo selecting it",
            )
            await wait_for(lambda: len(attacker.proxy.outbound.services) == 2, "the attacker's catalog")
            for authority in ("evil.attacker:50051", "echo.default:50051"):
                options = [*GRPC_OPTIONS, ("grpc.default_authority", authority)]
                async with grpc.aio.insecure_channel(attacker.outbound, options=options) as ch:
                    call = ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
                    try:
                        await call
                    except grpc.aio.AioRpcError:
                        pass
                    assert await call.code() == grpc.StatusCode.PERMISSION_DENIED, authority
                    assert "is not allowed to call echo.default" in (await call.details() or "")
    assert app.state.seen_metadata == []
