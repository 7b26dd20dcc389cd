"""A proxy fed by a file or by the control plane never imports aiohttp (issue 14): aiohttp.web cost every pod
~16 MiB of RSS and ~200 ms of startup. Direct mode (sidecar/discovery/kubernetes.py) still uses it, imported only
in that mode.

Each proxy runs in a child process of its own (the test process has imported aiohttp long ago), is asked for
every admin route once ready, then says which aiohttp modules it holds."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.sidecar.fake_control_plane import RunningPlane
from tests.sidecar.harness import MeshCerts, endpoints_yaml
from tests.sidecar.test_proxy_controlplane import Pki, cp_env, pki, plane, replica

__all__ = ["pki", "plane", "replica"]  # fixtures

REPO = Path(__file__).resolve().parents[2]

# Ready, then each admin route asked once (their code paths imported too), then the modules held.
_CHILD = """
import asyncio, sys, urllib.error, urllib.request
from sidecar import config
from sidecar.app import serve

def ask(url, method="GET"):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

async def main():
    cfg = config.load({environ!r})
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    proxy = await asyncio.wait_for(started, 20)
    admin, debug = proxy.bound_port("admin"), proxy.bound_port("debug")
    urls = [f"http://127.0.0.1:{{admin}}{{p}}" for p in ("/ready", "/live", "/metrics", "/debug")]
    urls += [f"http://127.0.0.1:{{debug}}/debug", f"http://127.0.0.1:{{debug}}/tap?limit=1&seconds=0.1"]
    print("answers:", [await asyncio.to_thread(ask, url) for url in urls])
    print("shutdown:", await asyncio.to_thread(ask, f"http://127.0.0.1:{{admin}}/shutdown", "POST"))
    await asyncio.wait_for(task, 20)  # /shutdown set stop
    print("aiohttp imported:", sorted(m for m in sys.modules if m == "aiohttp" or m.startswith("aiohttp.")))

asyncio.run(main())
"""

_EXPECTED = [
    "answers: [200, 200, 200, 404, 200, 200]",  # /debug on the admin listener: 404 saying where it is
    "shutdown: 202",
    "aiohttp imported: []",
]


async def _run_child(environ: dict[str, str]) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD.format(environ=environ), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return stdout.decode().splitlines()


async def test_a_file_fed_proxy_never_imports_aiohttp(mesh_certs: MeshCerts, tmp_path: Path) -> None:
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    w = mesh_certs.client
    environ = {
        "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0", "KUBERPC_ADMIN_ADDR": "127.0.0.1:0", "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
        "KUBERPC_INBOUND_ADDR": "off", "KUBERPC_DISCOVERY": f"file:{disc}",
        "KUBERPC_TLS_CERT": w.cert, "KUBERPC_TLS_KEY": w.key, "KUBERPC_TRUST_ANCHORS": w.ca,
    }  # fmt: skip

    assert await _run_child(environ) == _EXPECTED


async def test_a_control_plane_fed_proxy_never_imports_aiohttp(replica: RunningPlane, pki: Pki) -> None:
    assert await _run_child(cp_env(replica, pki)) == _EXPECTED
