"""A TCP forwarder that delays what flows back by a fixed time, standing in for `tc netem delay` (the kernel
here has no netem): in a pod's namespace in front of its proxy, it makes that pod answer late.

Bytes are forwarded in order, unchanged (TLS passes through). Must not parse or alter the traffic.
`python -m e2e.chaos_delay LISTEN_PORT TARGET_PORT DELAY_MS` prints `forwarding on …` when ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)  # the delay this forwarder exists to add
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            queue.put_nowait((loop.time() + delay, data))
    queue.put_nowait((loop.time() + delay, b""))
    with contextlib.suppress(OSError):
        await sender


async def main(listen: int, target: int, delay_ms: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer, 0.0), _pipe(up_reader, writer, delay_ms / 1000))

    server = await asyncio.start_server(handle, "0.0.0.0", listen)
    print(f"forwarding on {listen}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
