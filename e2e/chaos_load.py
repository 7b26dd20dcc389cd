"""Bounded gRPC load for the chaos scenarios: concurrent callers of the Arith app (unary Add and server-streaming
Range) for a fixed time, each call recorded with its outcome. Runs inside the client pod's namespace.

Application code only: must not depend on kuberpc, which it reaches only through the network.

`python -m e2e.chaos_load TARGET AUTHORITY CALLERS STREAMERS SECONDS DEADLINE` prints `load started`, then
`warm` after WARM_S seconds of steady load, then one JSON list of calls: [start, end, code, retryable, replica,
details] (details: a failed call's status message), times from time.monotonic() (the same clock in every
namespace of the host).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import grpc

from e2e.arith.stubs import REPLICA_HEADER, arith_pb2, arith_pb2_grpc

WARM_S = 1.5  # seconds of load before it says `warm`: the fault comes after a steady start to compare with
MAX_CALLS_PER_CALLER = 100_000  # a bound whatever the speed


async def _replica(call: Any) -> str:
    try:
        md = await call.initial_metadata()
    except grpc.aio.AioRpcError:
        return ""
    value = md.get(REPLICA_HEADER) if md is not None else None
    return str(value) if value is not None else ""


async def main(target: str, authority: str, callers: int, streamers: int, seconds: float, deadline: float) -> None:
    records: list[list[Any]] = []
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        stub = arith_pb2_grpc.ArithStub(ch)
        await ch.channel_ready()
        end_at = time.monotonic() + seconds

        async def caller(i: int, streaming: bool) -> None:
            for n in range(MAX_CALLS_PER_CALLER):
                start = time.monotonic()
                if start >= end_at:
                    return
                if streaming:
                    call = stub.Range(arith_pb2.Args(a=n, b=n + 5), timeout=deadline)
                else:
                    call = stub.Add(arith_pb2.Args(a=n, b=i), timeout=deadline)
                code, details = "OK", ""
                try:
                    if streaming:
                        got = [r.c async for r in call]
                        if got != list(range(n, n + 5)):
                            code = "WRONG_ANSWER"
                    else:
                        reply = await call
                        if reply.c != n + i:
                            code = "WRONG_ANSWER"
                except grpc.aio.AioRpcError as e:
                    code, details = e.code().name, e.details() or ""
                replica = await _replica(call)
                # The app had started answering (its x-replica header reached us): a proxy may not retry it.
                records.append([start, time.monotonic(), code, code == "OK" or not replica, replica, details])

        print("load started", flush=True)
        tasks = [asyncio.create_task(caller(i, i < streamers)) for i in range(callers)]

        async def announce() -> None:
            await asyncio.sleep(WARM_S)  # the schedule: the steady phase lasts this long
            print("warm", flush=True)

        announcer = asyncio.create_task(announce())
        await asyncio.gather(*tasks)
        announcer.cancel()
    print(json.dumps(records), flush=True)


if __name__ == "__main__":
    t, a, c, s, secs, dl = sys.argv[1:7]
    asyncio.run(main(t, a, int(c), int(s), float(secs), float(dl)))
