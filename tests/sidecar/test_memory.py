"""A client that stops reading must not make the proxies buffer without bound: measured as RSS of real
proxy processes while the app tries to push 256 MB through them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import h2.settings
import pytest

from tests.ports import free_port
from tests.sidecar.h2peer import connect, grpc_frame, request_headers
from tests.sidecar.harness import Backend, MeshCerts, endpoints_yaml


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_ready(admin: str, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "proxy exited (its log is printed at teardown)"
        try:
            with urllib.request.urlopen(f"http://{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"proxy at {admin} never ready")


@pytest.fixture
def proxy_processes(mesh_certs: MeshCerts, backend: Backend, tmp_path: Path) -> Iterator[tuple[int, list[int]]]:
    inbound, out = free_port(), free_port()
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(
        endpoints_yaml(
            {"echo.default": [{"address": "127.0.0.1", "port": inbound, "tls": True}]},
            {"echo.default": {"kuberpc.io/grpc-services": "test.Echo"}},
        )
    )
    procs = []
    for wl, env in (
        (mesh_certs.server, {"KUBERPC_INBOUND_ADDR": f"127.0.0.1:{inbound}", "KUBERPC_APP_PORT": str(backend.port),
                             "KUBERPC_POD_LABELS": "app=echo",
                             "KUBERPC_OUTBOUND_ADDR": f"127.0.0.1:{free_port()}"}),
        (mesh_certs.client, {"KUBERPC_INBOUND_ADDR": "off", "KUBERPC_OUTBOUND_ADDR": f"127.0.0.1:{out}"}),
    ):
        admin = f"127.0.0.1:{free_port()}"
        full = {
            **os.environ,
            "KUBERPC_ADMIN_ADDR": admin,
            "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
            "KUBERPC_DISCOVERY": f"file:{disc}",
            "KUBERPC_TLS_CERT": wl.cert,
            "KUBERPC_TLS_KEY": wl.key,
            "KUBERPC_TRUST_ANCHORS": wl.ca,
            "KUBERPC_LOG_LEVEL": "warning",
            **env,
        }
        log = (tmp_path / f"proxy-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", "run"], env=full, stderr=log)
        procs.append(proc)
        wait_ready(admin, proc)
    yield out, [p.pid for p in procs]
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(10)
    for f in sorted(tmp_path.glob("proxy-*.log")):
        print(f"--- {f.name}\n{f.read_text()}")


async def test_a_client_that_stops_reading_leaves_proxy_memory_bounded(
    proxy_processes: tuple[int, list[int]], backend: Backend
) -> None:
    out_port, pids = proxy_processes
    # Warm both proxies up with a normal call so the baseline includes connections and code paths.
    warm = await connect("127.0.0.1", out_port)
    await warm.call(b"warm")
    baseline = [rss_kib(pid) for pid in pids]

    stuck = await connect("127.0.0.1", out_port, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    sid = stuck.conn.get_next_available_stream_id()
    # 4,096 replies of 64 KB: 256 MB the app would push if nothing held it back.
    stuck.conn.send_headers(sid, request_headers(path="/test.Echo/ServerStream", extra=[("x-count", "4096")]))
    await stuck.send_body(sid, grpc_frame(b"m" * 65_536))
    await asyncio.sleep(3.0)  # give an unbounded proxy time to show itself

    grown_mib = [(rss_kib(pid) - b) / 1024 for pid, b in zip(pids, baseline, strict=True)]
    sent = backend.state.stream_messages_sent
    stuck.writer.close()
    warm.writer.close()
    # Each proxy holds at most one stream window plus socket buffers; the app is held back too.
    assert all(g < 24 for g in grown_mib), f"proxy RSS grew by {grown_mib} MiB"
    assert sent < 1024, f"the app pushed {sent} messages: nothing held it back"
    print(f"RSS growth per proxy (MiB): {[round(g, 1) for g in grown_mib]}; app messages sent: {sent}/4096")
