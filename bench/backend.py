"""The streaming backend: a grpc.aio server of `arith.Arith` Add and Accumulate on raw bytes.

Serves only; the unary load goes to nginx's fixed reply (see configs.nginx_backend), which this must not replace.
Run as `python -m bench.backend --port P`; prints `ready` on stdout once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator

import grpc

from bench import grpcwire


async def _add(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    a, b = grpcwire.decode_args(request)
    return grpcwire.encode_reply(a + b)


async def _accumulate(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    total = 0
    async for request in requests:
        a, b = grpcwire.decode_args(request)
        total += a + b
        yield grpcwire.encode_reply(total)


def handler() -> grpc.GenericRpcHandler:
    # No serializers: messages stay bytes and grpcwire encodes them, so no generated stubs are needed.
    return grpc.method_handlers_generic_handler(
        "arith.Arith",
        {
            "Add": grpc.unary_unary_rpc_method_handler(_add),
            "Accumulate": grpc.stream_stream_rpc_method_handler(_accumulate),
        },
    )


async def serve(port: int, stop: asyncio.Event) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    server.add_generic_rpc_handlers((handler(),))
    if server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise OSError(f"could not listen on 127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await stop.wait()
    await server.stop(grace=1)


async def _main(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(port, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backend")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args.port))
    except OSError as e:
        print(f"backend: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
