"""Issue 15 findings 3 and 5 with whole proxy processes in pod network namespaces (prefix k15-, 203.0.113.0/24):
inbound refuses every call until discovery has said which Services select the pod, and /debug is not reachable
from another pod while /ready and /metrics are.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from e2e import netns
from tests.e2e.conftest import PYTHON, REPO, child_env, skip_or_fail, tail, unavailable_reason

pytestmark = [pytest.mark.netns]

PREFIX = "k15-"
SUBNET = "203.0.113.0/24"  # TEST-NET-3
SERVER_IP, CLIENT_IP = "203.0.113.10", "203.0.113.20"
STEP_TIMEOUT = 30.0  # seconds a proxy may take to start, or to act on a changed endpoints file

# Runs in the client pod: one Add through the local proxy; prints {"code", "details", "replica"} as JSON.
CALL_SCRIPT = """
import asyncio, json, sys
import grpc
from e2e.arith import client

async def main():
    async with client.channel("127.0.0.1:15001", "arith.default:50051") as ch:
        try:
            answer = await client.add(client.stub(ch), 1, 2)
        except grpc.aio.AioRpcError as e:
            print(json.dumps({"code": e.code().name, "details": e.details(), "replica": ""}))
        else:
            print(json.dumps({"code": "OK", "details": "", "replica": answer.replica}))

