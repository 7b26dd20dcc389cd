"""gRPC semantics through a real proxy pair with mTLS on loopback: the same result as calling the app directly."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from tests.sidecar.harness import GRPC_OPTIONS, Backend, Pair

AUTHORITY = "echo.default:50051"


@dataclass
class Observed:
    code: grpc.StatusCode
    details: str
    initial: list[tuple[str, Any]]
    trailing: list[tuple[str, Any]]
    responses: list[bytes]


def _md(md: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in (md or ())]


async def observe(
    target: str,
    shape: str,
    *,
    metadata: tuple[tuple[str, Any], ...] = (),
    request: bytes = b"ping",
    count: int = 3,
    compression: grpc.Compression | None = None,
    timeout: float = 20,
) -> Observed:
    options = [*GRPC_OPTIONS, ("grpc.default_authority", AUTHORITY)]
    async with grpc.aio.insecure_channel(target, options=options, compression=compression) as ch:
        responses: list[bytes] = []
        call: Any
        if shape == "unary":
            call = ch.unary_unary("/test.Echo/Unary")(request, metadata=metadata, timeout=timeout)
        elif shape == "server_stream":
            call = ch.unary_stream("/test.Echo/ServerStream")(request, metadata=metadata, timeout=timeout)
        elif shape == "client_stream":
            call = ch.stream_unary("/test.Echo/ClientStream")(iter([request] * count), metadata=metadata, timeout=timeout)
        else:
            call = ch.stream_stream("/test.Echo/Bidi")(iter([request] * count), metadata=metadata, timeout=timeout)
        try:
            if shape in ("unary", "client_stream"):
                responses.append(await call)
            else:
                async for r in call:
                    responses.append(r)
        except grpc.aio.AioRpcError:
            pass
        return Observed(
            await call.code(),
            await call.details(),
            _md(await call.initial_metadata()),
            _md(await call.trailing_metadata()),
            responses,
        )


SHAPES = ["unary", "server_stream", "client_stream", "bidi"]
CASES = {
    "ok": dict(metadata=(("x-echo-text", "hello"), ("x-echo-data-bin", b"\x00\x01\xfe\xff"))),
    "error_with_details": dict(
        metadata=(("x-status", "FAILED_PRECONDITION"), ("x-message-bin", "wrong state: ünïcode %".encode()), ("x-details-bin", b"\x08\x09detail"))
    ),
    "not_found": dict(metadata=(("x-status", "NOT_FOUND"), ("x-message", "no such thing"))),
    "gzip": dict(metadata=(("x-echo-z", "1"),), compression=grpc.Compression.Gzip, request=b"z" * 100_000),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES)
async def test_each_call_shape_gives_the_same_result_through_the_mesh_as_directly(
    pair: Pair, backend: Backend, shape: str, case: str
) -> None:
    kwargs: dict[str, Any] = dict(CASES[case])
    direct = await observe(f"127.0.0.1:{backend.port}", shape, **kwargs)
    meshed = await observe(pair.target, shape, **kwargs)
    assert meshed == direct
    assert meshed.trailing, "trailers must arrive"


async def test_request_metadata_reaches_the_app_untouched(pair: Pair, backend: Backend) -> None:
    md = (("x-plain", "v"), ("x-multi", "a"), ("x-multi", "b"), ("x-raw-bin", bytes(range(256))))
    await observe(f"127.0.0.1:{backend.port}", "unary", metadata=md)
    await observe(pair.target, "unary", metadata=md)
    direct, meshed = backend.state.seen_metadata[-2:]
    assert [m for m in meshed if m[0].startswith("x-")] == [m for m in direct if m[0].startswith("x-")]


async def test_a_deadline_expires_as_deadline_exceeded_within_50ms(pair: Pair) -> None:
    start = time.monotonic()
    got = await observe(pair.target, "unary", metadata=(("x-sleep-ms", "3000"),), timeout=0.5)
    elapsed = time.monotonic() - start
    assert got.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.5 <= elapsed < 0.55


async def test_the_deadline_reaches_the_app_reduced_not_extended(pair: Pair, backend: Backend) -> None:
    await observe(pair.target, "unary", timeout=5)
    remaining = backend.state.seen_deadline[-1]
    assert remaining is not None and 4.0 < remaining <= 5.0


async def test_a_cancelled_call_is_seen_as_cancelled_by_the_app(pair: Pair, backend: Backend) -> None:
    options = [*GRPC_OPTIONS, ("grpc.default_authority", AUTHORITY)]
    async with grpc.aio.insecure_channel(pair.target, options=options) as ch:
        call = ch.unary_unary("/test.Echo/Unary")(b"x", metadata=(("x-sleep-ms", "5000"),), timeout=10)
        await asyncio.sleep(0.3)  # let the call reach the app
        call.cancel()
        assert await asyncio.to_thread(backend.state.cancelled.wait, 3)


@pytest.mark.parametrize("shape", ["unary", "bidi"])
async def test_an_8_mib_message_goes_both_ways(pair: Pair, shape: str) -> None:
    big = bytes(range(256)) * (8 * 4096)
    got = await observe(pair.target, shape, request=big, count=1)
    assert got.code == grpc.StatusCode.OK
    assert got.responses == [big]


async def test_a_stream_of_10000_messages_completes(pair: Pair) -> None:
    got = await observe(pair.target, "bidi", request=b"m" * 20, count=10_000, timeout=60)
    assert got.code == grpc.StatusCode.OK
    assert len(got.responses) == 10_000


async def test_an_unknown_service_is_unavailable_with_a_message_naming_it(pair: Pair) -> None:
    async with grpc.aio.insecure_channel(pair.target, options=[("grpc.default_authority", "nosuch.default:80")]) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/nosuch.Svc/Call")(b"x", timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "nosuch" in (err.value.details() or "")
