"""Failure on the real control plane (issue 11's first scenario there): a replica's app, then its proxy, killed
with SIGKILL under traffic. The pod runner restarts the container as a kubelet would; meanwhile the callers'
proxies re-place or retry what never reached an app, and eject what keeps failing."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import EXAMPLE, SERVER, Kube, client_pod
from tests.cluster.test_user_path import Traffic, debug_services, failures

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]


def container_state(kube: Kube, pod: str, container: str) -> tuple[int, int, bool]:
    """(pid, restartCount, running) of a container, from the status the pod runner writes back."""
    status = kube.get("pod", pod, "-n", EXAMPLE)["status"]
    for c in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        if c["name"] == container:
            return int(c["containerID"].rsplit("/", 1)[-1]), int(c["restartCount"]), "running" in c["state"]
    raise KeyError(f"{pod} has no container {container}")


@pytest.mark.parametrize("container", ["arith", "kuberpc-proxy"], ids=["app", "proxy"])
def test_a_replica_killed_under_traffic_costs_no_call_the_mesh_may_replace(example: Kube, tmp_path: Path, container: str) -> None:
    # The policy for this scenario: UNAVAILABLE is retried (within the budget) on another replica.
    example.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/retry=unavailable", "--overwrite")
    client = client_pod(example)
    example.wait("the client's proxy retrying UNAVAILABLE", lambda: debug_services(example, client)
                 .get(f"arith.{EXAMPLE}", {}).get("retry_on"))
    try:
        replaced(example, tmp_path, container)
    finally:
        example.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/retry-")


def replaced(example: Kube, tmp_path: Path, container: str) -> None:
    victim = sorted(p["metadata"]["name"] for p in example.ready_pods(EXAMPLE, SERVER))[0]
    pid, restarts, running = container_state(example, victim, container)
    assert running
    traffic = Traffic(example, tmp_path, stream_every=0)  # unary calls: each may be placed again
    time.sleep(1.0)  # traffic flowing through every replica before the fault
    os.kill(pid, signal.SIGKILL)
    example.wait(f"{victim}/{container} restarted", lambda: container_state(example, victim, container)[1:] == (restarts + 1, True),
                 timeout=60)
    example.wait(f"{victim} ready again", lambda: victim in {p["metadata"]["name"] for p in example.ready_pods(EXAMPLE, SERVER)},
                 timeout=90)
    outcomes = traffic.finish()
    failed = failures(outcomes)
    counts = collections.Counter(outcomes)
    if container == "arith":
        # The app's proxy answers UNAVAILABLE for the dead app: retried on another replica, nothing is lost.
        assert not failed, counts
    else:
        # A dead proxy can take down the one call whose answer had started (no proxy may retry that).
        assert sum(failed.values()) <= 1, counts
    assert len(outcomes) >= 100, counts
