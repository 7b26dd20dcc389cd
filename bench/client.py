"""The grpcio side of the bench: a real client's status check per path, and bidi streaming throughput.

A client only, over loopback; it must not start servers or proxies.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from bench import grpcwire
from bench.configs import ARGS, REPLY_C, STREAM_PATH, UNARY_PATH


class VerifyError(RuntimeError):
    """A real gRPC client did not get status OK and the right answer through a path."""


def _options(authority: str) -> list[tuple[str, object]]:
    return [("grpc.default_authority", authority), ("grpc.enable_retries", 0)]


async def verify(port: int, authority: str, timeout_s: float = 10.0) -> dict[str, str]:
    """Add(1, 2) must return c=3 with grpc-status 0; Accumulate over three messages must stream 3, 6, 9."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_options(authority)) as channel:
        add = channel.unary_unary(UNARY_PATH)
        call = add(grpcwire.encode_args(*ARGS), timeout=timeout_s)
        reply = await call
        code = await call.code()
        if code != grpc.StatusCode.OK or grpcwire.decode_reply(reply) != REPLY_C:
            raise VerifyError(f"Add: status {code.name}, reply {reply!r}")
        acc = channel.stream_stream(STREAM_PATH)
        stream = acc(iter([grpcwire.encode_args(*ARGS)] * 3), timeout=timeout_s)
        sums = [grpcwire.decode_reply(r) async for r in stream]
        code = await stream.code()
        if code != grpc.StatusCode.OK or sums != [REPLY_C, 2 * REPLY_C, 3 * REPLY_C]:
            raise VerifyError(f"Accumulate: status {code.name}, replies {sums}")
    return {"Add": "OK", "Accumulate": "OK"}


@dataclass(frozen=True, slots=True)
class StreamResult:
    messages: int
    elapsed_s: float

    @property
    def per_second(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def _one_stream(channel: grpc.aio.Channel, messages: int, timeout_s: float) -> int:
    request = grpcwire.encode_args(*ARGS)
    call = channel.stream_stream(STREAM_PATH)(timeout=timeout_s)

    async def send() -> None:
        for _ in range(messages):
            await call.write(request)
        await call.done_writing()

    sender = asyncio.ensure_future(send())
    received = 0
    try:
        async for reply in call:
            received += 1
            # Each reply is the running sum: a wrong, lost or reordered message shows as a wrong value.
            if grpcwire.decode_reply(reply) != received * REPLY_C:
                raise VerifyError(f"Accumulate reply {received} was {grpcwire.decode_reply(reply)}")
        await sender
    finally:
        sender.cancel()
    code = await call.code()
    if code != grpc.StatusCode.OK or received != messages:
        raise VerifyError(f"Accumulate: status {code.name}, {received} of {messages} replies")
    return received


async def stream_throughput(
    port: int, authority: str, *, messages: int, streams: int, timeout_s: float
) -> StreamResult:
    """`streams` concurrent bidi calls, each sending `messages // streams` Args and reading every reply."""
    per = max(1, messages // streams)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_options(authority)) as channel:
        await channel.channel_ready()
        start = time.perf_counter()
        counts = await asyncio.gather(*(_one_stream(channel, per, timeout_s) for _ in range(streams)))
        return StreamResult(sum(counts), time.perf_counter() - start)
