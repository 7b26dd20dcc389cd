"""The Node.js example client as tests run it: found (or skipped, never in CI) and run as a subprocess."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "e2e" / "arith" / "node"
DEADLINE = 30.0  # seconds one run of the client may take before the test fails


def find_node() -> str:
    """`node` with the client's dependencies installed; skip with the reason outside CI, fail in CI."""
    exe = shutil.which("node")
    missing = None
    if exe is None:
        missing = "node is not on PATH"
    elif not (NODE_DIR / "node_modules").is_dir():
        missing = f"{NODE_DIR / 'node_modules'} is missing (run `npm ci --prefix e2e/arith/node`)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so the Node client must be tested, but {missing}")
        print(f"skipping: {missing}")
        pytest.skip(missing)
    assert exe is not None
    return exe


async def run_node_client(node: str, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `node client.js ARGS` (killed past DEADLINE)."""
    proc = await asyncio.create_subprocess_exec(
        node, str(NODE_DIR / "client.js"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
