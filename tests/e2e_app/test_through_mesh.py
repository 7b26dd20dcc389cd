"""The example clients (Node.js and Python) reach the Arith server through a real proxy pair with mTLS, and the demo runs.

The path is always app -> outbound proxy -> mTLS -> inbound proxy -> `python -m e2e.arith.server`, all on loopback;
the proxies run in the test's event loop, so every other process is driven with asyncio, never by blocking.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from e2e.arith import client
from tests.e2e_app.nodeclient import find_node, run_node_client
from tests.ports import free_port
from tests.sidecar.harness import (
    MeshCerts,
    RunningProxy,
    endpoints_yaml,
    mesh_certs,
    run_proxy,
    wait_for,
    wait_for_endpoints,
)

__all__ = ["mesh_certs"]  # the session fixture, shared with tests/sidecar

REPO = Path(__file__).resolve().parents[2]
SERVICE = "arith.default"
AUTHORITY = f"{SERVICE}:50051"
REPLICA = "arith-mesh-1"
DEADLINE = 30.0  # seconds any one subprocess step (start, a client run, stop) may take
DEMO_BUDGET = 60.0  # the demo promises a whole run "in under a minute"


# ---- the pieces: a server process, a proxy pair in front of it, the Node client -----------------------


@pytest.fixture
def node() -> str:
    return find_node()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), DEADLINE)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def server_port(tmp_path: Path) -> AsyncIterator[int]:
    """`python -m e2e.arith.server` as its own process, as in a pod; yields the port from its 'serving on' line."""
    log = tmp_path / "arith-server.log"
    with log.open("wb") as sink:  # a file, not a pipe: the server's logging can never block on a full pipe
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "e2e.arith.server", "--port", "0", "--replica", REPLICA, "--grace", "1",
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=sink,
        )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
        assert line.startswith("serving on 127.0.0.1:"), f"{line!r}\n{log.read_text(errors='replace')}"
        yield int(line.rsplit(":", 1)[1])
    finally:
        await _stop(proc)


@dataclass(frozen=True)
class Mesh:
    client_side: RunningProxy
    server_side: RunningProxy

    @property
    def outbound(self) -> str:
        return self.client_side.outbound

    def ok_calls(self, direction: str, method: str) -> float:
        """Calls to `method` of the Service that the proxy on that side completed with OK."""
        side = self.client_side if direction == "outbound" else self.server_side
        value = side.proxy.registry.get_sample_value(
            "kuberpc_requests_total",
            {
                "direction": direction,
                "service": SERVICE,
                "method": f"/arith.Arith/{method}",
                "grpc_code": "0",
            },
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def run_mesh(
    certs: MeshCerts,
    app_port: int,
    tmp_path: Path,
    *,
    service_annotations: dict[str, str] | None = None,
    **client_env: str,
) -> AsyncIterator[Mesh]:
    """client proxy -> mTLS -> inbound proxy -> the app at `app_port`; each proxy reads its own discovery file.

    The Service is annotated `kuberpc.io/grpc-services: arith.Arith` unless `service_annotations` says otherwise.
    """
    routed_by_path = {"kuberpc.io/grpc-services": "arith.Arith"}
    annotations = {SERVICE: routed_by_path if service_annotations is None else service_annotations}
    server_disc = tmp_path / "server-endpoints.yaml"
    server_disc.write_text(endpoints_yaml({SERVICE: []}, annotations))
    async with run_proxy(
        certs.server,
        server_disc,
        KUBERPC_INBOUND_ADDR="127.0.0.1:0",
        KUBERPC_APP_PORT=str(app_port),
        KUBERPC_POD_LABELS="app=arith",  # selected by the Service (endpoints_yaml: selector app=arith)
    ) as server_side:
        # Both sides see the same Service, listing the server pod, as an EndpointSlice would.
        both = endpoints_yaml(
            {SERVICE: [{"address": "127.0.0.1", "port": server_side.inbound_port, "tls": True}]},
            annotations,
        )
        server_disc.write_text(both)
        client_disc = tmp_path / "client-endpoints.yaml"
        client_disc.write_text(both)
        async with run_proxy(certs.client, client_disc, **client_env) as client_side:
            await wait_for_endpoints(client_side, SERVICE, 1)
            inbound = server_side.proxy.inbound
            assert inbound is not None
            await wait_for(
                lambda: any(str(k) == SERVICE for k in inbound.catalog.selecting or ()),
                f"the server-side proxy to see {SERVICE} selecting its pod",
            )
            yield Mesh(client_side, server_side)


@pytest.fixture
async def mesh(mesh_certs: MeshCerts, server_port: int, tmp_path: Path) -> AsyncIterator[Mesh]:
    async with run_mesh(mesh_certs, server_port, tmp_path) as m:
        yield m


# ---- 1. the Node.js client ------------------------------------------------------------------------------


async def test_node_client_gets_unary_and_streaming_results_through_the_mesh(node: str, mesh: Mesh) -> None:
    code, out, err = await run_node_client(node, "--target", mesh.outbound, "--authority", AUTHORITY)
    assert code == 0, err
    result = json.loads(out)
    assert (result["add"], result["range"], result["accumulate"]) == (5, [0, 1, 2, 3, 4], [2, 6, 12])


async def test_node_client_sees_the_x_replica_of_the_server_behind_the_mesh(node: str, mesh: Mesh) -> None:
    code, out, err = await run_node_client(node, "--target", mesh.outbound, "--authority", AUTHORITY)
    assert code == 0, err
    assert json.loads(out)["replicas"] == {"Add": REPLICA, "Range": REPLICA, "Accumulate": REPLICA}


async def test_node_client_calls_arrive_through_the_inbound_proxy(node: str, mesh: Mesh) -> None:
    code, _, err = await run_node_client(node, "--target", mesh.outbound, "--authority", AUTHORITY)
    assert code == 0, err
    assert [mesh.ok_calls("inbound", m) for m in ("Add", "Range", "Accumulate")] == [1.0, 1.0, 1.0]


# ---- 2. the Python client: all four call shapes ---------------------------------------------------------

PAIRS = [(1, 2), (3, 4), (5, 6)]
CALLS: dict[str, tuple[Callable[[Any], Awaitable[client.Answer[Any]]], object]] = {
    "unary Add": (lambda s: client.add(s, 40, 2), 42),
    "unary Multiply": (lambda s: client.multiply(s, 6, -7), -42),
    "server-streaming Range": (lambda s: client.range_(s, 3, 8), [3, 4, 5, 6, 7]),
    "client-streaming Sum": (lambda s: client.sum_(s, PAIRS), 21),
    "bidi Accumulate": (lambda s: client.accumulate(s, PAIRS), [3, 10, 21]),
}


@pytest.mark.parametrize("shape", list(CALLS))
async def test_python_client_call_shape_returns_the_servers_answer_through_the_mesh(
    mesh: Mesh, shape: str
) -> None:
    call, expected = CALLS[shape]
    async with client.channel(mesh.outbound, AUTHORITY) as ch:
        answer = await call(client.stub(ch))
    assert (answer.value, answer.replica) == (expected, REPLICA)


# ---- 3. a dedicated upstream port ---------------------------------------------------------------------


async def test_dedicated_upstream_port_reaches_the_service_with_the_raw_target_as_authority(
    mesh_certs: MeshCerts, server_port: int, tmp_path: Path
) -> None:
    # No kuberpc.io/grpc-services on the Service: neither :authority nor path can name it, only the port can.
    local = free_port()
    async with run_mesh(
        mesh_certs, server_port, tmp_path, service_annotations={}, KUBERPC_UPSTREAMS=f"{AUTHORITY}={local}"
    ) as m:
        # No authority option: the call's :authority is the raw target, as in an app that knows nothing of the mesh.
        async with client.channel(f"127.0.0.1:{local}") as ch:
            answer = await client.add(client.stub(ch), 20, 22)
        assert (answer.value, answer.replica) == (42, REPLICA)
        assert m.ok_calls("outbound", "Add") == 1.0  # the client proxy attributed it to the Service


async def test_without_the_upstream_port_the_raw_target_names_no_service(
    mesh_certs: MeshCerts, server_port: int, tmp_path: Path
) -> None:
    # The control for the test above: the same call on the shared outbound port finds nothing to route to.
    async with run_mesh(mesh_certs, server_port, tmp_path, service_annotations={}) as m:
        async with client.channel(m.outbound) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.add(client.stub(ch), 20, 22)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_call_through_the_dedicated_upstream_port_is_still_subject_to_the_services_allow_policy(
    mesh_certs: MeshCerts, server_port: int, tmp_path: Path
) -> None:
    local = free_port()
    async with run_mesh(
        mesh_certs,
        server_port,
        tmp_path,
        service_annotations={"kuberpc.io/allow": "other/*"},  # the client runs as default/client
        KUBERPC_UPSTREAMS=f"{AUTHORITY}={local}",
    ):
        async with client.channel(f"127.0.0.1:{local}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.add(client.stub(ch), 20, 22)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# ---- 4. the demo --------------------------------------------------------------------------------------

SHARE_ROW = re.compile(
    r"^(arith-[123])\s+127\.0\.0\.[234]:15443\s+(\d+)\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%", re.M
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_exits_zero_within_a_minute_and_prints_the_share_table() -> None:
    # Blocking is fine here: this test runs no event loop. On timeout the demo gets SIGTERM, which it turns
    # into stopping every child it started, so no proxy outlives the test.
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "e2e.demo"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    elapsed = time.monotonic() - started
    text = out.decode()
    assert proc.returncode == 0, f"{text}\n{err.decode()}"
    assert elapsed < DEMO_BUDGET
    rows = {m[1]: (int(m[2]), int(m[3]), float(m[4]), float(m[5])) for m in SHARE_ROW.finditer(text)}
    assert sorted(rows) == ["arith-1", "arith-2", "arith-3"], text
    assert [rows[r][0] for r in sorted(rows)] == [1, 2, 3]  # weights
    assert sum(calls for _, calls, _, _ in rows.values()) == 1200
    assert all(abs(share - expected) <= 2.0 for _, _, share, expected in rows.values()), text
    assert "OK: every call succeeded" in text
