"""The Arith server with a failure ratio: a chosen share of Add calls is answered `UNAVAILABLE` before anything
else (trailers-only, as a gRPC server overloaded or restarting answers), for the chaos scenarios.

Application code only: must not depend on kuberpc.
`python -m e2e.chaos_app --port P --replica NAME --fail-ratio R --seed S` prints `serving on …` when ready.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from typing import Any

import grpc

from e2e.arith.server import ArithServicer
from e2e.arith.stubs import arith_pb2_grpc


class FlakyArith(ArithServicer):
    def __init__(self, replica: str, fail_ratio: float, rng: random.Random) -> None:
        super().__init__(replica)
        self._fail_ratio = fail_ratio
        self._rng = rng

    async def Add(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._rng.random() < self._fail_ratio:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "chaos: this call fails on purpose")
        return await super().Add(request, context)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    arith_pb2_grpc.add_ArithServicer_to_server(
        FlakyArith(args.replica, args.fail_ratio, random.Random(args.seed)), server
    )
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.chaos_app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", required=True)
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(_main(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
