"""Whole proxy processes in pod network namespaces: balancing, discovery reloads, dead peers, metrics.

Each mesh test gets freshly started proxies (conftest.py) and acts only from the client pod, through the
proxy's network contract.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from e2e import netns

pytestmark = [pytest.mark.netns]

RELOAD_TIMEOUT = 10.0  # seconds a proxy may take to act on a changed endpoints file (it checks every 0.5 s)
METRICS_TIMEOUT = 5.0  # seconds counters may lag behind the replies the client already has
WINDOW = 6  # 1 + 2 + 3: smooth WRR picks each replica exactly its weight times in any window this long
ADD = "/arith.Arith/Add"
OK = "0"


@pytest.mark.parametrize(
    ("target", "authority"),
    [("127.0.0.1:9001", ""), ("127.0.0.1:15001", "arith.default")],
    ids=["upstream-port", "outbound-port-by-authority"],
)
def test_calls_from_the_client_pod_reach_the_replicas_in_shares_exactly_1_2_3(mesh, target, authority):
    outcomes = mesh.call(600, target=target, authority=authority)

    assert Counter(outcomes) == {"arith-1": 100, "arith-2": 200, "arith-3": 300}
    # Smooth, not merely weighted: every window of 6 consecutive calls holds each replica its weight times.
    for start in range(0, 600 - WINDOW + 1):
        assert Counter(outcomes[start : start + WINDOW]) == {"arith-1": 1, "arith-2": 2, "arith-3": 3}, start


@pytest.mark.parametrize(
    "weights",
    [{"arith-2": 2, "arith-3": 3}, {"arith-1": 0, "arith-2": 2, "arith-3": 3}],
    ids=["removed", "weight-0"],
)
def test_an_endpoint_taken_out_of_the_endpoints_file_stops_receiving_calls(mesh, weights):
    assert "arith-1" in mesh.call(WINDOW)

    mesh.write_endpoints(weights)
    # Until the proxy reloads, every window of 6 calls has one for arith-1; the first without one shows the reload.
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while "arith-1" in mesh.call(WINDOW):
        assert time.monotonic() < deadline, f"arith-1 still called {RELOAD_TIMEOUT:.0f}s after the change"

    after = mesh.call(60)
    assert set(after) == {"arith-2", "arith-3"}


def test_calls_picked_for_a_replica_whose_proxy_died_are_re_placed_on_the_live_replicas(mesh):
    mesh.kill_proxy("arith-1")

    outcomes = mesh.call(120)

    # The refused connection shows the call never left the client's proxy, so it is safely placed again:
    # every call succeeds, and arith-1's turns go to the live replicas in their own 2:3 ratio.
    assert Counter(outcomes) == {"arith-2": 48, "arith-3": 72}


def test_calls_picked_for_a_replica_whose_app_died_are_refused_unprocessed_and_served_by_the_others(mesh):
    mesh.kill_app("arith-1")

    outcomes = mesh.call(120)

    # arith-1's proxy cannot reach its app, so it refuses each call before any app saw it (REFUSED_STREAM):
    # the client's proxy places it on another replica although no retry policy is set, and ejects arith-1
    # after CONSECUTIVE_FAILURES refusals. No call fails.
    assert len(outcomes) == 120
    assert set(outcomes) == {"arith-2", "arith-3"}


def test_each_pods_metrics_count_the_calls_the_client_saw(mesh):
    seen = Counter(mesh.call(60))
    assert sum(seen[r] for r in ("arith-1", "arith-2", "arith-3")) == 60

    expected = {
        "arith-1": {("inbound", "arith.default", ADD, OK): seen["arith-1"]},
        "arith-2": {("inbound", "arith.default", ADD, OK): seen["arith-2"]},
        "arith-3": {("inbound", "arith.default", ADD, OK): seen["arith-3"]},
        "client": {("outbound", "arith.default", ADD, OK): 60},
    }
    # A proxy may count a call just after relaying its last frame: poll, within a bound, for the final counts.
    deadline = time.monotonic() + METRICS_TIMEOUT
    while (scraped := {pod: mesh.requests_total(pod) for pod in expected}) != expected:
        assert time.monotonic() < deadline, f"scraped {scraped}, client saw {expected}"


def test_leftovers_of_a_crashed_run_are_removed_with_their_processes_and_a_live_runs_namespaces_kept(
    netns_usable, tmp_path
):
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid now names a run that is gone
    crashed = f"{netns.PREFIX}leftover-{finished.pid}-0bad"
    live = f"{netns.PREFIX}concurrent-{os.getpid()}-0a1e"
    orphan = None
    try:
        for name in (crashed, live):
            netns.ip("netns", "add", name)
        orphan = netns.spawn(
            crashed, ["sleep", "60"], name="orphan", log_dir=tmp_path, env=os.environ, cwd=tmp_path
        )
        deadline = time.monotonic() + 5
        while str(orphan.popen.pid) not in netns.ip("netns", "pids", crashed).split():
            assert time.monotonic() < deadline, "the orphan never entered its namespace"

        removed = netns.remove_leftovers()

        assert crashed in removed and live not in removed
        assert crashed not in netns.list_netns() and live in netns.list_netns()
        assert orphan.popen.wait(timeout=5) == -signal.SIGKILL
    finally:
        if orphan is not None:
            orphan.kill()
        for name in set(netns.list_netns()) & {crashed, live}:
            netns.delete_netns(name)
