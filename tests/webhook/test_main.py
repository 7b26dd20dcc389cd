"""The entry point as a process: --help, config errors, and `serve` answering then stopping on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.pki import KeyPair

ROOT = Path(__file__).parents[2]
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webhook", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_help_lists_both_commands_and_documents_jobs() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    assert "serve" in proc.stdout and "install" in proc.stdout
    assert "curl -X POST http://localhost:15090/shutdown" in proc.stdout


def test_serve_help_names_the_manifest_arguments() -> None:
    proc = run("serve", "--help")
    assert proc.returncode == 0
    for flag in ("--config", "--tls-cert", "--tls-key", "--port"):
        assert flag in proc.stdout


def test_a_bad_config_exits_with_every_problem(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("logLevel: loud\nnativeSidecar: maybe\n")
    proc = run("serve", "--config", str(tmp_path / "config.yaml"), "--tls-cert", "x", "--tls-key", "y")
    assert proc.returncode == 2
    assert "logLevel: 'loud'" in proc.stderr and "nativeSidecar: 'maybe'" in proc.stderr


def test_a_missing_config_file_is_reported(tmp_path: Path) -> None:
    proc = run("serve", "--config", str(tmp_path / "absent.yaml"), "--tls-cert", "x", "--tls-key", "y")
    assert proc.returncode == 2 and "absent.yaml" in proc.stderr


async def test_serve_answers_reviews_and_exits_cleanly_on_sigterm(
    tmp_path: Path, serving_files: tuple[KeyPair, Path, Path], review: Callable[[str], dict[str, Any]]
) -> None:
    ca, cert, key = serving_files
    (tmp_path / "config.yaml").write_text('kubernetesVersion: "1.30"\nlogLevel: info\n')
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "no-kubeconfig"), "POD_NAMESPACE": "kuberpc-system"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook", "serve", "--config", str(tmp_path / "config.yaml"),
        "--tls-cert", str(cert), "--tls-key", str(key), "--host", "127.0.0.1", "--port", "0", "--shutdown-delay", "0",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            while not (m := re.search(rb'event=listening address=(\[.*\])', await proc.stderr.readline())):
                pass
        host, port = json.loads(m.group(1))
        async with aiohttp.ClientSession() as s:
            ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
            async with s.post(
                f"https://{host}:{port}/mutate?timeout=10s", json=review("deployment-pod-review"), ssl=ctx, server_hostname=SERVER_NAME
            ) as resp:
                answer = (await resp.json())["response"]
        assert answer["allowed"] is True and answer["patchType"] == "JSONPatch"
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
