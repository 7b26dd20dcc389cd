"""The admin server's HTTP contract: each route, its status codes, and who may ask for shutdown.

Served for real on 127.0.0.1 port 0 and called with an aiohttp client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import AdminServer, is_loopback_peer


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
    built: list[str] = []

    def section() -> dict[str, object]:
        built.append("endpoints")
        return {"endpoints": [{"address": "10.0.0.1", "lazy": lambda: "nested too"}]}

    served.probe.state = {"routes": section}
    assert built == []
    async with served.client.get(served.debug_url()) as response:
        assert response.status == 200
        assert await response.json() == {"routes": {"endpoints": [{"address": "10.0.0.1", "lazy": "nested too"}]}}
    assert built == ["endpoints"]


async def test_a_section_failing_part_way_truncates_the_document_and_is_logged(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> object:
        raise LookupError("endpoint vanished")

    # Enough before the broken section that the first chunk (and the 200) has gone out when it fails.
    served.probe.state = {"big": [{"n": i, "s": "x" * 40} for i in range(60_000)], "broken": broken}
    with caplog.at_level(logging.ERROR, logger="sidecar.admin"):
        async with served.client.get(served.debug_url()) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert "debug state failed part way" in caplog.text
    assert "LookupError: endpoint vanished" in caplog.text


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
