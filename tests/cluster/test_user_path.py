"""The user's whole path on a real control plane: install, mesh the example, call it, roll it, survive the API
server's death, run meshed Jobs, keep trust anchors everywhere, and read a denial as kubectl prints it."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.conftest import CALLER, EXAMPLE, PYTHON, REPO, SERVER, Kube, call, client_pod, is_ready

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

class Traffic:
    """A caller running in the client pod until stopped: unary Adds, and every 25th call a 2 s stream."""

    def __init__(self, kube: Kube, tmp: Path, *, limit_s: float = 240, stream_every: int = 25) -> None:
        self.stop_file = tmp / "stop-traffic"
        self.proc = kube.spawn(EXAMPLE, client_pod(kube), [PYTHON, "-c", CALLER, "100000", str(limit_s), str(stream_every),
                               str(self.stop_file)], name="traffic", log_dir=tmp)
        self.proc.wait_for_line("calling", timeout=30)

    def finish(self) -> list[str]:
        self.stop_file.touch()
        out, _ = self.proc.popen.communicate(timeout=60)
        assert self.proc.popen.returncode == 0, self.proc.stderr_path.read_text()[-3000:]
        outcomes: list[str] = json.loads(out.decode().strip().splitlines()[-1])
        return outcomes


def failures(outcomes: list[str]) -> collections.Counter[str]:
    """Every outcome that is neither a finished stream nor an answer from a replica."""
    return collections.Counter(o for o in outcomes if o != "stream" and not o.startswith("arith-"))


def test_the_control_plane_installs_and_becomes_ready(mesh: Kube) -> None:
    deploy = mesh.get("deploy", "kuberpc-webhook", "-n", "kuberpc-system")
    assert deploy["status"]["readyReplicas"] == 2
    mwc = mesh.get("mutatingwebhookconfiguration", "kuberpc-injector")
    assert mwc["webhooks"][0]["clientConfig"]["caBundle"]


def test_example_pods_carry_the_proxy_and_get_certificates_through_tokenreview(example: Kube) -> None:
    from cryptography import x509

    anchors = x509.load_pem_x509_certificate(
        example.get("configmap", "kuberpc-trust-anchors", "-n", EXAMPLE)["data"]["ca.pem"].encode()
    )
    for pod in example.pods(EXAMPLE, SERVER):
        spec = pod["spec"]
        names = [c["name"] for c in spec.get("initContainers", []) + spec["containers"]]
        assert "kuberpc-proxy" in names, names
        assert pod["metadata"]["labels"].get("kuberpc.io/injected") == "true"
        assert is_ready(pod)
        # The proxy's certificate, read from its in-memory volume: this pod's identity, signed by the mesh CA.
        uid = pod["metadata"]["uid"]
        cert = x509.load_pem_x509_certificate(Path(f"/dev/shm/kuberpc-{uid}-kuberpc-identity/cert.pem").read_bytes())
        cert.verify_directly_issued_by(anchors)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://cluster.local/ns/{EXAMPLE}/sa/arith"]
    # The identity service issued them after a TokenReview of each pod's own projected token.
    logs = "".join(example.pod_log("kuberpc-system", p["metadata"]["name"], "webhook", lines=None)
                   for p in example.pods("kuberpc-system"))
    assert f"event=certificate_issued identity=spiffe://cluster.local/ns/{EXAMPLE}/sa/arith " in logs, logs[-2000:]


DEBUG_SCRIPT = r"""
import json, urllib.request
print(urllib.request.urlopen("http://127.0.0.1:15091/debug", timeout=5).read().decode())
"""


def debug_services(kube: Kube, pod: str) -> dict[str, Any]:
    """The Services a pod's proxy balances, as its /debug shows them (read on the pod's loopback)."""
    done = kube.exec(EXAMPLE, pod, [PYTHON, "-c", DEBUG_SCRIPT], timeout=20)
    if done.returncode != 0:
        return {}
    services: dict[str, Any] = json.loads(done.stdout)["routes"]["services"]
    return services


def proxy_weights(kube: Kube, pod: str) -> dict[str, int]:
    """pod name -> weight, as the client pod's proxy balances the example Service right now (its /debug)."""
    services = debug_services(kube, pod)
    endpoints = (services.get(f"arith.{EXAMPLE}") or {}).get("endpoints") or []
    return {str(e["pod"]).rsplit("/", 1)[-1]: int(e["weight"]) for e in endpoints}