asyncio.run(main())
"""

# Runs in a pod: GET each URL; prints {url: [status, body] or ["error", reason]} as JSON.
GET_SCRIPT = """
import json, sys, urllib.error, urllib.request
out = {}
for url in sys.argv[1:]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            out[url] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[url] = [e.code, e.read().decode()]
    except OSError as e:
        out[url] = ["error", str(e)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def pods() -> Iterator[netns.Cluster]:
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    netns.remove_leftovers(PREFIX)
    c = netns.Cluster(subnet=SUBNET, prefix=PREFIX)
    try:
        c.start()
        c.add_pod("server", SERVER_IP)
        c.add_pod("client", CLIENT_IP)
    except netns.NetnsError as e:
        c.close()
        skip_or_fail(f"cannot build the pod namespaces: {e}")
    try:
        yield c
    finally:
        c.close()


def proxy_env(certs: Path, account: str, discovery: Path, **settings: str) -> dict[str, str]:
    return child_env(
        {
            "KUBERPC_DISCOVERY": f"file:{discovery}",
            "KUBERPC_TLS_CERT": str(certs / "cert.pem"),
            "KUBERPC_TLS_KEY": str(certs / "key.pem"),
            "KUBERPC_TRUST_ANCHORS": str(certs / "ca.pem"),
            "KUBERPC_DRAIN_SECONDS": "1",
            "POD_NAMESPACE": "default",
            "SERVICE_ACCOUNT": account,
            **settings,
        }
    )


def arith(allow: str | None, *, selector: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "services": [
            {
                "name": "arith",
                "namespace": "default",
                "ports": [50051],
                "annotations": {"kuberpc.io/allow": allow} if allow else {},
                "selector": selector or {"app": "arith"},
                "endpoints": [{"address": SERVER_IP, "port": 15443, "tls": True}],
            }
        ]
    }


def write(path: Path, doc: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


def in_pod(pod: netns.Pod, script: str, *args: str) -> dict[str, object]:
    done = netns.run(pod.netns, [PYTHON, "-c", script, *args], env=child_env(), cwd=REPO, timeout=STEP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def call_until(
    client: netns.Pod, wanted: str, procs: list[netns.NetnsProcess], saying: str = ""
) -> dict[str, object]:
    """Call (bounded by STEP_TIMEOUT) until an answer's code is `wanted` and its details say `saying`."""
    deadline = time.monotonic() + STEP_TIMEOUT
    seen: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        for p in procs:
            assert p.alive(), f"{p.name} exited:\n{tail(p.stderr_path)}"
        answer = in_pod(client, CALL_SCRIPT)
        if answer["code"] == wanted and saying in str(answer["details"]):
            return answer
        seen.append(answer)
    raise AssertionError(f"no {wanted} within {STEP_TIMEOUT:.0f}s; last answers: {seen[-3:]}")


@pytest.fixture
def started(
    pods: netns.Cluster, mesh_certs: dict[str, Path], tmp_path: Path
) -> Iterator[tuple[Path, list[netns.NetnsProcess]]]:
    """The Arith app and its proxy in `server` (no endpoints file yet), a proxy in `client` that knows arith."""
    server, client = pods.pods["server"], pods.pods["client"]
    server_file, client_file = tmp_path / "server.yaml", tmp_path / "client.yaml"
    write(client_file, arith(None))
    logs = tmp_path / "logs"
    procs: list[netns.NetnsProcess] = []
    try:
        app = netns.spawn(
            server.netns,
            [PYTHON, "-m", "e2e.arith.server", "--port", "50051", "--replica", "server", "--grace", "0.5"],
            name="server.app",
            log_dir=logs,
            env=child_env(),
            cwd=REPO,
            pipe_stdout=True,
        )
        procs.append(app)
        app.wait_for_line("serving on", timeout=STEP_TIMEOUT)
        server_env = proxy_env(
            mesh_certs["arith"],
            "arith",
            server_file,
            KUBERPC_INBOUND_ADDR="0.0.0.0:15443",
            KUBERPC_APP_PORT="50051",
            KUBERPC_ADMIN_ADDR="0.0.0.0:15090",
            KUBERPC_POD_LABELS="app=arith",
            POD_IP=SERVER_IP,
        )
        procs.append(
            netns.spawn(server.netns, [PYTHON, "-m", "sidecar", "run"], name="server.proxy", log_dir=logs, env=server_env, cwd=REPO)
        )
        client_env = proxy_env(mesh_certs["client"], "client", client_file, KUBERPC_INBOUND_ADDR="off")
        procs.append(
            netns.spawn(client.netns, [PYTHON, "-m", "sidecar", "run"], name="client.proxy", log_dir=logs, env=client_env, cwd=REPO)
        )
        yield server_file, procs
    finally:
        netns.stop(procs, timeout=5.0)


def test_inbound_refuses_every_caller_until_discovery_says_which_services_select_the_pod(
    pods: netns.Cluster, started: tuple[Path, list[netns.NetnsProcess]]
) -> None:
    server_file, procs = started
    client = pods.pods["client"]
    # No endpoints file yet: the server's inbound is bound (it has its certificate) but knows no Service.
    # (Until its listener is up, calls fail to connect: also UNAVAILABLE, but not saying this.)
    closed = call_until(client, "UNAVAILABLE", procs, saying="inbound is closed")
    assert "discovery has not yet said which Services select this pod" in str(closed["details"])

    write(server_file, arith("default/payments"))
    denied = call_until(client, "PERMISSION_DENIED", procs)
    assert "spiffe://cluster.local/ns/default/sa/client is not allowed to call arith.default" in str(denied["details"])

    write(server_file, arith("default/client"))
    assert call_until(client, "OK", procs)["replica"] == "server"


def test_debug_is_served_on_the_pods_loopback_only_and_probes_stay_on_the_pod_ip(
    pods: netns.Cluster, started: tuple[Path, list[netns.NetnsProcess]]
) -> None:
    server_file, procs = started
    write(server_file, arith("default/client"))
    call_until(pods.pods["client"], "OK", procs)  # every listener is up and the catalog is in

    remote = in_pod(
        pods.pods["client"],
        GET_SCRIPT,
        f"http://{SERVER_IP}:15090/debug",
        f"http://{SERVER_IP}:15091/debug",
        f"http://{SERVER_IP}:15090/ready",
        f"http://{SERVER_IP}:15090/metrics",
    )
    status, body = remote[f"http://{SERVER_IP}:15090/debug"]  # type: ignore[misc]
    assert status == 404 and "arith.default" not in body and SERVER_IP not in body
    assert remote[f"http://{SERVER_IP}:15091/debug"][0] == "error"  # type: ignore[index]
    assert remote[f"http://{SERVER_IP}:15090/ready"][0] == 200  # type: ignore[index]
    assert remote[f"http://{SERVER_IP}:15090/metrics"][0] == 200  # type: ignore[index]

    local = in_pod(pods.pods["server"], GET_SCRIPT, "http://127.0.0.1:15091/debug")
    status, body = local["http://127.0.0.1:15091/debug"]  # type: ignore[misc]
    assert status == 200
    assert "arith.default" in json.dumps(json.loads(body)["routes"])
