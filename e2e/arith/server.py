"""The Arith gRPC server (grpc.aio): answers all five methods and tags every call with its replica name.

Application code only: must not depend on kuberpc, which it reaches (if at all) only through the network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from e2e.arith.stubs import REPLICA_HEADER, arith_pb2, arith_pb2_grpc

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# A Range longer than this is refused: one call must not be able to pin a server for hours.
MAX_RANGE = 1_000_000
DEFAULT_GRACE_SECONDS = 5.0

log = logging.getLogger(__name__)


class ArithServicer:
    """The five methods of arith.Arith; every call first sends `x-replica: <replica>` as initial metadata."""

    def __init__(self, replica: str) -> None:
        self._tag = ((REPLICA_HEADER, replica),)

    async def _begin(self, context: grpc.aio.ServicerContext) -> None:
        await context.send_initial_metadata(self._tag)

    async def _reply(self, c: int, context: grpc.aio.ServicerContext) -> Any:
        if not INT64_MIN <= c <= INT64_MAX:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"result {c} does not fit in int64")
        return arith_pb2.Reply(c=c)

    async def Add(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._begin(context)
        return await self._reply(request.a + request.b, context)

    async def Multiply(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._begin(context)
        return await self._reply(request.a * request.b, context)

    async def Range(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await self._begin(context)
        if request.b - request.a > MAX_RANGE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Range: b - a is {request.b - request.a}, at most {MAX_RANGE}",
            )
        for c in range(request.a, request.b):
            yield arith_pb2.Reply(c=c)

    async def Sum(self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        await self._begin(context)
        total = 0
        async for args in request_iterator:
            total += args.a + args.b
        return await self._reply(total, context)

    async def Accumulate(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await self._begin(context)
        total = 0
        async for args in request_iterator:
            total += args.a + args.b
            yield await self._reply(total, context)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.asynccontextmanager
async def running(
    *, host: str = "127.0.0.1", port: int = 0, replica: str = "", grace: float = DEFAULT_GRACE_SECONDS
) -> AsyncIterator[int]:
    """Serve Arith while the block runs; yields the bound port (useful with port 0). Drains on exit."""
    # SO_REUSEPORT (grpc's default) would let two servers share a port silently; a clash must fail loudly.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    arith_pb2_grpc.add_ArithServicer_to_server(ArithServicer(replica), server)
    try:
        bound = server.add_insecure_port(_hostport(host, port))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {_hostport(host, port)}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot listen on {_hostport(host, port)}")
    await server.start()
    try:
        yield int(bound)
    finally:
        await server.stop(grace)


async def serve(
    *,
    host: str,
    port: int,
    replica: str,
    stop: asyncio.Event,
    on_ready: Callable[[str, int], None],
    grace: float = DEFAULT_GRACE_SECONDS,
) -> None:
    """Serve until `stop` is set, then let in-flight calls finish for up to `grace` seconds."""
    async with running(host=host, port=port, replica=replica, grace=grace) as bound:
        on_ready(host, bound)
        await stop.wait()
        log.info("stopping: draining in-flight calls for up to %.1fs", grace)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready(host: str, port: int) -> None:
        # The one line on stdout: scripts wait for it and read the port from it.
        print(f"serving on {_hostport(host, port)}", flush=True)

    await serve(
        host=args.host, port=args.port, replica=args.replica, stop=stop, on_ready=ready, grace=args.grace
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m e2e.arith.server", description="The Arith example gRPC server."
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--replica",
        default=socket.gethostname(),
        help="name sent as x-replica initial metadata on every call (default: the host name, i.e. the pod name)",
    )
    parser.add_argument(
        "--grace", type=float, default=DEFAULT_GRACE_SECONDS, help="seconds in-flight calls get after SIGTERM"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        asyncio.run(_main(args))
    except OSError as e:
        print(f"arith server: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
