"""`kuberpc` on the real control plane: check, stat, proxy-status, tap, debug and inject against the meshed example,
and `check` failing with the right line for a proxy whose certificate expired and for pods that asked for a proxy
and did not get one.

The commands run as a user runs them (`python -m webhook.cli`, the `kuberpc` entry point, with the test's
kubeconfig), except `stat`, which runs in-process so that its wait between scrapes is when the test makes its calls.
tap and debug reach the proxy's loopback-only listener through the API server's pods/portforward.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.cluster.conftest import EXAMPLE, PYTHON, REPO, SERVER, Kube, call, client_pod
from webhook.cli.main import main

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

BROKEN = "cli-broken"  # a namespace for what must make `check` fail; deleted after the module
ARITH_ID = f"spiffe://cluster.local/ns/{EXAMPLE}/sa/arith"
CLIENT_ID = f"spiffe://cluster.local/ns/{EXAMPLE}/sa/arith-client"


def transcript(args: Sequence[str], out: str) -> None:
    """With KUBERPC_CLI_TRANSCRIPT=FILE, each command and its output are appended there (the README's are)."""
    if path := os.environ.get("KUBERPC_CLI_TRANSCRIPT"):
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"$ kuberpc {' '.join(args)}\n{out}")


def kuberpc(kube: Kube, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [PYTHON, "-m", "webhook.cli", *args, "--kubeconfig", str(kube.cp.kubeconfig)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )
    transcript(args, done.stdout + done.stderr)
    return done


def server_pods(kube: Kube) -> list[str]:
    return sorted(p["metadata"]["name"] for p in kube.ready_pods(EXAMPLE, SERVER))


# ---- what is true on a healthy mesh ------------------------------------------------------------------------


def test_check_passes_on_the_meshed_example_and_names_every_part(example: Kube) -> None:
    done = kuberpc(example, "check", "-n", EXAMPLE)

    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[0].startswith("✔ the API server answers (Kubernetes 1.")
    webhooks = [p["metadata"]["name"] for p in example.ready_pods("kuberpc-system", "app.kubernetes.io/name=kuberpc-webhook")]
    for pod in webhooks:
        assert any(line.startswith(f"✔ the webhook in kuberpc-system/{pod} answers with a certificate its caBundle trusts")
                   for line in lines), lines
        assert f"✔ the identity service in kuberpc-system/{pod} answers (an empty request: INVALID_ARGUMENT)" in lines
        assert f"✔ the discovery service in kuberpc-system/{pod} answers with the mesh's certificate and requires one" in lines
    for pod in [*server_pods(example), client_pod(example)]:
        assert f"✔ the proxy of {EXAMPLE}/{pod} is ready with a valid certificate" in lines
    assert any(line.startswith(f"✔ {EXAMPLE}/kuberpc-trust-anchors: 1 trust anchor(s)") for line in lines)
    assert "✔ every pod asking for a proxy has one (4)" in lines
    assert lines[-1] == "all checks passed"


def test_check_pre_asks_the_api_server_whether_you_may_install(example: Kube) -> None:
    done = kuberpc(example, "check", "--pre")

    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[1].startswith("✔ you may create everything kuberpc install creates (")


def test_proxy_status_shows_each_meshed_pod_with_its_certificate_and_discovery(example: Kube) -> None:
    done = kuberpc(example, "proxy-status", "-n", EXAMPLE, "-o", "json")

    assert done.returncode == 0, done.stderr
    items = {i["name"]: i for i in json.loads(done.stdout)["items"]}
    assert set(items) == {*server_pods(example), client_pod(example)}
    now = time.time()
    for item in items.values():
        assert item["ready"] and item["reachable"] and item["version"]
        assert now < item["cert_expiry"] <= now + 24 * 3600 + 60  # workload certificates live 24 h
    assert items[client_pod(example)]["discovery_updates"] > 0
    assert items[client_pod(example)]["services_with_endpoints"] == [f"arith.{EXAMPLE}"]
    assert items[client_pod(example)]["workload"] == "deploy/arith-client"
    table = kuberpc(example, "proxy-status", "-n", EXAMPLE, "-o", "wide").stdout.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "READY", "CERT-EXPIRES", "SERVICES", "DISCOVERY-UPDATES", "AGE", "WORKLOAD"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(items)
    assert all(line.split()[2:4] == ["true", "in"] for line in table[1:])



@contextlib.contextmanager
def background_calls_paused(kube: Kube) -> Iterator[None]:
    """Stops the example client's own loop (a batch of every call shape every few seconds, for the dashboards)
    and waits for its batch in flight to end, so a window counts only the calls the test makes; resumes it after.

    The loop is the `sh` of the client pod's container: found among the processes of the pod's network namespace.
    """
    ns = kube.where(EXAMPLE, client_pod(kube))["netns"]
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=True).stdout.split()

    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    loops = [int(p) for p in pids if "while true" in cmdline(p)]
    assert loops, "the example client's loop was not found"
    for pid in loops:
        os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 60
        # The loop's own command line names the client too: only other processes are a batch in flight.
        while any("e2e.arith.client" in cmdline(p) and int(p) not in loops for p in
                  subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()):
            assert time.monotonic() < deadline, "the example client's batch did not end within 60 s"
            time.sleep(0.2)
        yield
    finally:
        for pid in loops:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_stat_counts_the_calls_each_deployment_served_in_the_window(example: Kube) -> None:
    outcomes: list[str] = []

    def between_scrapes(seconds: float) -> None:
        outcomes.extend(call(example, 30))

    out, err = io.StringIO(), io.StringIO()
    with background_calls_paused(example):
        code = main(["stat", "deploy", "-n", EXAMPLE, "--window", "10", "-o", "json", "--kubeconfig", str(example.cp.kubeconfig)],
                    sleep=between_scrapes, stdout=out, stderr=err)

    transcript(["stat", "deploy", "-n", EXAMPLE, "--window", "10", "-o", "json"], out.getvalue())
    assert code == 0, err.getvalue()
    assert len(outcomes) == 30 and all(o.startswith("arith-") for o in outcomes), outcomes
    rows = {r["name"]: r for r in json.loads(out.getvalue())["items"]}
    # Server view: each call counted once, by the replica that served it.
    assert (rows["arith"]["calls"], rows["arith"]["success"], rows["arith"]["meshed"]) == (30, 1.0, "3/3")
    assert rows["arith"]["rps"] == 3.0
    assert 0 < rows["arith"]["latency_seconds"]["p50"] <= rows["arith"]["latency_seconds"]["p99"] < 5
    assert rows["arith-client"]["calls"] == 0

    # The same, as a person reads it: 20 calls in a 10 s window.
    table = io.StringIO()
    with background_calls_paused(example):
        code = main(["stat", "deploy", "-n", EXAMPLE, "--window", "10", "--kubeconfig", str(example.cp.kubeconfig)],
                    sleep=lambda seconds: outcomes.extend(call(example, 20)), stdout=table, stderr=err)
    transcript(["stat", "deploy", "-n", EXAMPLE, "--window", "10"], table.getvalue())
    lines = table.getvalue().splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    assert [line.split()[:4] for line in lines[1:]] == [["arith", "3/3", "100.00%", "2.0"], ["arith-client", "1/1", "-", "0.0"]]


