"""`kuberpc tap` and `kuberpc top` read a real proxy's /tap on loopback (as after `kubectl port-forward`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import grpc

from tests.ports import dead_port
from tests.sidecar.harness import Pair, backend, mesh_certs, pair, wait_for
from tests.sidecar.test_mesh import channel
from webhook.cli.main import main

__all__ = ["backend", "mesh_certs", "pair"]  # fixtures used below


async def run_while_calling(pair: Pair, args: list[str], codes: list[str | None]) -> tuple[int, str, str]:
    """Runs the command; once it has subscribed, makes one call per entry of `codes` (None: OK)."""
    out, err = io.StringIO(), io.StringIO()
    command = asyncio.create_task(asyncio.to_thread(main, args, stdout=out, stderr=err))
    relay = pair.client_side.proxy.out_relay
    await wait_for(lambda: relay.tap is not None, "the command to subscribe")
    async with channel(pair.target) as ch:
        for code in codes:
            md = (("x-status", code),) if code else ()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await ch.unary_unary("/test.Echo/Unary")(b"x", metadata=md, timeout=10)
    return await command, out.getvalue(), err.getvalue()


async def test_tap_prints_each_call_with_status_name_latency_and_peer_identity(pair: Pair) -> None:
    args = ["tap", "--admin", pair.client_side.debug, "--limit", "2", "--seconds", "30"]

    code, out, err = await run_while_calling(pair, args, [None, "NOT_FOUND"])

    header, first, second, end = out.splitlines()
    assert (code, err) == (0, "")
    assert header.split() == ["DIRECTION", "SERVICE", "METHOD", "STATUS", "LATENCY", "PEER"]
    for line, status in ((first, "OK"), (second, "NOT_FOUND")):
        direction, service, method, shown, latency, peer = line.split()
        assert (direction, service, method, shown) == ("outbound", "echo.default", "/test.Echo/Unary", status)
        assert latency.endswith("ms") and peer == "spiffe://cluster.local/ns/default/sa/arith"
    assert end == "# ended (limit): 2 calls, 0 dropped"


async def test_top_aggregates_the_calls_by_route_and_peer(pair: Pair) -> None:
    args = ["top", "--admin", pair.client_side.debug, "--limit", "5", "--seconds", "30", "-o", "json"]

    code, out, _ = await run_while_calling(pair, args, [None, None, None, "UNAVAILABLE", "NOT_FOUND"])

    (route,) = json.loads(out)["items"]
    assert code == 0
    assert (route["method"], route["peer"], route["calls"], route["success"]) == (
        "/test.Echo/Unary",
        "spiffe://cluster.local/ns/default/sa/arith",
        5,
        0.6,
    )
    assert 0 < route["latency_ms"]["p50"] <= route["latency_ms"]["max"]


def test_tap_of_a_proxy_that_does_not_answer_fails_naming_it() -> None:
    dead = f"127.0.0.1:{dead_port()}"
    err = io.StringIO()

    code = main(["tap", "--admin", dead, "--seconds", "1"], stdout=io.StringIO(), stderr=err)

    assert code == 1 and err.getvalue().startswith(f"kuberpc tap: http://{dead}/tap")
