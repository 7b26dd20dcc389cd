"""The Arith gRPC client (grpc.aio): one function per call shape, each returning the result and the replica.

Application code only: must not depend on kuberpc; it dials whatever target it is given, in plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from e2e.arith.stubs import REPLICA_HEADER, arith_pb2, arith_pb2_grpc

T = TypeVar("T")
DEFAULT_DEADLINE = 5.0  # seconds: the gRPC deadline each call carries


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """What one call returned, and which replica (its `x-replica` initial metadata) answered it."""

    value: T
    replica: str


def channel(target: str, authority: str | None = None) -> grpc.aio.Channel:
    """A plaintext channel to `target`, sending `authority` as :authority when given (how the mesh routes)."""
    options = [("grpc.default_authority", authority)] if authority else []
    return grpc.aio.insecure_channel(target, options=options)


def stub(ch: grpc.aio.Channel) -> Any:
    return arith_pb2_grpc.ArithStub(ch)


async def _replica(call: Any) -> str:
    metadata = await call.initial_metadata()
    value = metadata.get(REPLICA_HEADER) if metadata is not None else None
    return str(value) if value is not None else ""


async def _args(pairs: Iterable[tuple[int, int]]) -> AsyncIterator[Any]:
    for a, b in pairs:
        yield arith_pb2.Args(a=a, b=b)


async def add(s: Any, a: int, b: int, *, deadline: float = DEFAULT_DEADLINE) -> Answer[int]:
    call = s.Add(arith_pb2.Args(a=a, b=b), timeout=deadline)
    reply = await call
    return Answer(int(reply.c), await _replica(call))


async def multiply(s: Any, a: int, b: int, *, deadline: float = DEFAULT_DEADLINE) -> Answer[int]:
    call = s.Multiply(arith_pb2.Args(a=a, b=b), timeout=deadline)
    reply = await call
    return Answer(int(reply.c), await _replica(call))


async def range_(s: Any, a: int, b: int, *, deadline: float = DEFAULT_DEADLINE) -> Answer[list[int]]:
    """Server streaming: a, a+1, ... < b."""
    call = s.Range(arith_pb2.Args(a=a, b=b), timeout=deadline)
    values = [int(reply.c) async for reply in call]
    return Answer(values, await _replica(call))


async def sum_(
    s: Any, pairs: Iterable[tuple[int, int]], *, deadline: float = DEFAULT_DEADLINE
) -> Answer[int]:
    """Client streaming: the sum of a + b over every pair."""
    call = s.Sum(_args(pairs), timeout=deadline)
    reply = await call
    return Answer(int(reply.c), await _replica(call))


async def accumulate(
    s: Any, pairs: Iterable[tuple[int, int]], *, deadline: float = DEFAULT_DEADLINE
) -> Answer[list[int]]:
    """Bidirectional streaming: the running sum of a + b after each pair, one message at a time."""
    call = s.Accumulate(timeout=deadline)
    values: list[int] = []
    # Write one, read one: proves the relay forwards each message as it comes, not the stream as a whole.
    for a, b in pairs:
        await call.write(arith_pb2.Args(a=a, b=b))
        reply = await call.read()
        if reply is grpc.aio.EOF:
            break
        values.append(int(reply.c))
    await call.done_writing()
    # grpc.aio forbids mixing read() with `async for` on one call; read() raises AioRpcError on a bad status.
    while (reply := await call.read()) is not grpc.aio.EOF:
        values.append(int(reply.c))
    return Answer(values, await _replica(call))


async def run(target: str, authority: str | None, calls: int) -> int:
    """The CLI: `calls` unary Adds, then one call of every other shape; prints what came back."""
    async with channel(target, authority) as ch:
        s = stub(ch)
        replicas: Counter[str] = Counter()
        started = time.perf_counter()
        for i in range(calls):
            answer = await add(s, i, i)
            if answer.value != 2 * i:
                print(f"Add({i}, {i}) = {answer.value}, expected {2 * i}", file=sys.stderr)
                return 1
            replicas[answer.replica] += 1
        elapsed = time.perf_counter() - started
        print(f"Add x{calls}: ok in {elapsed:.2f}s, replicas {dict(sorted(replicas.items()))}")
        product = await multiply(s, 6, 7)
        print(f"Multiply(6, 7) = {product.value}  [{product.replica}]")
        rng = await range_(s, 0, 5)
        print(f"Range(0, 5) = {rng.value}  [{rng.replica}]")
        total = await sum_(s, [(1, 2), (3, 4), (5, 6)])
        print(f"Sum((1,2), (3,4), (5,6)) = {total.value}  [{total.replica}]")
        running = await accumulate(s, [(1, 1), (2, 2), (3, 3)])
        print(f"Accumulate((1,1), (2,2), (3,3)) = {running.value}  [{running.replica}]")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.arith.client", description="Call the Arith example service."
    )
    parser.add_argument(
        "--target", default="127.0.0.1:15001", help="host:port to dial (default: the local proxy)"
    )
    parser.add_argument(
        "--authority", default=None, help=":authority to send, e.g. arith.default (default: target)"
    )
    parser.add_argument("--calls", type=int, default=10, help="number of unary Add calls (default 10)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run(args.target, args.authority, args.calls))
    except grpc.aio.AioRpcError as e:
        print(f"call failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
