"""The webhook's HTTP/1.1 layer over real sockets on loopback, byte for byte: ordering, limits, timeouts, drain.

Each test runs on asyncio's loop and on uvloop (conftest's pytest_asyncio_loop_factories), as the webhook does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sidecar.harness import wait_for
from webhook.http1 import FEED_BYTES, MAX_PIPELINED, HttpServer, Request, Response, serving, text

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def echo(request: Request) -> Response:
    return text(200, f"{request.method} {request.path} q={request.query} body={request.body.decode()}")


class Gate:
    """A handler that holds each request until released: `started` is set when one reaches it."""

    def __init__(self, answer: str = "slow") -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.answered = 0  # requests it has finished (what a real handler would count in its metrics)
        self._answer = answer

    async def __call__(self, request: Request) -> Response:
        self.started.set()
        await self.release.wait()
        self.answered += 1
        return text(200, self._answer)


def routes(**extra: Callable[[Request], Awaitable[Response]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {"/echo": {"GET": echo, "POST": echo}, "/post-only": {"POST": echo}}
    for name, handler in extra.items():
        out["/" + name] = {"GET": handler, "POST": handler}
    return out


@asynccontextmanager
async def served(
    server: HttpServer, *, ssl_context: ssl.SSLContext | None = None, grace: float = 5.0
) -> AsyncIterator[tuple[str, int]]:
    async with serving(
        server, host="127.0.0.1", port=0, ssl_context=ssl_context, shutdown_timeout=grace
    ) as bound:
        yield bound


async def connect(bound: tuple[str, int]) -> Conn:
    return await asyncio.open_connection(*bound)


async def read_response(
    reader: asyncio.StreamReader, *, head_only: bool = False
) -> tuple[int, dict[str, str], bytes]:
    """One response: status, headers (lower-case names), body (by Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = b"" if head_only or status == 100 else await asyncio.wait_for(reader.readexactly(length), 10)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF) with nothing more to read."""
    return await asyncio.wait_for(reader.read(), 10) == b""


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    return (
        f"GET {path} HTTP/{version}\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
    ).encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n" + "".join(
        h + "\r\n" for h in headers
    )
    return head.encode() + b"\r\n" + body


async def test_requests_on_one_connection_are_answered_in_turn_and_the_connection_kept() -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        for i in range(3):
            writer.write(post("/echo?timeout=10s", f"n{i}".encode()))
            status, headers, body = await read_response(reader)
            assert (status, body) == (200, f"POST /echo q=timeout=10s body=n{i}\n".encode())
            assert "connection" not in headers and "date" in headers
        writer.close()


async def test_pipelined_requests_are_answered_in_order_though_the_first_is_slowest() -> None:
    slow = Gate()
    started, release = slow.started, slow.release

    async with served(HttpServer(routes(slow=slow))) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/slow") + get("/echo?a") + post("/echo", b"third"))
        await started.wait()
        reading = asyncio.ensure_future(reader.read(1))
        await asyncio.sleep(0.05)  # give a wrongly ordered answer a chance to arrive before the slow one
        assert not reading.done()
        release.set()
        first = await reading + await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        assert await reader.readexactly(5) == b"slow\n"
        assert (await read_response(reader))[2] == b"GET /echo q=a body=\n"
        assert (await read_response(reader))[2] == b"POST /echo q= body=third\n"
        writer.close()


async def test_a_long_pipeline_is_parsed_in_bounded_steps_and_answered_whole() -> None:
    slow = Gate()
    started, release = slow.started, slow.release

    n = MAX_PIPELINED * 12
    one = get("/echo?000")
    server = HttpServer(routes(slow=slow))
    async with served(server) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/slow") + b"".join(get(f"/echo?{i:03d}") for i in range(n)))
        await started.wait()
        (conn,) = server.connections
        await wait_for(lambda: bool(conn._held), "the server to hold back what it read")
        # Reading stopped at MAX_PIPELINED answers due; at most one more slice of input was parsed.
        assert len(conn._queue) <= MAX_PIPELINED + FEED_BYTES // len(one) + 1
        assert conn._transport is not None and not conn._transport.is_reading()
        release.set()
        assert (await read_response(reader))[2] == b"slow\n"
        for i in range(n):
            assert (await read_response(reader))[2] == f"GET /echo q={i:03d} body=\n".encode()
        assert conn._transport.is_reading()
        writer.close()


async def test_connection_close_is_honoured_after_the_answer() -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/echo", "Connection: close") + get("/echo?ignored"))
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(reader)


async def test_http_1_0_closes_unless_it_asks_for_keep_alive() -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/echo", version="1.0"))
        assert (await read_response(reader))[1]["connection"] == "close"
        assert await closed(reader)

        reader, writer = await connect(bound)
        for _ in range(2):
            writer.write(get("/echo", "Connection: keep-alive", version="1.0"))
            status, headers, _ = await read_response(reader)
            assert status == 200 and headers["connection"] == "keep-alive"
        writer.close()


@pytest.mark.parametrize(("request_bytes", "status", "allow"), [
    (get("/nowhere"), 404, None),
    (get("/echo/extra"), 404, None),
    (get("/post-only"), 405, "POST"),
    (b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "GET, HEAD, POST"),
])  # fmt: skip
async def test_unknown_paths_are_404_and_other_methods_405_with_allow(
    request_bytes: bytes, status: int, allow: str | None
) -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(request_bytes + get("/echo"))
        got, headers, _ = await read_response(reader)
        assert got == status and headers.get("allow") == allow
        assert (await read_response(reader))[0] == 200  # the connection stays usable
        writer.close()


async def test_head_gets_the_gets_headers_and_no_body() -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n" + get("/echo?next"))
        status, headers, _ = await read_response(reader, head_only=True)
        assert status == 200 and headers["content-length"] == str(len(b"HEAD /echo q= body=\n"))
        assert (await read_response(reader))[2] == b"GET /echo q=next body=\n"  # nothing stood between them
        writer.close()


async def test_a_body_declared_past_the_limit_is_refused_before_it_is_sent() -> None:
    async with served(HttpServer(routes(), max_body_bytes=1000)) as bound:
        reader, writer = await connect(bound)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        status, headers, body = await read_response(reader)
        assert status == 413 and headers["connection"] == "close" and b"1000 bytes" in body
        assert await closed(reader)


async def test_a_chunked_body_past_the_limit_is_refused_and_one_within_it_answered() -> None:
    def chunked(size: int) -> bytes:
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"%x\r\n%s\r\n0\r\n\r\n" % (size, b"y" * size)

    async with served(HttpServer(routes(), max_body_bytes=1000)) as bound:
        reader, writer = await connect(bound)
        writer.write(chunked(1000))
        assert (await read_response(reader))[2] == b"POST /echo q= body=" + b"y" * 1000 + b"\n"
        writer.write(chunked(1001))
        assert (await read_response(reader))[0] == 413
        assert await closed(reader)


async def test_expect_100_continue_gets_the_interim_answer_unless_the_body_is_too_large() -> None:
    async with served(HttpServer(routes(), max_body_bytes=1000)) as bound:
        reader, writer = await connect(bound)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert (await read_response(reader))[0] == 100
        writer.write(b"hello")
        assert (await read_response(reader))[2] == b"POST /echo q= body=hello\n"

        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        assert (await read_response(reader))[0] == 413
        assert await closed(reader)


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"\x00\xff\r\n\r\n",
    ],
)
async def test_unparseable_requests_get_400_with_the_reason_then_close(garbage: bytes) -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/echo") + garbage)
        assert (await read_response(reader))[0] == 200  # the good request before it is still answered
        status, headers, body = await read_response(reader)
        assert status == 400 and body.startswith(b"bad request: ") and headers["connection"] == "close"
        assert await closed(reader)


async def test_headers_past_the_limit_get_431() -> None:
    async with served(HttpServer(routes(), max_head_bytes=2048)) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/echo", "X-Big: " + "z" * 4096))
        assert (await read_response(reader))[0] == 431
        assert await closed(reader)


async def test_an_upgrade_request_is_answered_and_the_connection_closed() -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(
            get("/echo", "Connection: Upgrade", "Upgrade: h2c") + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        )
        assert (await read_response(reader))[0] == 200
        assert await closed(reader)


async def test_a_failing_handler_is_a_500_and_the_connection_carries_on() -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("bug")

    async with served(HttpServer(routes(broken=broken))) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/broken") + get("/echo"))
        assert (await read_response(reader))[:3:2] == (500, b"internal error\n")
        assert (await read_response(reader))[0] == 200
        writer.close()


async def test_an_idle_connection_is_closed_after_the_idle_timeout() -> None:
    async with served(HttpServer(routes(), idle_timeout=0.2)) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/echo"))
        assert (await read_response(reader))[0] == 200
        assert await closed(reader)


async def test_a_request_that_stalls_half_sent_gets_408() -> None:
    async with served(HttpServer(routes(), request_timeout=0.2)) as bound:
        reader, writer = await connect(bound)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        status, headers, _ = await read_response(reader)
        assert status == 408 and headers["connection"] == "close"
        assert await closed(reader)


async def test_a_slow_handler_is_not_cut_off_by_the_request_timeout() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.5)
        return text(200, "late but whole")

    async with served(HttpServer(routes(slow=slow), request_timeout=0.1, idle_timeout=0.1)) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/slow"))
        assert (await read_response(reader))[2] == b"late but whole\n"


async def test_draining_answers_in_flight_requests_with_connection_close() -> None:
    slow = Gate("finished")
    started, release = slow.started, slow.release

    server = HttpServer(routes(slow=slow))
    cm = served(server)
    bound = await cm.__aenter__()
    idle_reader, idle_writer = await connect(bound)
    idle_writer.write(get("/echo"))
    assert (await read_response(idle_reader))[0] == 200
    busy_reader, busy_writer = await connect(bound)
    busy_writer.write(get("/slow"))
    await started.wait()
    stopping = asyncio.ensure_future(cm.__aexit__(None, None, None))
    assert await closed(idle_reader)  # nothing was asked on it: closed at once
    with pytest.raises(OSError):
        await connect(bound)  # no longer accepting
    assert not stopping.done()
    release.set()
    status, headers, body = await read_response(busy_reader)
    assert (status, headers["connection"], body) == (200, "close", b"finished\n")
    assert await closed(busy_reader)
    await asyncio.wait_for(stopping, 10)


async def test_draining_aborts_what_is_still_open_after_the_grace_period_and_cancels_its_handler() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    cm = served(HttpServer(routes(stuck=stuck)), grace=0.2)
    bound = await cm.__aenter__()
    reader, writer = await connect(bound)
    writer.write(get("/stuck"))
    await started.wait()
    await asyncio.wait_for(cm.__aexit__(None, None, None), 10)
    assert cancelled.is_set()  # nothing is left running once the server has stopped
    assert await asyncio.wait_for(reader.read(), 10) == b""


async def test_draining_waits_for_an_answer_whose_client_has_already_gone() -> None:
    slow = Gate()
    started, release = slow.started, slow.release

    cm = served(HttpServer(routes(slow=slow)))
    bound = await cm.__aenter__()
    _, writer = await connect(bound)
    writer.write(get("/slow"))
    await started.wait()
    writer.close()
    await writer.wait_closed()
    stopping = asyncio.ensure_future(cm.__aexit__(None, None, None))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    release.set()
    await asyncio.wait_for(stopping, 10)
    assert slow.answered == 1  # e.g. the admission metrics are counted there


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400) | st.lists(st.sampled_from([
    b"GET /echo HTTP/1.1\r\n", b"POST /echo HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Expect: 100-continue\r\n", b"\r\n", b"abc",
    b"3\r\nabc\r\n", b"0\r\n\r\n", b"HTTP/1.0", b"\x00", b" ", b":",
]), max_size=20).map(b"".join))  # fmt: skip
async def test_any_bytes_get_answers_below_500_or_a_close_never_a_hang(data: bytes) -> None:
    async with served(HttpServer(routes(), request_timeout=0.1, idle_timeout=0.1)) as bound:
        reader, writer = await connect(bound)
        writer.write(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):  # a close with our bytes unread is a close too
            received = await asyncio.wait_for(
                reader.read(), 10
            )  # every path ends in a close: by answer or timeout
        for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received):
            assert int(status) < 500, received
        writer.close()


async def test_a_client_that_half_closes_after_asking_still_gets_its_answers() -> None:
    slow = Gate()
    started, release = slow.started, slow.release

    async with served(HttpServer(routes(slow=slow))) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/slow") + get("/echo?two"))
        writer.write_eof()
        await started.wait()
        await asyncio.sleep(0.05)  # the server takes in the EOF while the first answer is being worked out
        release.set()
        assert (await read_response(reader))[2] == b"slow\n"
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"], body) == (200, "close", b"GET /echo q=two body=\n")
        assert await closed(reader)


async def test_a_header_streamed_without_its_line_end_is_cut_off_at_the_limit() -> None:
    async with served(HttpServer(routes(), max_head_bytes=2048)) as bound:
        reader, writer = await connect(bound)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(8):  # httptools hands a header over only at its line end
            writer.write(b"z" * 1024)
        assert (await read_response(reader))[0] == 431
        assert await closed(reader)


async def test_an_interim_100_held_back_behind_an_earlier_answer_is_sent_after_it() -> None:
    slow = Gate()
    release = slow.release

    async with served(HttpServer(routes(slow=slow), request_timeout=0.3)) as bound:
        reader, writer = await connect(bound)
        writer.write(
            get("/slow")
            + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        await asyncio.sleep(
            0.5
        )  # longer than the request timeout: the client is waiting for the 100, not stalling
        release.set()
        assert (await read_response(reader))[2] == b"slow\n"
        assert (await read_response(reader))[0] == 100
        writer.write(b"hello")
        assert (await read_response(reader))[2] == b"POST /echo q= body=hello\n"
        writer.close()


@pytest.mark.parametrize(("version", "expect"), [("1.0", "100-continue"), ("1.1", "100-Continue \t")])
async def test_100_continue_is_for_http_1_1_only_and_reads_the_value_without_padding(
    version: str, expect: str
) -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        head = f"POST /echo HTTP/{version}\r\nHost: x\r\nContent-Length: 2\r\nExpect: {expect}\r\n\r\n"
        writer.write(head.encode())
        if version == "1.1":
            assert (await read_response(reader))[0] == 100
        writer.write(b"ok")
        status, _, body = await read_response(reader)
        assert (status, body) == (200, b"POST /echo q= body=ok\n")
        writer.close()


async def test_trailers_are_not_headers_and_chunked_http_1_0_closes() -> None:
    seen: list[Request] = []

    async def keep(request: Request) -> Response:
        seen.append(request)
        return text(200, "kept")

    async with served(HttpServer(routes(keep=keep))) as bound:
        reader, writer = await connect(bound)
        writer.write(
            b"POST /keep HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nContent-Type: text/evil\r\nX-Trailer: 1\r\n\r\n"
        )
        assert (await read_response(reader))[0] == 200
        assert seen[0].headers["content-type"] == "application/json" and "x-trailer" not in seen[0].headers
        writer.write(
            b"POST /keep HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        assert (await read_response(reader))[1]["connection"] == "close"
        assert await closed(reader)


@pytest.mark.parametrize(("request_bytes", "reason"), [
    (b"GET /echo HTTP/1.1\r\n\r\n", b"no Host header"),
    (b"GET /echo\r\n\r\n", b"HTTP/0.9 is not served"),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", b"not a path or a URL"),
])  # fmt: skip
async def test_requests_http_1_1_does_not_allow_get_400_with_the_reason(
    request_bytes: bytes, reason: bytes
) -> None:
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(request_bytes)
        status, _, body = await read_response(reader)
        assert status == 400 and reason in body, body
        assert await closed(reader)


async def test_a_handler_awaiting_something_cancelled_elsewhere_or_answering_garbage_gets_a_500() -> None:
    async def cancelled(request: Request) -> Response:
        gone: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        gone.cancel()
        return await gone

    async def garbage(request: Request) -> Response:
        return Response(200, b"x", headers=(("X-Name", "\u2603"),))  # not latin-1: no HTTP header carries it

    async def text_body(request: Request) -> Response:
        return Response(200, "not bytes")  # type: ignore[arg-type]

    async with served(HttpServer(routes(cancelled=cancelled, garbage=garbage, text_body=text_body))) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/cancelled") + get("/garbage") + get("/text_body") + get("/echo"))
        assert (await read_response(reader))[0] == 500
        assert (await read_response(reader))[0] == 500
        assert (await read_response(reader))[0] == 500
        assert (await read_response(reader))[0] == 200  # and the connection carries on
        writer.close()


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    async def big(request: Request) -> Response:
        return Response(200, b"b" * (32 * 1024 * 1024))

    server = HttpServer(routes(big=big), write_timeout=0.3)
    async with served(server) as bound:
        _, writer = await connect(bound)
        writer.write(get("/big"))  # and never read
        await wait_for(lambda: bool(server.connections), "the connection")
        await wait_for(
            lambda: not server.connections and not server.workers, "the stalled connection to be dropped"
        )
        writer.close()


async def test_a_closing_connection_whose_client_stops_reading_is_dropped_after_the_close_timeout() -> None:
    async def big(request: Request) -> Response:
        return Response(200, b"b" * (32 * 1024 * 1024))

    server = HttpServer(routes(big=big), close_timeout=0.3)
    async with served(server) as bound:
        _, writer = await connect(bound)
        writer.write(get("/big", "Connection: close"))  # and never read
        await wait_for(lambda: bool(server.connections), "the connection")
        await wait_for(lambda: not server.connections, "the closing connection to be dropped")
        writer.close()


async def test_draining_keeps_the_connection_for_queued_answers_and_closes_after_the_last() -> None:
    slow = Gate()
    started, release = slow.started, slow.release

    cm = served(HttpServer(routes(slow=slow)))
    bound = await cm.__aenter__()
    reader, writer = await connect(bound)
    writer.write(
        get("/slow") + get("/echo?2") + b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nha"
    )
    await started.wait()
    stopping = asyncio.ensure_future(cm.__aexit__(None, None, None))
    await asyncio.sleep(0.05)
    writer.write(b"lf")  # the request still being read when the drain began is read and answered
    release.set()
    first, second, third = [await read_response(reader) for _ in range(3)]
    assert "connection" not in first[1] and "connection" not in second[1]
    assert (third[1]["connection"], third[2]) == ("close", b"POST /echo q= body=half\n")
    assert await closed(reader)
    await asyncio.wait_for(stopping, 10)


async def test_a_client_that_pipelines_past_the_limit_and_half_closes_gets_every_answer() -> None:
    n = MAX_PIPELINED * 8
    async with served(HttpServer(routes())) as bound:
        reader, writer = await connect(bound)
        writer.write(b"".join(get(f"/echo?{i:03d}") for i in range(n)))
        writer.write_eof()
        for i in range(n):
            assert (await read_response(reader))[2] == f"GET /echo q={i:03d} body=\n".encode()
        assert await closed(reader)


async def test_trailers_past_the_limit_get_400_before_they_are_held_in_memory() -> None:
    async with served(HttpServer(routes(), max_head_bytes=2048)) as bound:
        reader, writer = await connect(bound)
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: "
        )
        for _ in range(8):  # a trailer value with no line end
            writer.write(b"z" * 1024)
        status, _, body = await read_response(reader)
        assert status == 400 and b"trailers exceed 2048 bytes" in body
        assert await closed(reader)


async def test_a_client_that_half_closes_and_never_reads_is_dropped_after_the_close_timeout() -> None:
    async def mid(request: Request) -> Response:
        return Response(200, b"m" * 30_000)  # buffered by the transport, below its pause threshold

    server = HttpServer(routes(mid=mid), close_timeout=0.3)
    async with served(server) as bound:
        _, writer = await connect(bound)
        writer.write(get("/mid"))
        await wait_for(lambda: bool(server.connections), "the connection")
        await wait_for(lambda: not server.workers, "the answer to be written")
        writer.write_eof()  # and never read
        await wait_for(lambda: not server.connections, "the half-closed connection to be dropped")
        writer.close()


async def test_a_half_close_mid_request_during_a_slow_answer_leaves_no_stale_timeout() -> None:
    slow = Gate()
    release = slow.release

    async with served(HttpServer(routes(slow=slow), request_timeout=0.2)) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/slow") + b"GET /echo HTTP/1.1\r\nHo")  # a second request cut short by the EOF
        writer.write_eof()
        await asyncio.sleep(0.5)  # past the cut-short request's timeout
        release.set()
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"], body) == (200, "close", b"slow\n")
        assert await closed(reader)  # and no 408 after it


async def test_requests_not_yet_begun_are_dropped_when_the_client_goes() -> None:
    slow = Gate()
    started, release = slow.started, slow.release
    ran: list[str] = []

    async def count(request: Request) -> Response:
        ran.append(request.query)
        return text(200, "counted")

    server = HttpServer(routes(slow=slow, count=count))
    async with served(server) as bound:
        _, writer = await connect(bound)
        writer.write(get("/slow") + get("/count?1") + get("/count?2"))
        await started.wait()
        # Reset, not a half-close (after which the client could still read its answers).
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()
        await wait_for(lambda: not server.connections, "the server to see the client go")
        release.set()
        await wait_for(lambda: not server.workers, "the answer in progress to finish")
    assert ran == []


async def test_a_100_owed_while_an_answer_waits_for_the_client_to_read_is_sent_after_it() -> None:
    async def big(request: Request) -> Response:
        return Response(200, b"b" * (8 * 1024 * 1024))

    server = HttpServer(routes(big=big))
    async with served(server) as bound:
        reader, writer = await connect(bound)
        writer.write(get("/big"))
        await wait_for(
            lambda: any(c._writable is not None for c in server.connections), "the answer to stall"
        )
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        await wait_for(lambda: any(c._continue_owed for c in server.connections), "the 100 to be owed")
        status, _, body = await read_response(reader)
        assert status == 200 and len(body) == 8 * 1024 * 1024
        assert (await read_response(reader))[0] == 100
        writer.write(b"ok")
        assert (await read_response(reader))[2] == b"POST /echo q= body=ok\n"
        writer.close()


async def test_a_request_held_back_behind_a_full_pipeline_gets_its_full_time_once_read() -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0.6)  # the handler's own work, twice the request timeout
        return text(200, "slow")

    async with served(HttpServer(routes(slow=slow), request_timeout=0.3)) as bound:
        reader, writer = await connect(bound)
        last = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlast"
        writer.write(get("/slow") + b"".join(get("/echo") for _ in range(MAX_PIPELINED - 1)) + last[:20])
        await asyncio.sleep(0.1)  # the client finishes its request well within the timeout
        writer.write(last[20:])
        statuses = [(await read_response(reader))[0] for _ in range(MAX_PIPELINED + 1)]
        assert statuses == [200] * (MAX_PIPELINED + 1)
        writer.close()


async def test_a_connection_whose_tls_handshake_ends_during_the_drain_is_closed_at_once(
    serving_files: tuple[Any, Any, Any],
) -> None:
    from tests.webhook.conftest import SERVER_NAME, client_context

    ca, cert, key = serving_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    slow = Gate()
    started, release = slow.started, slow.release

    server = HttpServer(routes(slow=slow))
    cm = served(server, ssl_context=server_ctx, grace=10.0)
    bound = await cm.__aenter__()
    client_ctx = client_context(ca.cert_pem)
    busy_reader, busy_writer = await asyncio.open_connection(
        *bound, ssl=client_ctx, server_hostname=SERVER_NAME
    )
    busy_writer.write(get("/slow"))
    await started.wait()
    raw = socket.create_connection(bound)  # TCP only: its TLS handshake starts after the drain has begun
    await asyncio.sleep(0.05)  # the server accepts it
    stopping = asyncio.ensure_future(cm.__aexit__(None, None, None))
    await asyncio.sleep(0.05)
    raw.setblocking(False)
    late_reader, _ = await asyncio.open_connection(sock=raw, ssl=client_ctx, server_hostname=SERVER_NAME)
    assert await closed(late_reader)
    release.set()
    assert (await read_response(busy_reader))[2] == b"slow\n"
    await asyncio.wait_for(stopping, 5)  # well within the grace period: nothing was left to wait for


async def test_draining_answers_every_request_read_after_it_began_and_closes_after_the_last() -> None:
    slow = Gate()
    cm = served(HttpServer(routes(slow=slow)))
    bound = await cm.__aenter__()
    reader, writer = await connect(bound)
    writer.write(get("/slow") + b"GET /echo?1 HTTP/1.1\r\nHo")
    await slow.started.wait()
    stopping = asyncio.ensure_future(cm.__aexit__(None, None, None))
    await asyncio.sleep(0.05)
    writer.write(b"st: x\r\n\r\n" + get("/echo?2"))  # the rest of one request, and one more behind it
    await asyncio.sleep(0.05)
    slow.release.set()
    answers = [await read_response(reader) for _ in range(3)]
    assert [a[2] for a in answers] == [b"slow\n", b"GET /echo q=1 body=\n", b"GET /echo q=2 body=\n"]
    assert "connection" not in answers[1][1] and answers[2][1]["connection"] == "close"
    assert await closed(reader)
    await asyncio.wait_for(stopping, 10)