def test_calls_through_the_mesh_split_by_the_weights(example: Kube) -> None:
    pods = sorted(p["metadata"]["name"] for p in example.ready_pods(EXAMPLE, SERVER))
    weights = dict(zip(pods, (100, 200, 300), strict=True))
    call(example, 3)  # the client's proxy learns the Service on the first call
    for pod, w in weights.items():
        example.kubectl("annotate", "pod", pod, "-n", EXAMPLE, f"kuberpc.io/weight={w}", "--overwrite")
    client = client_pod(example)
    example.wait("the client's proxy balancing by the new weights", lambda: proxy_weights(example, client) == weights)
    outcomes = call(example, 600)
    counts = collections.Counter(outcomes)
    assert set(counts) <= set(pods), counts
    total = sum(counts.values())
    for pod, w in weights.items():
        share = 100 * counts[pod] / total
        assert abs(share - 100 * w / 600) <= 2, (counts, weights)


def test_rollout_restart_and_scaling_fail_no_call(example: Kube, tmp_path: Path) -> None:
    traffic = Traffic(example, tmp_path)
    before = {p["metadata"]["name"] for p in example.pods(EXAMPLE, SERVER)}
    example.kubectl("rollout", "restart", "deploy/arith", "-n", EXAMPLE)
    example.kubectl("rollout", "status", "deploy/arith", "-n", EXAMPLE, "--timeout=180s", timeout=200)
    example.wait("the old replicas gone", lambda: not before & {p["metadata"]["name"] for p in example.pods(EXAMPLE, SERVER)})
    example.kubectl("scale", "deploy/arith", "-n", EXAMPLE, "--replicas=5")
    example.wait("five ready replicas", lambda: len(example.ready_pods(EXAMPLE, SERVER)) == 5, timeout=120)
    example.kubectl("scale", "deploy/arith", "-n", EXAMPLE, "--replicas=3")
    example.wait("back to three replicas", lambda: len(example.pods(EXAMPLE, SERVER)) == 3, timeout=120)
    outcomes = traffic.finish()
    answered_by = {o for o in outcomes if o.startswith("arith-")}
    assert not failures(outcomes), (collections.Counter(outcomes), example.diagnose())
    assert outcomes.count("stream") >= 5 and len(outcomes) >= 200, collections.Counter(outcomes)
    assert answered_by - before, "no call reached a new replica"


