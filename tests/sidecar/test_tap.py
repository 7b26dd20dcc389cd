"""The tap: /tap on the loopback-only debug listener streams the calls a proxy finishes, bounded in count and time, to
loopback peers only; the relays see the tap only while someone is subscribed.

Real proxies and real gRPC on loopback; the admin's /tap read with aiohttp as `kuberpc tap` reads it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from sidecar.admin import TAP_MAX_CALLS, AdminServer, Request, Response
from sidecar.tap import QUEUE_SIZE, Tap
from tests.sidecar.harness import Pair, wait_for
from tests.sidecar.test_mesh import channel


async def tap_lines(admin: str, query: str) -> AsyncIterator[dict[str, object]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"http://{admin}/tap?{query}") as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        async for line in resp.content:
            yield json.loads(line)


async def test_a_tap_streams_each_finished_call_without_metadata_then_says_why_it_ended(pair: Pair) -> None:
    relay = pair.client_side.proxy.out_relay
    assert relay.tap is None
    stream = tap_lines(pair.client_side.debug, "limit=3&seconds=30")
    # The request is sent and the subscription made while this waits for the first line.
    waiting = asyncio.ensure_future(anext(stream))
    await wait_for(lambda: relay.tap is not None, "the tap to subscribe")
    async with channel(pair.target) as ch:
        for _ in range(4):
            await ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-token", "secret-4242"),), timeout=10)
    lines = [await waiting] + [line async for line in stream]

    calls, end = lines[:-1], lines[-1]
    assert end == {"end": "limit", "calls": 3, "dropped": 0}
    assert [(c["direction"], c["method"], c["grpc_code"]) for c in calls] == [
        ("outbound", "/test.Echo/Unary", 0)
    ] * 3
    assert {c["peer"] for c in calls} == {"spiffe://cluster.local/ns/default/sa/arith"}
    assert "secret-4242" not in json.dumps(lines)
    await wait_for(lambda: relay.tap is None, "the tap to unsubscribe")


async def test_a_tap_with_no_calls_ends_at_its_time_limit(pair: Pair) -> None:
    lines = [line async for line in tap_lines(pair.client_side.debug, "limit=10&seconds=0.2")]

    assert lines == [{"end": "time", "calls": 0, "dropped": 0}]


@pytest.mark.parametrize(
    "query", ["limit=0", f"limit={TAP_MAX_CALLS + 1}", "seconds=61", "seconds=0", "limit=x"]
)
async def test_a_tap_beyond_its_bounds_is_refused_with_400(pair: Pair, query: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{pair.client_side.debug}/tap?{query}") as r,
    ):
        assert r.status == 400


async def test_a_tap_from_a_non_loopback_peer_is_forbidden() -> None:
    server = AdminServer(
        registry=CollectorRegistry(),
        ready=lambda: True,
        debug=dict,
        shutdown=lambda: None,
        tap=Tap(print).subscribe,
    )
    # The peer as the admin server reads it from the transport (tests/sidecar/test_admin.py checks that path).
    request = Request("GET", "/tap", {"limit": "1"}, {}, peer="10.1.2.3")

    response = await server._tap_stream(request)

    assert isinstance(response, Response) and response.status == 403


def test_a_subscriber_that_falls_behind_loses_calls_counted_not_memory() -> None:
    changes: list[object] = []
    tap = Tap(changes.append)
    record = {"direction": "outbound"}

    with tap.subscribe() as sub:
        for _ in range(QUEUE_SIZE + 7):
            tap.publish(record)  # type: ignore[arg-type]
        assert (sub.queue.qsize(), sub.dropped) == (QUEUE_SIZE, 7)

    assert changes == [tap, None]
