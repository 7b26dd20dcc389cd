"""Failure on the real control plane (issue 11's first scenario there): a replica's app, then its proxy, killed
with SIGKILL under traffic, with the scenario's retry policy, and the app again without any. The pod runner
restarts the container as a kubelet would; meanwhile the callers' proxies re-place what never reached an app
(its proxy refuses it unprocessed), retry what the policy allows, and eject what keeps failing."""

from __future__ import annotations

import collections
import os
import re
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


# What a replica's proxy answers when its app's connection is lost with a call on it: the request had reached
# the app, which may have acted on it, so without a retry policy no proxy sends it again.
APP_LOST = re.compile(r"UNAVAILABLE: upstream 127\.0\.0\.1:\d+ failed")


def test_an_app_killed_under_traffic_without_a_retry_policy_costs_no_call_that_never_reached_it(
    example: Kube, tmp_path: Path
) -> None:
    client = client_pod(example)
    example.wait("the client's proxy with no retry policy", lambda: (s := debug_services(example, client)
                 .get(f"arith.{EXAMPLE}")) is not None and not s.get("retry_on"))
    traffic = replaced(example, tmp_path, "arith")
    outcomes = traffic.finish()
    failed = failures(outcomes)
    counts = collections.Counter(outcomes)
    lines = [ln for ln in traffic.proc.stderr_path.read_text().splitlines() if ln.startswith("call ")]

    # The dead app's proxy refuses each call it cannot hand over (REFUSED_STREAM) and the client's proxy places
    # it on another replica: every failure, if any, is the one call the app had taken when it died (one caller,
    # one call in flight).
    assert sum(failed.values()) <= 1 and all(APP_LOST.search(ln) for ln in lines), (counts, lines)
    assert len(outcomes) >= 100, counts


@pytest.mark.parametrize("container", ["arith", "kuberpc-proxy"], ids=["app", "proxy"])
def test_a_replica_killed_under_traffic_costs_no_call_the_mesh_may_replace(example: Kube, tmp_path: Path, container: str) -> None:
    # The policy for this scenario: UNAVAILABLE is retried (within the budget) on another replica.
    example.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/retry=unavailable", "--overwrite")
    client = client_pod(example)
    example.wait("the client's proxy retrying UNAVAILABLE", lambda: debug_services(example, client)
                 .get(f"arith.{EXAMPLE}", {}).get("retry_on"))
    try:
        traffic = replaced(example, tmp_path, container)
    finally:
        example.kubectl("annotate", "service", "arith", "-n", EXAMPLE, "kuberpc.io/retry-")
    outcomes = traffic.finish()
    failed = failures(outcomes)
    counts = collections.Counter(outcomes)
    if container == "arith":
        # Refused or answered UNAVAILABLE by the dead app's proxy: placed again or retried, nothing is lost.
        assert not failed, counts
    else:
        # A dead proxy can take down the one call whose answer had started (no proxy may retry that).
        assert sum(failed.values()) <= 1, counts
    assert len(outcomes) >= 100, counts


def replaced(example: Kube, tmp_path: Path, container: str) -> Traffic:
    """Traffic running while `container` of one replica is SIGKILLed, restarted and the pod ready again."""
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
    return traffic
