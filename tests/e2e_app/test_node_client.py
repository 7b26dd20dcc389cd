"""The Node.js Arith client (e2e/arith/node/client.js) against the Python server, called directly.

Skipped, with the reason, when node or node_modules is missing; under CI=true that is a failure instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from e2e.arith.server import running

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = REPO / "e2e" / "arith" / "node"
REPLICA = "arith-node-test"
DEADLINE = 30.0  # seconds the node process may take before the test fails


@pytest.fixture
def node() -> str:
    exe = shutil.which("node")
    missing = None
    if exe is None:
        missing = "node is not on PATH"
    elif not (NODE_DIR / "node_modules").is_dir():
        missing = f"{NODE_DIR / 'node_modules'} is missing (run `npm ci --prefix e2e/arith/node`)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, so the Node client must be tested, but {missing}")
        pytest.skip(missing)
    assert exe is not None
    return exe


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with running(replica=REPLICA, grace=1.0) as bound:
        yield bound


async def run_client(node: str, *args: str) -> tuple[int, str, str]:
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


async def test_node_client_prints_add_range_and_accumulate_results_as_one_json_line(
    node: str, port: int
) -> None:
    code, out, err = await run_client(node, "--target", f"127.0.0.1:{port}", "--authority", "arith.default")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    result = json.loads(lines[0])
    assert (result["add"], result["range"], result["accumulate"]) == (5, [0, 1, 2, 3, 4], [2, 6, 12])


async def test_node_client_reports_the_x_replica_of_every_call(node: str, port: int) -> None:
    code, out, err = await run_client(node, "--target", f"127.0.0.1:{port}")
    assert code == 0, err
    assert json.loads(out)["replicas"] == {"Add": REPLICA, "Range": REPLICA, "Accumulate": REPLICA}


async def test_node_client_exits_nonzero_naming_the_status_when_the_target_refuses(node: str) -> None:
    closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    free_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    code, out, err = await run_client(node, "--target", f"127.0.0.1:{free_port}", "--timeout", "2")
    assert code != 0
    assert out == ""
    assert "UNAVAILABLE" in err
