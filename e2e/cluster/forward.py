"""A loopback TCP port in this namespace that forwards to an address inside another network namespace.

The control plane lives in its own namespace; this is how the test process (and kubectl) reach it, as a
`kubectl port-forward` would. It never listens anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import os
import socket
import threading

CLONE_NEWNET = 0x40000000


def _enter_netns(netns: str) -> None:
    """Move the calling thread (only it) into `netns`; sockets it creates from now on belong there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Forwarder:
    """`with Forwarder(netns, host, port) as f:` then connect to 127.0.0.1:f.port."""

    def __init__(self, netns: str, host: str, port: int) -> None:
        self._target = (host, port)
        # One thread lives in the target namespace for good: connect() runs there, nothing else does.
        self._inside = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"netns-{netns}", initializer=_enter_netns, initargs=(netns,)
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarder", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> Forwarder:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            # Let them end before the loop stops: a task stopped mid-cancel is reported as destroyed while pending.
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._inside.shutdown(wait=False, cancel_futures=True)

    def _connect(self) -> socket.socket:
        return socket.create_connection(self._target, timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # Only __exit__ cancels: the connection ends with the forwarder. Returning (not re-raising) keeps
            # asyncio's client_connected_cb callback from printing a CancelledError traceback per connection.
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = await self._loop.run_in_executor(self._inside, self._connect)
        except OSError:
            writer.close()
            return
        sock.setblocking(False)
        up_reader, up_writer = await asyncio.open_connection(sock=sock)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
