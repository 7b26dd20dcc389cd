"""A fake gRPC app on raw HTTP/2: `Add` answered with a fixed reply, or `Accumulate` streamed back as running sums.

Far cheaper per message than a grpcio server, so the app never limits a proxy's saturation (the streaming
bench) and adds few instructions around the relay's (bench/instructions.py). It never decodes a header block:
`--method add` or `accumulate` serves one method per listener, and `auto` tells them apart by the first DATA
frame (ending the stream: a unary Add; not: a bidi Accumulate). It must not route, authorize or proxy.
Run as `python -m bench.rawapp --port P --method accumulate`; prints `ready` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bench import grpcwire, rawh2
from bench.rawh2 import DATA, END_HEADERS, END_STREAM, HEADERS

# :status 200 (static index 8); content-type: application/grpc as a literal without indexing (name index 31).
RESPONSE_BLOCK = b"\x88\x0f\x10\x10application/grpc"
# grpc-status: 0, a literal without indexing with a new name.
TRAILERS_BLOCK = b"\x00\x0bgrpc-status\x010"


class App(rawh2.Peer):
    """One connection from a proxy (or a client); `method` is "add" or "accumulate"."""

    def __init__(self, method: str, reply: bytes) -> None:
        super().__init__()
        self._method = method
        self._accumulate = method == "accumulate"
        self._streaming: dict[int, bool] = {}  # auto: per stream, decided by its first DATA frame
        self._reply = reply
        self._bufs: dict[int, bytes] = {}
        self._sums: dict[int, int] = {}
        # Frames a stream could not send for want of window: (sid, frames, data length) in order.
        self._blocked: list[tuple[int, bytes, int]] = []
        self._started = False

    def data_received(self, data: bytes) -> None:
        if not self._started:
            if not data.startswith(rawh2.PREFACE):
                self.fail("no HTTP/2 preface")
                return
            self._started = True
            self.queue(rawh2.our_settings())
            data = data[len(rawh2.PREFACE):]
        super().data_received(data)

    def on_headers(self, sid: int, flags: int) -> None:
        if sid in self._sums:
            return  # trailers from the client: none in gRPC, ignored
        self._sums[sid] = 0
        if self._accumulate:
            self._streaming[sid] = True
            self.queue(rawh2.frame(HEADERS, END_HEADERS, sid, RESPONSE_BLOCK))
        elif self._method == "add":
            self._streaming[sid] = False
        if flags & END_STREAM:
            self._finish(sid)

    def _send(self, sid: int, frames: bytes, n: int) -> None:
        if self._blocked or self.send_window(sid) < n:
            self._blocked.append((sid, frames, n))
            return
        self.spend(sid, n)
        self.queue(frames)

    def on_window(self) -> None:
        while self._blocked:
            sid, frames, n = self._blocked[0]
            if self.send_window(sid) < n:
                return
            self._blocked.pop(0)
            self.spend(sid, n)
            self.queue(frames)

    def _finish(self, sid: int) -> None:
        trailers = rawh2.frame(HEADERS, END_HEADERS | END_STREAM, sid, TRAILERS_BLOCK)
        self._sums.pop(sid, None)
        self._bufs.pop(sid, None)
        if self._streaming.pop(sid, False):
            self._send(sid, trailers, 0)
            return
        reply = self._reply
        self._send(sid, rawh2.frame(HEADERS, END_HEADERS, sid, RESPONSE_BLOCK)
                   + rawh2.frame(DATA, 0, sid, reply) + trailers, len(reply))

    def on_data(self, sid: int, payload: bytes, end: bool) -> None:
        streaming = self._streaming.get(sid)
        if streaming is None:  # auto, first DATA frame
            streaming = self._streaming[sid] = not end
            if streaming:
                self.queue(rawh2.frame(HEADERS, END_HEADERS, sid, RESPONSE_BLOCK))
        if streaming and payload:
            buf = self._bufs.pop(sid, b"") + payload
            pos, total, out = 0, self._sums[sid], []
            while len(buf) - pos >= 5:
                length = int.from_bytes(buf[pos + 1 : pos + 5], "big")
                if len(buf) - pos - 5 < length:
                    break
                a, b = grpcwire.decode_args(buf[pos + 5 : pos + 5 + length])
                total += a + b
                out.append(rawh2.grpc_message(grpcwire.encode_reply(total)))
                pos += 5 + length
            self._sums[sid] = total
            if pos < len(buf):
                self._bufs[sid] = buf[pos:]
            if out:
                body = b"".join(out)
                self._send(sid, rawh2.frame(DATA, 0, sid, body), len(body))
        if end:
            self._finish(sid)


async def serve(port: int, method: str, stop: asyncio.Event, host: str = "127.0.0.1",
                listening: asyncio.Event | None = None) -> None:
    reply = grpcwire.frame(grpcwire.encode_reply(3))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: App(method, reply), host, port, reuse_address=True)
    print("ready", flush=True)
    if listening is not None:
        listening.set()
    async with server:
        await stop.wait()


async def _main(port: int, method: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(port, method, stop)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rawapp")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", choices=("add", "accumulate", "auto"), default="accumulate")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args.port, args.method))
    except OSError as e:
        print(f"rawapp: {e}", file=sys.stderr)
        raise SystemExit(1) from e


if __name__ == "__main__":
    main()
