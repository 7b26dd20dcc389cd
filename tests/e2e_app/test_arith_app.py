"""The Arith example app, called directly (no proxy): real grpc on loopback, the server on port 0."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from e2e.arith import client
from e2e.arith.server import MAX_RANGE, running
from e2e.arith.stubs import arith_pb2

REPO = Path(__file__).resolve().parents[2]
REPLICA = "arith-test-7"
DEADLINE = 20.0  # seconds any subprocess step may take before the test fails


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with running(replica=REPLICA, grace=1.0) as bound:
        yield bound


@pytest.fixture
async def stub(port: int) -> AsyncIterator[Any]:
    async with client.channel(f"127.0.0.1:{port}") as ch:
        yield client.stub(ch)


async def test_add_returns_the_sum(stub: Any) -> None:
    assert (await client.add(stub, 40, 2)).value == 42


async def test_add_handles_negative_operands(stub: Any) -> None:
    assert (await client.add(stub, -5, 3)).value == -2


async def test_multiply_returns_the_product(stub: Any) -> None:
    assert (await client.multiply(stub, 6, -7)).value == -42


async def test_range_streams_every_integer_from_a_below_b(stub: Any) -> None:
    assert (await client.range_(stub, 3, 8)).value == [3, 4, 5, 6, 7]


async def test_range_streams_nothing_when_b_is_not_above_a(stub: Any) -> None:
    assert (await client.range_(stub, 5, 5)).value == []


async def test_range_longer_than_the_limit_is_refused_as_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.range_(stub, 0, MAX_RANGE + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_sum_adds_a_and_b_of_every_message(stub: Any) -> None:
    assert (await client.sum_(stub, [(1, 2), (3, 4), (5, 6)])).value == 21


async def test_sum_of_no_messages_is_zero(stub: Any) -> None:
    assert (await client.sum_(stub, [])).value == 0


async def test_accumulate_replies_with_the_running_sum_after_each_message(stub: Any) -> None:
    assert (await client.accumulate(stub, [(1, 1), (2, 2), (3, 3), (-10, 0)])).value == [2, 6, 12, 2]


async def test_a_result_outside_int64_is_refused_as_out_of_range(stub: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.add(stub, 2**63 - 1, 1)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE


@pytest.mark.parametrize(
    "call",
    [
        lambda s: client.add(s, 1, 2),
        lambda s: client.multiply(s, 1, 2),
        lambda s: client.range_(s, 0, 2),
        lambda s: client.sum_(s, [(1, 2)]),
        lambda s: client.accumulate(s, [(1, 2)]),
    ],
    ids=["Add", "Multiply", "Range", "Sum", "Accumulate"],
)
async def test_every_method_sends_x_replica_initial_metadata(stub: Any, call: Any) -> None:
    assert (await call(stub)).replica == REPLICA


async def test_concurrent_calls_all_succeed(stub: Any) -> None:
    answers = await asyncio.gather(*(client.add(stub, i, i) for i in range(200)))
    assert [a.value for a in answers] == [2 * i for i in range(200)]


async def test_client_sends_the_given_authority() -> None:
    # grpc's server API hides :authority, so a bare HTTP/2 listener (the h2 library) records the request's.
    seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        while not seen.done() and (data := await reader.read(65536)):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived) and not seen.done():
                    headers = {bytes(k): bytes(v) for k, v in event.headers}
                    seen.set_result(headers[b":authority"].decode())
            writer.write(conn.data_to_send())
        writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with client.channel(f"127.0.0.1:{port}", authority="arith.default:50051") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await client.add(client.stub(ch), 1, 1, deadline=2.0)
        assert await asyncio.wait_for(seen, DEADLINE) == "arith.default:50051"
    finally:
        listener.close()


async def _start_server_cli(*extra: str) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "e2e.arith.server", "--port", "0", "--replica", REPLICA, *extra,
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
    assert line.startswith("serving on 127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


async def test_server_cli_prints_one_serving_line_and_exits_zero_on_sigterm() -> None:
    proc, port = await _start_server_cli()
    try:
        async with client.channel(f"127.0.0.1:{port}") as ch:
            assert (await client.add(client.stub(ch), 1, 2)).value == 3
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), DEADLINE)
        assert proc.returncode == 0
        assert out == b""  # nothing after the serving line
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_server_cli_lets_an_in_flight_call_finish_after_sigterm() -> None:
    proc, port = await _start_server_cli("--grace", "10")
    assert proc.stderr is not None
    try:
        async with client.channel(f"127.0.0.1:{port}") as ch:
            call = client.stub(ch).Accumulate(timeout=DEADLINE)
            await call.write(arith_pb2.Args(a=1, b=1))
            assert (await call.read()).c == 2
            proc.send_signal(signal.SIGTERM)
            # The server logs when it starts draining: from then on it is shutting down.
            while b"stopping" not in await asyncio.wait_for(proc.stderr.readline(), DEADLINE):
                pass
            await call.write(arith_pb2.Args(a=2, b=2))
            assert (await call.read()).c == 6
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(proc.wait(), DEADLINE)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_client_cli_makes_every_call_shape_and_prints_the_results(port: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "e2e.arith.client", "--target", f"127.0.0.1:{port}", "--calls", "5",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "Add x5: ok" in text and f"'{REPLICA}': 5" in text
    assert "Multiply(6, 7) = 42" in text
    assert "Range(0, 5) = [0, 1, 2, 3, 4]" in text
    assert "= 21" in text
    assert "= [2, 6, 12]" in text


async def test_client_cli_exits_nonzero_when_the_target_refuses() -> None:
    with_refusing_port = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = with_refusing_port.sockets[0].getsockname()[1]
    with_refusing_port.close()
    await with_refusing_port.wait_closed()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "e2e.arith.client", "--target", f"127.0.0.1:{port}", "--calls", "1",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 1
    assert b"UNAVAILABLE" in err
