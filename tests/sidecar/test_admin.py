"""The admin server's HTTP contract: each route, its status codes, and who may ask for shutdown.

Served for real on 127.0.0.1 port 0 and called with an aiohttp client; HTTP/1.1's own edges (keep-alive, HEAD,
malformed and oversize requests, timeouts, slow readers) with raw sockets and h11 as the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial

import aiohttp
import h11
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import AdminServer, HttpLimits, accepts_gzip, is_loopback_peer


@dataclass
class Probe:
    """The callbacks the server is given, recording how it used them."""

    is_ready: bool = False
    state: Mapping[str, object] = field(default_factory=dict)
    debug_error: Exception | None = None
    shutdowns: int = 0

    def ready(self) -> bool:
        return self.is_ready

    def debug(self) -> Mapping[str, object]:
        if self.debug_error is not None:
            raise self.debug_error
        return self.state

    def shutdown(self) -> None:
        self.shutdowns += 1


@dataclass
class Served:
    probe: Probe
    registry: CollectorRegistry
    server: AdminServer
    client: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.port}{path}"

    def debug_url(self) -> str:
        return f"http://127.0.0.1:{self.server.debug_port}/debug"


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    probe = Probe()
    registry = CollectorRegistry()
    server = AdminServer(registry=registry, ready=probe.ready, debug=probe.debug, shutdown=probe.shutdown)
    await server.start("127.0.0.1", 0)
    await server.start_debug("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as client:
            yield Served(probe, registry, server, client)
    finally:
        await server.close()


async def test_metrics_serves_the_registry_in_prometheus_text_format(served: Served) -> None:
    Counter("demo_events", "Events.", ["kind"], registry=served.registry).labels("x").inc(3)

    async with served.client.get(served.url("/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()

    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["demo_events_total"].labels == {"kind": "x"}
    assert samples["demo_events_total"].value == 3.0


async def test_metrics_answers_openmetrics_when_the_scraper_asks_for_it(served: Served) -> None:
    Counter("demo_events", "Events.", registry=served.registry).inc()
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}

    async with served.client.get(served.url("/metrics"), headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await response.text()

    assert "demo_events_total 1.0" in text
    assert text.endswith("# EOF\n")


async def test_metrics_is_gzipped_when_the_scraper_accepts_gzip(served: Served) -> None:
    Counter("demo_events", "Events.", registry=served.registry).inc()

    async with served.client.get(served.url("/metrics"), headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert "demo_events_total 1.0" in await response.text()


async def test_ready_answers_503_until_the_proxy_is_ready_then_200(served: Served) -> None:
    async with served.client.get(served.url("/ready")) as response:
        assert (response.status, await response.text()) == (503, "not ready")

    served.probe.is_ready = True

    async with served.client.get(served.url("/ready")) as response:
        assert (response.status, await response.text()) == (200, "ready")


async def test_live_answers_200_even_when_not_ready(served: Served) -> None:
    async with served.client.get(served.url("/live")) as response:
        assert response.status == 200


async def test_debug_serves_the_debug_state_as_json(served: Served) -> None:
    served.probe.state = {"services": {"arith.default": ["10.0.0.1:15443"]}, "ready": True}

    async with served.client.get(served.debug_url()) as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = json.loads(await response.text())

    assert body == {"services": {"arith.default": ["10.0.0.1:15443"]}, "ready": True}


async def test_debug_renders_values_json_cannot_encode_by_their_str(served: Served) -> None:
    @dataclass(frozen=True)
    class Key:
        name: str

        def __str__(self) -> str:
            return f"key:{self.name}"

    served.probe.state = {"service": Key("arith")}

    async with served.client.get(served.debug_url()) as response:
        assert json.loads(await response.text()) == {"service": "key:arith"}


async def test_debug_answers_500_naming_the_error_when_the_state_cannot_be_read(served: Served) -> None:
    served.probe.debug_error = LookupError("catalog gone")

    async with served.client.get(served.debug_url()) as response:
        assert response.status == 500
        assert "LookupError: catalog gone" in await response.text()


async def test_debug_builds_a_callable_section_when_it_reaches_it(served: Served) -> None:
    order: list[str] = []

    def section() -> dict[str, object]:
        order.append("routes")
        return {"endpoints": [{"address": "10.0.0.1", "lazy": lambda: "nested too"}]}

    def earlier() -> str:
        order.append("pod")
        return "pod-0"

    served.probe.state = {"pod": earlier, "routes": section}
    async with served.client.get(served.debug_url()) as response:
        assert response.status == 200
        assert await response.json() == {
            "pod": "pod-0",
            "routes": {"endpoints": [{"address": "10.0.0.1", "lazy": "nested too"}]},
        }
    assert order == ["pod", "routes"]  # each built once, in the document's order, as the encoder reached it


@pytest.mark.parametrize("before", [0, 60_000], ids=["in-the-first-chunk", "after-the-first-chunk"])
async def test_a_section_that_fails_shows_its_error_in_place_and_is_logged(
    served: Served, caplog: pytest.LogCaptureFixture, before: int
) -> None:
    def broken() -> object:
        raise LookupError("endpoint vanished")

    # 60,000 entries first: the first chunk (and the 200) has gone out when the broken section is reached.
    served.probe.state = {"big": [{"n": i} for i in range(before)], "broken": broken, "after": "still here"}
    with caplog.at_level(logging.ERROR, logger="sidecar.admin"):
        async with served.client.get(served.debug_url()) as response:
            assert response.status == 200
            doc = await response.json()
    assert doc["broken"] == {"error": "LookupError: endpoint vanished"}
    assert doc["after"] == "still here" and len(doc["big"]) == before
    assert "debug section failed" in caplog.text and "LookupError: endpoint vanished" in caplog.text


async def test_a_document_that_cannot_be_encoded_part_way_is_truncated_and_logged(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    # A mapping with a key JSON cannot hold, after enough that the 200 has gone out: the reader gets a body
    # without its last chunk (invalid, and seen as incomplete), the log says why.
    served.probe.state = {"big": [{"n": i, "s": "x" * 40} for i in range(60_000)], "bad": {("a", 1): 2}}
    with caplog.at_level(logging.ERROR, logger="sidecar.admin"):
        async with served.client.get(served.debug_url()) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert "debug state failed part way" in caplog.text
    assert "TypeError" in caplog.text


async def test_shutdown_from_loopback_is_accepted_and_calls_the_callback(served: Served) -> None:
    async with served.client.post(served.url("/shutdown")) as response:
        assert response.status == 202

    assert served.probe.shutdowns == 1


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.5", False),
        ("0.0.0.0", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("fe80::1%eth0", False),
        ("localhost", False),
        ("", False),
        (None, False),
    ],
)
def test_shutdown_is_allowed_only_for_a_loopback_peer_address(peer: str | None, allowed: bool) -> None:
    assert is_loopback_peer(peer) is allowed


async def test_unknown_path_answers_404(served: Served) -> None:
    async with served.client.get(served.url("/nope")) as response:
        assert response.status == 404


@pytest.mark.parametrize(("method", "path"), [("GET", "/shutdown"), ("POST", "/metrics"), ("DELETE", "/ready")])
async def test_wrong_method_answers_405(served: Served, method: str, path: str) -> None:
    async with served.client.request(method, served.url(path)) as response:
        assert response.status == 405
    assert served.probe.shutdowns == 0


async def test_start_raises_oserror_when_the_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = AdminServer(registry=CollectorRegistry(), ready=lambda: True, debug=dict, shutdown=lambda: None)

        with pytest.raises(OSError):
            await server.start("127.0.0.1", taken.getsockname()[1])


async def test_close_stops_serving(served: Served) -> None:
    url = served.url("/live")

    await served.server.close()

    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as fresh, fresh.get(url):
            pass


class _AccessLines(logging.Handler):
    """Collects log lines and signals when the /debug access line arrives."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []
        self.debug_logged = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        if "path=/debug" in line:
            self.debug_logged.set()


