"""A call that ends at the caller's deadline is counted as DEADLINE_EXCEEDED (grpc_code="4") by both
proxies; a call the caller cancels well before its deadline stays CANCELLED ("1").

Real proxies, a real grpcio caller and backend, on loopback.
"""

from __future__ import annotations

import grpc
import pytest

from tests.sidecar.harness import Backend, Pair, RunningProxy, wait_for
from tests.sidecar.test_mesh import channel, scrape


def _calls(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], direction: str, code: str) -> float:
    key = (
        "kuberpc_requests_total",
        (
            ("direction", direction),
            ("grpc_code", code),
            ("method", "/test.Echo/Unary"),
            ("service", "echo.default"),
        ),
    )
    return samples.get(key, 0.0)


def _counted(p: RunningProxy, direction: str) -> bool:
    """The proxy has recorded the end of the test's one call (its duration histogram counts it)."""
    labels = {"direction": direction, "service": "echo.default", "method": "/test.Echo/Unary"}
    return p.proxy.registry.get_sample_value("kuberpc_request_duration_seconds_count", labels) == 1


async def test_a_call_that_outlives_the_callers_deadline_is_recorded_as_4_on_both_sides(
    pair: Pair, backend: Backend
) -> None:
    async with channel(pair.target) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-sleep-ms", "8000"),), timeout=1.0)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_for(lambda: backend.state.cancelled.is_set(), "the backend to see the call end")
    await wait_for(lambda: _counted(pair.client_side, "outbound"), "the client proxy to count the call")
    await wait_for(lambda: _counted(pair.server_side, "inbound"), "the server proxy to count the call")
    out = await scrape(pair.client_side.admin)
    inn = await scrape(pair.server_side.admin)
    assert (_calls(out, "outbound", "4"), _calls(out, "outbound", "1")) == (1, 0)
    assert (_calls(inn, "inbound", "4"), _calls(inn, "inbound", "1")) == (1, 0)


async def test_a_call_cancelled_long_before_its_deadline_is_recorded_as_cancelled(
    pair: Pair, backend: Backend
) -> None:
    async with channel(pair.target) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-sleep-ms", "8000"),), timeout=30.0)
        await wait_for(lambda: bool(backend.state.seen_deadline), "the backend to receive the call")
        call.cancel()
    await wait_for(lambda: backend.state.cancelled.is_set(), "the backend to see the call end")
    await wait_for(lambda: _counted(pair.client_side, "outbound"), "the client proxy to count the call")
    await wait_for(lambda: _counted(pair.server_side, "inbound"), "the server proxy to count the call")
    out = await scrape(pair.client_side.admin)
    inn = await scrape(pair.server_side.admin)
    assert (_calls(out, "outbound", "1"), _calls(out, "outbound", "4")) == (1, 0)
    assert (_calls(inn, "inbound", "1"), _calls(inn, "inbound", "4")) == (1, 0)