def test_api_server_killed_and_restarted_during_traffic_fails_no_call(example: Kube, tmp_path: Path) -> None:
    client = client_pod(example)
    traffic = Traffic(example, tmp_path)
    example.cp.kill_apiserver()
    # Meanwhile the proxies keep serving from the last endpoints they were given.
    time_down = time.monotonic()
    done = example.exec(EXAMPLE, client, [PYTHON, "-c", CALLER, "50", "30", "0"], timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    example.cp.start_apiserver()
    example.cp.wait_ready()
    assert time.monotonic() - time_down > 1
    # A change made once the API server is back reaches the client's proxy within 2 s (watch resumed or
    # relisted at once after the restart's 410s, not after a backoff).
    pods = sorted(p["metadata"]["name"] for p in example.ready_pods(EXAMPLE, SERVER))
    drained = pods[0]
    example.kubectl("annotate", "pod", drained, "-n", EXAMPLE, "kuberpc.io/weight=0", "--overwrite")
    changed = time.monotonic()
    example.wait("the drained weight at the client's proxy", lambda: proxy_weights(example, client).get(drained) == 0,
                 timeout=10, interval=0.1)
    took = time.monotonic() - changed
    outcomes = traffic.finish()
    assert not failures(outcomes), collections.Counter(outcomes)
    assert took <= 2.0, f"the change took {took:.1f}s to reach the proxy"
    after = call(example, 60)
    assert drained not in after and not failures(after), collections.Counter(after)
    example.kubectl("annotate", "pod", drained, "-n", EXAMPLE, "kuberpc.io/weight=100", "--overwrite")


def job(kube: Kube, name: str, native: bool) -> None:
    import yaml

    doc = yaml.safe_load((REPO / "manifests/examples/arith/client-job.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["template"]["metadata"]["annotations"]["kuberpc.io/native-sidecar"] = str(native).lower()
    kube.kubectl("apply", "-n", EXAMPLE, "-f", "-", input=yaml.safe_dump(doc))


@pytest.mark.parametrize("native", [True, False], ids=["native-sidecar", "fallback-shutdown"])
def test_meshed_jobs_complete(example: Kube, native: bool) -> None:
    name = f"arith-once-{'native' if native else 'fallback'}"
    job(example, name, native)
    example.wait(f"Job {name} Complete", lambda: example.get("job", name, "-n", EXAMPLE)["status"].get("succeeded") == 1,
                 timeout=120)
    (pod,) = example.pods(EXAMPLE, f"job-name={name}")
    assert pod["status"]["phase"] == "Succeeded"
    spec = pod["spec"]
    if native:
        assert [c["name"] for c in spec["initContainers"]] == ["kuberpc-proxy"]
        assert spec["initContainers"][0]["restartPolicy"] == "Always"
    else:
        assert "kuberpc-proxy" in [c["name"] for c in spec["containers"]]


def test_trust_anchors_reach_namespaces_created_after_install_and_survive_an_api_restart(mesh: Kube) -> None:
    def anchors(ns: str) -> bool:
        return mesh.kubectl("get", "configmap", "kuberpc-trust-anchors", "-n", ns, check=False).returncode == 0

    mesh.kubectl("create", "namespace", "late-1")
    mesh.wait("trust anchors in late-1", lambda: anchors("late-1"), timeout=30)
    mesh.cp.restart_apiserver()
    mesh.kubectl("create", "namespace", "late-2")
    mesh.wait("trust anchors in late-2 after the API server restart", lambda: anchors("late-2"), timeout=30)
    logs = "".join(mesh.pod_log("kuberpc-system", p["metadata"]["name"], "webhook") for p in mesh.pods("kuberpc-system"))
    # The watch's ERROR (410) and BOOKMARK events are plain dicts: reading them as objects raised AttributeError.
    assert "error=AttributeError" not in logs, logs[-3000:]


def test_a_bad_annotation_is_denied_with_the_documented_message(mesh: Kube) -> None:
    mesh.kubectl("create", "namespace", "denied")
    # The ServiceAccount admission plugin refuses pods until the controller manager made the namespace's
    # default ServiceAccount: wait for it, so that the denial seen is the webhook's.
    mesh.wait("the default ServiceAccount of the new namespace",
              lambda: mesh.kubectl("get", "serviceaccount", "default", "-n", "denied", check=False).returncode == 0)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bad", "annotations": {"kuberpc.io/inject": "enabled", "kuberpc.io/app-port": "99999"}},
        "spec": {"containers": [{"name": "app", "image": "ghcr.io/kuberpc/arith-example:0.1.0"}]},
    }
    done = mesh.kubectl("apply", "-n", "denied", "-f", "-", input=json.dumps(pod), check=False)
    assert done.returncode == 1
    assert 'admission webhook "inject.kuberpc.io" denied the request: kuberpc: kuberpc.io/app-port' in done.stderr, done.stderr
    assert "99999" in done.stderr
    assert mesh.kubectl("get", "pod", "bad", "-n", "denied", check=False).returncode != 0