async def test_scrapes_and_probes_are_not_access_logged_but_operator_requests_are(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.admin")
    lines = _AccessLines()
    logging.getLogger("sidecar.admin").addHandler(lines)
    try:
        for path in ("/metrics", "/ready", "/live", "/debug"):  # /debug here: the 404 saying where it is
            async with served.client.get(served.url(path)) as response:
                await response.read()
        # The access line is written after the response is sent. Requests on one keep-alive connection
        # are handled in order, so once the /debug line is in, any line for the earlier ones would be too.
        await asyncio.wait_for(lines.debug_logged.wait(), timeout=5.0)
        lines.debug_logged.clear()
        async with served.client.get(served.debug_url()) as response:
            await response.read()
        await asyncio.wait_for(lines.debug_logged.wait(), timeout=5.0)
    finally:
        logging.getLogger("sidecar.admin").removeHandler(lines)

    access = [line for line in lines.lines if line.startswith("admin request")]
    assert len(access) == 2
    assert access[0].startswith("admin request method=GET path=/debug status=404 peer=127.0.0.1")
    assert access[1].startswith("admin request method=GET path=/debug status=200 peer=127.0.0.1")


async def test_debug_is_not_served_on_the_admin_listener_which_says_where_it_is(served: Served) -> None:
    served.probe.state = {"services": {"arith.default": ["10.0.0.1:15443"]}}
    async with served.client.get(served.url("/debug")) as response:
        assert response.status == 404
        text = await response.text()
    assert "10.0.0.1" not in text
    assert f"http://127.0.0.1:{served.server.debug_port}/debug" in text and "port-forward" in text


@pytest.mark.parametrize("address", ["0.0.0.0:15091", "10.0.0.7:15091", "[::]:15091", "localhost:15091"])
def test_the_debug_listener_must_be_a_loopback_address(address: str) -> None:
    from sidecar import config as config_mod

    base = {"KUBERPC_INBOUND_ADDR": "off", "KUBERPC_TLS_CERT": "c", "KUBERPC_TLS_KEY": "k", "KUBERPC_TRUST_ANCHORS": "a"}
    with pytest.raises(config_mod.ConfigError, match="KUBERPC_DEBUG_ADDR: .* is not a loopback address"):
        config_mod.load({**base, "KUBERPC_DEBUG_ADDR": address})
    assert config_mod.load(base).debug == config_mod.Address("127.0.0.1", 15091)
    assert config_mod.load({**base, "KUBERPC_DEBUG_ADDR": "off"}).debug is None


# ---- HTTP/1.1 itself: what h11 and the connection glue promise, on raw sockets -----------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader, conn: h11.Connection, *, chunk: int = 65536) -> Answer:
    """The next complete response on `conn` (a client-side h11 connection fed from `reader`)."""
    head: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(chunk))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            headers = {k.decode(): v.decode() for k, v in head.headers}
            return Answer(head.status_code, headers, bytes(body))
        else:
            raise AssertionError(f"unexpected {event!r} before the end of the response")


