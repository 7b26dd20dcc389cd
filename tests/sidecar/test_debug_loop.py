"""/debug never holds the proxy's event loop for more than a few milliseconds, however large the document (issue 16).

A proxy process (`python -m sidecar run`, as in a pod) holding 2,000 Services of 10 endpoints each (a file catalog:
about what a direct-mode proxy holds in a big cluster) answers /debug with a multi-megabyte document; json.dumps of
it held the loop for well over 100 ms. While /debug is fetched, a second client asks the same loop for /live over
and over on a kept-alive connection: the slowest of those answers bounds how long the loop was held."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.ports import free_port
from tests.sidecar.harness import MeshCerts, endpoints_yaml
from tests.sidecar.test_memory import wait_ready

SERVICES = 2000
PER_SERVICE = 10
# "A few milliseconds": the encoder yields after ~2 ms of work; the rest is a /live round trip on a noisy host.
MAX_LIVE_S = 0.020


def catalog() -> str:
    return endpoints_yaml(
        {
            f"svc-{i}.default": [
                {"address": f"198.51.100.{1 + j}", "port": 20000 + i, "weight": 1 + j} for j in range(PER_SERVICE)
            ]
            for i in range(SERVICES)
        }
    )


def slowest_live_while(admin: int, busy: threading.Event) -> tuple[float, int]:
    """Polls /live until `busy` clears: (the slowest answer in seconds, how many were asked)."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    worst, n = 0.0, 0
    try:
        while busy.is_set():
            t0 = time.perf_counter()
            conn.request("GET", "/live")
            resp = conn.getresponse()
            assert resp.read() == b"live"
            worst = max(worst, time.perf_counter() - t0)
            n += 1
    finally:
        conn.close()
    return worst, n


def test_a_multi_megabyte_debug_document_never_holds_the_loop(mesh_certs: MeshCerts, tmp_path: Path) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(catalog())
    admin, debug = free_port(), free_port()
    env = {
        **os.environ,
        "KUBERPC_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "KUBERPC_DEBUG_ADDR": f"127.0.0.1:{debug}",
        "KUBERPC_OUTBOUND_ADDR": f"127.0.0.1:{free_port()}",
        "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_DISCOVERY": f"file:{disc}",
        "KUBERPC_TLS_CERT": mesh_certs.client.cert,
        "KUBERPC_TLS_KEY": mesh_certs.client.key,
        "KUBERPC_TRUST_ANCHORS": mesh_certs.client.ca,
        "KUBERPC_LOG_LEVEL": "warning",
    }
    with (tmp_path / "proxy.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=env, stderr=log)
    try:
        wait_ready(f"127.0.0.1:{admin}", proc, timeout=30)
        results: list[tuple[float, int, float]] = []
        quiet = threading.Event()
        quiet.set()
        threading.Timer(0.7, quiet.clear).start()
        baseline = slowest_live_while(admin, quiet)
        for _ in range(3):
            busy = threading.Event()
            busy.set()
            probe: list[tuple[float, int]] = []
            prober = threading.Thread(target=lambda out, ev: out.append(slowest_live_while(admin, ev)), args=(probe, busy))
            prober.start()
            t0 = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", debug, timeout=30)
            conn.request("GET", "/debug")
            resp = conn.getresponse()
            body = resp.read()
            took = time.perf_counter() - t0
            conn.close()
            busy.clear()
            prober.join(15)
            assert resp.status == 200
            results.append((*probe[0], took))
    finally:
        proc.terminate()
        proc.wait(15)
        print((tmp_path / "proxy.log").read_text()[-3000:])
    doc = json.loads(body)
    services = doc["routes"]["services"]
    assert len(services) == SERVICES
    assert len(services["svc-7.default"]["endpoints"]) == PER_SERVICE
    assert len(body) > 2_000_000, f"the document is only {len(body)} bytes: too small to show anything"
    summary = ", ".join(f"/debug {took * 1000:.0f} ms: slowest of {n} /live {w * 1000:.1f} ms" for w, n, took in results)
    summary += f"; with no /debug: slowest of {baseline[1]} /live {baseline[0] * 1000:.1f} ms"
    print(f"{len(body)} bytes; {summary}")
    assert all(n >= 10 for _, n, _ in results), f"too few /live answers to observe the loop: {summary}"
    assert max(w for w, _, _ in results) < MAX_LIVE_S, f"/debug held the loop: {summary}"
