"""An open-loop paced unary gRPC client: one call every 1/rate s on one HTTP/2 connection, each latency recorded.

Hand-written on the `h2` state machine because h2load's --rps releases calls in bursts on its timer ticks
(~10 ms), which measures queueing behind a burst rather than latency at a steady rate; grpcio would add its
own per-call overhead. Client only; it must not start servers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from bench import grpcwire


class PacedError(RuntimeError):
    """A call failed, was reset, or did not finish in time: the run is not a measurement."""


@dataclass(slots=True)
class _Call:
    sent: float
    status: str = ""
    body: bytearray = field(default_factory=bytearray)
    grpc_status: str = ""


# A call sent more than this after its slot counts as late (the event loop's timers have 1 ms resolution).
LATE_S = 0.002


@dataclass(frozen=True, slots=True)
class PacedResult:
    latencies_us: list[int]
    late_sends: int


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    return next((v.decode() for k, v in headers if k == name), "")


async def run(
    port: int,
    authority: str,
    path: str,
    request: bytes,
    expected_reply: bytes,
    *,
    rate: float,
    calls: int,
    timeout_s: float,
    clock: Callable[[], float] = time.perf_counter,
) -> PacedResult:
    """Send `calls` calls at `rate`/s without waiting for replies; return each latency in µs, in sending order,
    and how many calls left more than LATE_S after their slot (a busy client core, or the server's stream limit).

    Latency runs from handing the call to the socket to its trailers. Every reply must be HTTP 200, exactly
    `expected_reply` (one framed message) and grpc-status 0, or PacedError is raised.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.increment_flow_control_window(1 << 30)  # the replies are tiny; never let window updates pace them
    writer.write(conn.data_to_send())
    pending: dict[int, _Call] = {}
    latencies: dict[int, int] = {}
    all_done = asyncio.Event()
    slot = asyncio.Event()
    failures: list[str] = []
    late = 0

    def finish(stream_id: int) -> None:
        call = pending.pop(stream_id)
        latencies[stream_id] = int((clock() - call.sent) * 1e6)
        if call.status != "200" or bytes(call.body) != expected_reply or call.grpc_status != "0":
            failures.append(f"stream {stream_id}: :status {call.status}, grpc-status {call.grpc_status or '-'}, "
                            f"body {bytes(call.body)!r}")
        slot.set()
        if len(latencies) == calls:
            all_done.set()

    async def receive() -> None:
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    pending[event.stream_id].status = _header(event.headers, b":status")
                    # A trailers-only reply (an error from a proxy) carries grpc-status in these headers.
                    pending[event.stream_id].grpc_status = _header(event.headers, b"grpc-status")
                elif isinstance(event, h2.events.DataReceived):
                    pending[event.stream_id].body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    pending[event.stream_id].grpc_status = _header(event.headers, b"grpc-status")
                elif isinstance(event, h2.events.StreamEnded):
                    finish(event.stream_id)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id in pending:
                    failures.append(f"stream {event.stream_id} reset with {event.error_code!r}")
                    finish(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise PacedError(f"connection closed by the server: {event.error_code!r}")
            writer.write(conn.data_to_send())
        raise PacedError("connection closed by the server")

    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    receiver = asyncio.create_task(receive())
    try:
        start = clock()
        for i in range(calls):
            # Open loop: the schedule never waits for replies, so a slow reply cannot hide the ones behind it.
            # Sleeping even when late (0 s) lets the receiver run, so a late burst cannot starve it.
            await asyncio.sleep(max(0.0, start + i / rate - clock()))
            while conn.open_outbound_streams >= conn.remote_settings.max_concurrent_streams:
                # The server's stream limit is the one thing that may hold a call back; counted in `late`.
                slot.clear()
                waiter = asyncio.ensure_future(slot.wait())
                await asyncio.wait({waiter, receiver}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if receiver.done():
                    break
            if receiver.done():
                break
            if clock() - (start + i / rate) > LATE_S:
                late += 1
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, headers)
            conn.send_data(stream_id, request, end_stream=True)
            writer.write(conn.data_to_send())
            pending[stream_id] = _Call(sent=clock())
        wait = asyncio.create_task(all_done.wait())
        await asyncio.wait({wait, receiver}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        wait.cancel()
        if receiver.done() and not all_done.is_set():
            receiver.result()  # raises the receiver's PacedError
        if not all_done.is_set():
            raise PacedError(f"{len(latencies)} of {calls} calls finished within {timeout_s} s")
    finally:
        receiver.cancel()
        writer.close()
    if failures:
        raise PacedError(f"{len(failures)} of {calls} calls failed; first: {failures[0]}")
    return PacedResult([latencies[s] for s in sorted(latencies)], late)


def expected_reply(c: int) -> bytes:
    return grpcwire.frame(grpcwire.encode_reply(c))