def tap_while_calling(kube: Kube, pod: str, limit: int) -> subprocess.CompletedProcess[str]:
    """Runs `kuberpc tap POD` until it has seen `limit` calls, making calls from the client pod meanwhile."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "webhook.cli", "tap", pod, "-n", EXAMPLE, "--limit", str(limit), "--seconds", "60", "-o", "json",
         "--kubeconfig", str(kube.cp.kubeconfig)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 90
    try:
        # The tap subscribes once its port-forward is up: calls made before are not shown, so call until it ends.
        while proc.poll() is None and time.monotonic() < deadline:
            call(kube, 3)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_tap_through_port_forward_shows_each_call_with_both_identities(example: Kube) -> None:
    client = tap_while_calling(example, client_pod(example), 3)
    server = tap_while_calling(example, server_pods(example)[0], 1)
    transcript(["tap", client_pod(example), "-n", EXAMPLE, "--limit", "3", "-o", "json"], client.stdout)

    assert client.returncode == 0, client.stderr
    *calls, end = [json.loads(line) for line in client.stdout.splitlines()]
    assert end == {"end": "limit", "calls": 3, "dropped": 0}
    for c in calls:
        assert (c["direction"], c["service"], c["method"], c["grpc_code"]) == ("outbound", f"arith.{EXAMPLE}", "/arith.Arith/Add", 0)
        assert c["peer"] == ARITH_ID  # the server's identity, as the client's proxy verified it
        assert "metadata" not in c and "body" not in c
    assert server.returncode == 0, server.stderr
    (seen, _end) = [json.loads(line) for line in server.stdout.splitlines()]
    assert (seen["direction"], seen["peer"]) == ("inbound", CLIENT_ID)


def test_debug_renders_routes_endpoints_and_peer_identities(example: Kube) -> None:
    call(example, 3)  # an upstream connection to show
    pod = client_pod(example)

    done = kuberpc(example, "debug", pod, "-n", EXAMPLE)
    raw = kuberpc(example, "debug", pod, "-n", EXAMPLE, "-o", "json")

    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert f"Pod:        {EXAMPLE}/{pod} (" in text
    assert "Ready:      yes" in text
    assert f"Identity:   {CLIENT_ID} (certificate from identity-service)" in text
    assert ["127.0.0.1:9001", f"arith.{EXAMPLE}:50051"] in [line.split() for line in text.splitlines()]
    doc = json.loads(raw.stdout)
    endpoints = doc["routes"]["services"][f"arith.{EXAMPLE}"]["endpoints"]
    assert len(endpoints) == 3
    for ep in endpoints:
        assert ep["weight"] == 100 and ep["state"] == "ready" and ep["tls"] is True
        row = next(line for line in text.splitlines() if f"{ep['address']}:{ep['port']}" in line)
        assert row.split()[:6] == [f"arith.{EXAMPLE}", f"{ep['address']}:{ep['port']}", ep["pod"] or "-", "100", "ready", "yes"]
    assert {c["peer_identity"] for c in doc["upstream_connections"]} == {ARITH_ID}
    assert any(line.startswith("  to peer") and ARITH_ID in line for line in text.splitlines())
    assert "0 ejected" in text


def test_debug_and_tap_need_the_right_to_port_forward_to_the_pod(example: Kube, tmp_path: Path) -> None:
    """A user who may read pods but not create pods/portforward sees neither /debug nor /tap."""
    example.kubectl("create", "serviceaccount", "cli-reader", "-n", EXAMPLE)
    example.kubectl("create", "role", "cli-reader", "-n", EXAMPLE, "--verb=get,list", "--resource=pods")
    example.kubectl("create", "rolebinding", "cli-reader", "-n", EXAMPLE, "--role=cli-reader",
                    f"--serviceaccount={EXAMPLE}:cli-reader")
    token = example.kubectl("create", "token", "cli-reader", "-n", EXAMPLE).stdout.strip()
    config = yaml.safe_load(example.cp.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    reader = tmp_path / "reader-kubeconfig"
    reader.write_text(yaml.safe_dump(config))

    done = subprocess.run(
        [PYTHON, "-m", "webhook.cli", "debug", client_pod(example), "-n", EXAMPLE, "--kubeconfig", str(reader)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )

    assert done.returncode == 1 and done.stdout == ""
    assert "port-forward to" in done.stderr and "403" in done.stderr, done.stderr


def test_inject_offline_applies_the_webhooks_own_patch(example: Kube, tmp_path: Path) -> None:
    """The same pod, injected by `kuberpc inject` offline and by the webhook on a server-side dry run."""
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "inject-me", "namespace": EXAMPLE, "annotations": {"kuberpc.io/inject": "enabled"}},
        "spec": {"serviceAccountName": "arith", "containers": [
            {"name": "app", "image": "ghcr.io/kuberpc/arith-example:0.1.0", "ports": [{"containerPort": 50051}],
             "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 1000,
                                 "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}]},
    }
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    cfg = example.get("configmap", "kuberpc-injector-config", "-n", "kuberpc-system")
    cfg_file = tmp_path / "injector-config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    server = json.loads(example.kubectl("get", "--raw", "/version").stdout)

    offline = kuberpc(example, "inject", "-f", str(manifest), "--config", str(cfg_file),
                      "--kubernetes-version", f"{server['major']}.{server['minor'].rstrip('+')}", "-o", "json")
    by_webhook = json.loads(example.kubectl("create", "--dry-run=server", "-o", "json", "-f", str(manifest)).stdout)

    assert offline.returncode == 0, offline.stderr
    injected = json.loads(offline.stdout)

    def proxy_and_volumes(p: dict[str, Any]) -> tuple[Any, ...]:
        spec = p["spec"]
        containers = {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}
        return (containers["kuberpc-proxy"]["image"], containers["kuberpc-proxy"].get("env"),
                containers["kuberpc-proxy"].get("args"), sorted(v["name"] for v in spec.get("volumes", [])),
                p["metadata"]["labels"].get("kuberpc.io/injected"))

    # The API server adds defaults (terminationMessagePath, the ServiceAccount token volume...): compare what
    # the injector decides.
    assert proxy_and_volumes(injected)[:3] == proxy_and_volumes(by_webhook)[:3]
    assert set(proxy_and_volumes(injected)[3]) <= set(proxy_and_volumes(by_webhook)[3])
    assert proxy_and_volumes(injected)[4] == proxy_and_volumes(by_webhook)[4] == "true"


# ---- what must make `check` fail ---------------------------------------------------------------------------


def expired_certificate(tmp: Path) -> dict[str, str]:
    """A CA and a workload certificate for an identity in BROKEN that expired an hour ago."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired-test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=3))
        .not_valid_after(now + dt.timedelta(days=3))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now - dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/{BROKEN}/sa/default")]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return {
        "cert.pem": leaf.public_bytes(pem).decode(),
        "key.pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode(),
        "ca.pem": ca.public_bytes(pem).decode(),
    }