async def raw(port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    return reader, writer


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    out = bytearray()
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            out += chunk
    except ConnectionResetError:
        pass
    return bytes(out)


async def test_head_answers_what_get_would_without_the_body(served: Served) -> None:
    reader, writer = await raw(served.server.port, b"HEAD /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    reply = await until_closed(reader)
    writer.close()

    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 4\r\n" in reply.lower()
    assert reply.endswith(b"\r\n\r\n")  # and no "live" after the head


async def test_one_kept_alive_connection_answers_requests_in_turn(served: Served) -> None:
    served.probe.is_ready = True
    Counter("demo_events", "Events.", registry=served.registry).inc()
    client = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.server.port)
    answers = []
    for path in ("/live", "/ready", "/metrics"):
        writer.write(client.send(h11.Request(method="GET", target=path, headers=[("host", "x")])))
        writer.write(client.send(h11.EndOfMessage()))
        answers.append(await read_answer(reader, client))
        client.start_next_cycle()
    writer.close()

    assert [(a.status, a.body[:5]) for a in answers] == [(200, b"live"), (200, b"ready"), (200, b"# HEL")]


async def test_pipelined_requests_are_answered_in_order(served: Served) -> None:
    reader, writer = await raw(
        served.server.port,
        b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\nGET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    reply = await until_closed(reader)
    writer.close()

    assert reply.startswith(b"HTTP/1.1 503 ")
    assert reply.endswith(b"\r\n\r\nlive")


async def test_a_malformed_request_answers_400_and_the_connection_is_closed(served: Served) -> None:
    reader, writer = await raw(served.server.port, b"GET /live HTTP/1.1\r\nHost x\r\n\r\n")
    reply = await until_closed(reader)
    writer.close()

    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_a_request_head_over_the_limit_is_refused_with_431_and_closed(served: Served) -> None:
    huge = b"x-filler: " + b"a" * (HttpLimits().max_head + 1) + b"\r\n"
    reader, writer = await raw(served.server.port, b"GET /live HTTP/1.1\r\nHost: x\r\n" + huge)
    reply = await until_closed(reader)
    writer.close()

    assert reply.startswith(b"HTTP/1.1 431 ")


async def test_a_request_body_over_the_limit_is_refused_with_413_and_closed(served: Served) -> None:
    size = HttpLimits().max_body + 1
    head = f"POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
    reader, writer = await raw(served.server.port, head + b"z" * size)
    reply = await until_closed(reader)
    writer.close()

    assert reply.startswith(b"HTTP/1.1 413 ")
    assert served.probe.shutdowns == 0


async def test_a_client_expecting_100_continue_is_told_to_send_its_body(served: Served) -> None:
    head = b"POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    reader, writer = await raw(served.server.port, head)
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 \r\n\r\n"
    writer.write(b"{}")
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/shutdown", headers=[("host", "x"), ("content-length", "2")]))
    client.send(h11.Data(data=b"{}"))
    client.send(h11.EndOfMessage())
    answer = await read_answer(reader, client)
    writer.close()

    assert (answer.status, served.probe.shutdowns) == (202, 1)


@pytest.fixture
async def impatient() -> AsyncIterator[AdminServer]:
    """A server whose connections time out within a test's patience."""
    server = AdminServer(
        registry=CollectorRegistry(), ready=lambda: True, debug=dict, shutdown=lambda: None,
        limits=HttpLimits(keepalive_s=0.2, request_s=0.3, write_s=0.3),
    )  # fmt: skip
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(impatient: AdminServer) -> None:
    reader, writer = await raw(impatient.port, b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = await until_closed(reader)  # the answer, then nothing more: the server closes after keepalive_s
    writer.close()

    assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b"live")


async def test_a_request_trickled_in_is_dropped_after_the_request_timeout(impatient: AdminServer) -> None:
    reader, writer = await raw(impatient.port, b"GET /live HTTP/1.1\r\n")

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # 5 s at this pace: far beyond request_s
                writer.write(b"x-a: b\r\n")
                await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        assert await until_closed(reader) == b""
    finally:
        trickling.cancel()
        writer.close()


async def test_a_slow_reader_of_debug_holds_the_document_back_instead_of_the_server_buffering_it(
    served: Served,
) -> None:
    built: list[int] = []

    def section(i: int) -> str:
        built.append(i)
        return "x" * 10_000

    sections = 2000  # 20 MB in all: far more than a socket's buffers hold
    served.probe.state = {f"s{i}": partial(section, i) for i in range(sections)}
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: the window stays small
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.server.debug_port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(b"GET /debug HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")

    # Nothing more is read: building must stop once the socket, the server's write buffer and one chunk are full.
    last = -1
    while len(built) != last:
        last = len(built)
        await asyncio.sleep(0.2)
    assert 0 < last < sections // 2, f"{last} of {sections} sections built while the reader took nothing"

    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/debug", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
    answer = await asyncio.wait_for(read_answer(reader, client, chunk=1 << 20), 60)
    writer.close()
    assert len(built) == sections
    assert json.loads(answer.body)["s7"] == "x" * 10_000


class _SilentFeed:
    """A tap no call ever finishes on."""

    dropped = 0

    async def next(self) -> Mapping[str, object]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_close_ends_open_connections_promptly_idle_or_mid_stream(caplog: pytest.LogCaptureFixture) -> None:
    subscribed: list[bool] = []
    listening = asyncio.Event()

    @contextlib.contextmanager
    def tap() -> Iterator[_SilentFeed]:
        subscribed.append(True)
        listening.set()
        try:
            yield _SilentFeed()
        finally:
            subscribed.append(False)

    server = AdminServer(registry=CollectorRegistry(), ready=lambda: True, debug=dict, shutdown=lambda: None, tap=tap)
    await server.start("127.0.0.1", 0)
    await server.start_debug("127.0.0.1", 0)
    idle_reader, idle = await raw(server.port, b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(idle_reader.readuntil(b"live"), 5)).startswith(b"HTTP/1.1 200 ")
    tap_reader, tapping = await raw(server.debug_port, b"GET /tap?limit=5&seconds=60 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(tap_reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
    await asyncio.wait_for(listening.wait(), 5)

    await asyncio.wait_for(server.close(), 1.0)  # the proxy's shutdown waits on this: not the tap's 60 s

    assert await until_closed(idle_reader) == b""
    assert b'"end"' not in await until_closed(tap_reader)  # cut off, not a tap that ended
    assert subscribed == [True, False]
    idle.close()
    tapping.close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # a shutdown, not an error


def _non_loopback_address() -> str | None:
    """This host's address on its default route, if it has one (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # TEST-NET-2: routed, never reached
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if is_loopback_peer(address) else address


async def test_the_peer_is_the_transports_address_never_a_header() -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this host has no address besides loopback")
    probe = Probe()
    server = AdminServer(registry=CollectorRegistry(), ready=probe.ready, debug=probe.debug, shutdown=probe.shutdown)
    await server.start("0.0.0.0", 0)
    try:
        forged = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0))) as remote:
            async with remote.post(f"http://{address}:{server.port}/shutdown", headers=forged) as response:
                assert response.status == 403
        async with (
            aiohttp.ClientSession() as local,
            local.post(f"http://127.0.0.1:{server.port}/shutdown", headers={"X-Forwarded-For": "10.0.0.1"}) as response,
        ):
            assert response.status == 202
    finally:
        await server.close()
    assert probe.shutdowns == 1


async def test_an_ipv6_loopback_peer_may_ask_for_shutdown() -> None:
    probe = Probe()
    server = AdminServer(registry=CollectorRegistry(), ready=probe.ready, debug=probe.debug, shutdown=probe.shutdown)
    try:
        await server.start("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        async with aiohttp.ClientSession() as client, client.post(f"http://[::1]:{server.port}/shutdown") as response:
            assert response.status == 202
    finally:
        await server.close()
    assert probe.shutdowns == 1


@pytest.mark.parametrize(
    ("header", "gzip"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("deflate, gzip;q=0.5", True),
        ("x-gzip", True),
        ("GZIP", True),
        ("gzip;q=0", False),
        ("gzip; q=0.000", False),
        ("deflate", False),
        ("identity", False),
        ("*", False),
        ("", False),
    ],
)
def test_metrics_are_gzipped_only_when_the_scraper_admits_gzip(header: str, gzip: bool) -> None:
    assert accepts_gzip(header) is gzip
