"""The Node.js Arith client (e2e/arith/node/client.js) against the Python server, called directly.

Skipped, with the reason, when node or node_modules is missing; under CI=true that is a failure instead.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from e2e.arith.server import running
from tests.e2e_app.nodeclient import find_node, run_node_client

REPO = Path(__file__).resolve().parents[2]
REPLICA = "arith-node-test"


@pytest.fixture
def node() -> str:
    return find_node()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with running(replica=REPLICA, grace=1.0) as bound:
        yield bound


async def test_node_client_prints_add_range_and_accumulate_results_as_one_json_line(
    node: str, port: int
) -> None:
    code, out, err = await run_node_client(node, "--target", f"127.0.0.1:{port}", "--authority", "arith.default")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    result = json.loads(lines[0])
    assert (result["add"], result["range"], result["accumulate"]) == (5, [0, 1, 2, 3, 4], [2, 6, 12])


async def test_node_client_reports_the_x_replica_of_every_call(node: str, port: int) -> None:
    code, out, err = await run_node_client(node, "--target", f"127.0.0.1:{port}")
    assert code == 0, err
    assert json.loads(out)["replicas"] == {"Add": REPLICA, "Range": REPLICA, "Accumulate": REPLICA}


async def test_node_client_exits_nonzero_naming_the_status_when_the_target_refuses(node: str) -> None:
    closed = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    free_port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    code, out, err = await run_node_client(node, "--target", f"127.0.0.1:{free_port}", "--timeout", "2")
    assert code != 0
    assert out == ""
    assert "UNAVAILABLE" in err