def arith_pod(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {"containers": [{"name": "app", "image": "ghcr.io/kuberpc/arith-example:0.1.0"}]},
    }


@pytest.fixture(scope="module")
def broken(example: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    """In BROKEN: a 'meshed' pod whose proxy holds an expired certificate, and a pod created before its namespace
    opted in (so the injector never saw it asking). In kube-system, which the webhook never sees: a pod annotated
    kuberpc.io/inject: enabled."""
    tmp = tmp_path_factory.mktemp("cli-broken")
    example.kubectl("create", "namespace", BROKEN)
    files = expired_certificate(tmp)
    example.kubectl("create", "secret", "generic", "expired-identity", "-n", BROKEN,
                    *[f"--from-literal={k}={v}" for k, v in files.items()])
    example.kubectl("create", "configmap", "endpoints", "-n", BROKEN, "--from-literal=endpoints.yaml=services: []\n")
    proxy_pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "expired-proxy", "labels": {"kuberpc.io/injected": "true"},
                     "annotations": {"kuberpc.io/injected": "test"}},
        "spec": {
            "containers": [{
                "name": "kuberpc-proxy", "image": "ghcr.io/kuberpc/proxy:0.1.0",
                "env": [
                    {"name": "KUBERPC_INBOUND_ADDR", "value": "off"},
                    {"name": "KUBERPC_DISCOVERY", "value": "file:/etc/kuberpc/endpoints/endpoints.yaml"},
                    {"name": "KUBERPC_TLS_CERT", "value": "/etc/kuberpc/identity/cert.pem"},
                    {"name": "KUBERPC_TLS_KEY", "value": "/etc/kuberpc/identity/key.pem"},
                    {"name": "KUBERPC_TRUST_ANCHORS", "value": "/etc/kuberpc/identity/ca.pem"},
                    {"name": "POD_NAMESPACE", "value": BROKEN},
                ],
                "volumeMounts": [{"name": "identity", "mountPath": "/etc/kuberpc/identity"},
                                 {"name": "endpoints", "mountPath": "/etc/kuberpc/endpoints"}],
            }],
            "volumes": [{"name": "identity", "secret": {"secretName": "expired-identity"}},
                        {"name": "endpoints", "configMap": {"name": "endpoints"}}],
        },
    }
    example.kubectl("apply", "-n", BROKEN, "-f", "-", input=json.dumps(proxy_pod))
    example.kubectl("apply", "-n", BROKEN, "-f", "-", input=json.dumps(arith_pod("before-opt-in")))
    example.kubectl("label", "namespace", BROKEN, "kuberpc.io/inject=enabled")
    example.kubectl("apply", "-n", "kube-system", "-f", "-",
                    input=json.dumps(arith_pod("cli-never-injected", {"kuberpc.io/inject": "enabled"})))
    example.wait("the broken proxy serving its metrics", lambda: any(
        s.get("name") == "kuberpc-proxy" and (s.get("state") or {}).get("running")
        for s in (example.get("pod", "expired-proxy", "-n", BROKEN).get("status") or {}).get("containerStatuses") or []
    ), timeout=60)
    yield example
    example.kubectl("delete", "pod", "cli-never-injected", "-n", "kube-system", "--wait=false", check=False)
    example.kubectl("delete", "namespace", BROKEN, "--wait=false", check=False)


def test_check_fails_on_a_proxy_whose_certificate_expired_and_on_pods_left_without_a_proxy(broken: Kube) -> None:
    done = broken.wait("check to see the expired certificate", lambda: (
        d if "has an expired certificate" in (d := kuberpc(broken, "check", "-A")).stdout else None), timeout=60)

    lines = done.stdout.splitlines()
    failed = [line for line in lines if line.startswith("✘")]
    assert done.returncode == 1
    i = next(i for i, line in enumerate(lines) if line.startswith(f"✘ the proxy of {BROKEN}/expired-proxy has an expired certificate (since "))
    assert lines[i + 1].startswith("    fix: it cannot renew it")
    assert f"✘ {BROKEN}/before-opt-in asks for a proxy (namespace label kuberpc.io/inject=enabled) but has none" in lines
    assert "✘ kube-system/cli-never-injected asks for a proxy (kuberpc.io/inject: enabled) but has none" in lines
    # The healthy example is still healthy, line by line.
    assert f"✔ the proxy of {EXAMPLE}/{client_pod(broken)} is ready with a valid certificate" in lines
    # Other modules of this session may leave failing pods of their own: these three must be among the failures.
    assert len(failed) >= 3 and lines[-1] == f"{len(failed)} check(s) failed"
