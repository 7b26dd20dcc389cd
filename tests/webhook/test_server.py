"""The webhook over real HTTPS on loopback: /mutate, /healthz, /metrics, errors, and certificate reload."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import pki
from sidecar.pki import KeyPair
from webhook.install import service_dns_names

Review = Callable[[str], dict[str, Any]]
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"


async def answer(server: Any, body: Any) -> dict[str, Any]:
    resp = await server.post("/mutate?timeout=10s", body)
    assert resp.status == 200, await resp.text()
    out: dict[str, Any] = (await resp.json())["response"]
    return out


async def metric_samples(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await server.get("/metrics")
    assert resp.status == 200
    out = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_mutate_with_the_api_servers_query_string_answers_with_a_patch(live_server: Any, review: Review) -> None:
    r = review("deployment-pod-review")
    resp = await answer(live_server, r)
    assert resp["uid"] == r["request"]["uid"] and resp["allowed"] is True
    pod = jsonpatch.apply_patch(r["request"]["object"], json.loads(base64.b64decode(resp["patch"])))
    assert pod["spec"]["initContainers"][0]["name"] == "kuberpc-proxy"


async def test_healthz_answers_ok(live_server: Any) -> None:
    resp = await live_server.get("/healthz")
    assert (resp.status, await resp.text()) == (200, "ok\n")


async def test_metrics_count_each_result_and_time_every_answer(live_server: Any, review: Review) -> None:
    await answer(live_server, review("deployment-pod-review"))  # injected
    skipped = review("deployment-pod-review")
    skipped["request"]["object"]["metadata"]["annotations"]["kuberpc.io/inject"] = "disabled"
    await answer(live_server, skipped)
    denied = review("deployment-pod-review")
    denied["request"]["object"]["metadata"]["annotations"]["kuberpc.io/app-port"] = "x"
    await answer(live_server, denied)
    assert (await live_server.post("/mutate", b"{")).status == 400
    samples = await metric_samples(live_server)
    for result in ("injected", "skipped", "denied", "error"):
        assert samples[("kuberpc_webhook_admissions_total", (("result", result),))] == 1.0
    assert samples[("kuberpc_webhook_admission_duration_seconds_count", ())] == 4.0


async def test_a_malformed_review_gets_400_with_the_reason(live_server: Any) -> None:
    resp = await live_server.post("/mutate", {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"object": {}}})
    assert resp.status == 400
    assert "request.uid is missing" in await resp.text()


async def test_a_denial_is_an_ordinary_answer_with_allowed_false(live_server: Any, review: Review) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/upstreams"] = "arith:1=15090"
    resp = await answer(live_server, r)
    assert resp["allowed"] is False and "kuberpc.io/upstreams" in resp["status"]["message"]


async def test_a_non_pod_object_is_allowed_untouched(live_server: Any, review: Review) -> None:
    r = review("deployment-pod-review")
    r["request"]["kind"] = {"group": "", "version": "v1", "kind": "Service"}
    r["request"]["object"] = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}
    assert await answer(live_server, r) == {"uid": r["request"]["uid"], "allowed": True}


async def test_namespace_labels_are_read_only_when_the_pod_does_not_decide(live_server: Any, review: Review) -> None:
    live_server.namespaces.labels["meshed"] = {"kuberpc.io/inject": "enabled"}
    assert "patch" in await answer(live_server, review("bare-pod-review"))
    assert "patch" in await answer(live_server, review("deployment-pod-review"))
    assert live_server.namespaces.lookups == ["meshed"]


async def test_an_unreadable_namespace_gets_503_so_the_failure_policy_decides(live_server: Any, review: Review) -> None:
    live_server.namespaces.broken = True
    resp = await live_server.post("/mutate", review("bare-pod-review"))
    assert resp.status == 503 and "HTTP 500" in await resp.text()
    assert "patch" in await answer(live_server, review("deployment-pod-review"))


async def test_an_unexpected_failure_is_a_500_counted_as_an_error(live_server: Any, review: Review) -> None:
    live_server.namespaces.crash = True
    resp = await live_server.post("/mutate", review("bare-pod-review"))
    assert (resp.status, await resp.text()) == (500, "internal error\n")
    samples = await metric_samples(live_server)
    assert samples[("kuberpc_webhook_admissions_total", (("result", "error"),))] == 1.0


async def test_get_on_mutate_is_405_not_a_server_error(live_server: Any) -> None:
    assert (await live_server.get("/mutate")).status == 405


async def _served_ca(base: str, trust: bytes) -> bool:
    """Whether a fresh TLS connection verifies with `trust` as the only CA."""
    ctx = ssl.create_default_context(cadata=trust.decode())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        try:
            async with s.get(base + "/healthz", ssl=ctx, server_hostname=SERVER_NAME) as resp:
                return resp.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False


async def test_a_rotated_certificate_is_served_to_the_next_connection(
    live_server: Any, serving_files: tuple[KeyPair, Path, Path], tmp_path: Path
) -> None:
    import datetime as dt

    old_ca, cert, key = serving_files
    assert await _served_ca(live_server.base, old_ca.cert_pem)
    now = dt.datetime.now(dt.UTC)
    new_ca = pki.create_ca(trust_domain=None, common_name="rotated CA", now=now)
    pair = pki.issue_serving(new_ca, service_dns_names(), now=now)
    # Write aside and rename, as the kubelet's atomic Secret update does.
    (tmp_path / "new.crt").write_bytes(pair.cert_pem)
    (tmp_path / "new.key").write_bytes(pair.key_pem)
    (tmp_path / "new.key").replace(key)
    (tmp_path / "new.crt").replace(cert)
    assert await _served_ca(live_server.base, new_ca.cert_pem)
    assert not await _served_ca(live_server.base, old_ca.cert_pem)


async def test_a_half_written_rotation_keeps_the_old_certificate(
    live_server: Any, serving_files: tuple[KeyPair, Path, Path]
) -> None:
    old_ca, cert, _ = serving_files
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
    assert await _served_ca(live_server.base, old_ca.cert_pem)


@pytest.mark.parametrize("path", ["/", "/mutate/extra", "/metrics/x"])
async def test_unknown_paths_are_404(live_server: Any, path: str) -> None:
    assert (await live_server.get(path)).status == 404


async def test_reinvocation_of_an_injected_pod_needs_no_namespace_lookup(live_server: Any, review: Review) -> None:
    r = review("bare-pod-review")
    r["request"]["object"]["metadata"]["labels"] = {"kuberpc.io/injected": "true"}
    live_server.namespaces.broken = True
    resp = await answer(live_server, r)
    assert "patch" not in resp and live_server.namespaces.lookups == []


def _get_healthz(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> tuple[bool, ssl.SSLSession | None]:
    """GET /healthz on a new connection offering `session`; (whether it was resumed, the session to offer next)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, ctx.wrap_socket(
        raw, server_hostname=SERVER_NAME, session=session
    ) as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):  # reading past the handshake also takes in the session ticket
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        return bool(tls.session_reused), tls.session


async def test_a_client_offering_its_last_tls_session_resumes_it(live_server: Any) -> None:
    import asyncio

    port = int(live_server.base.rpartition(":")[2])
    ctx = live_server.client_ssl
    reused, session = await asyncio.to_thread(_get_healthz, port, ctx, None)
    assert not reused and session is not None
    reused, _ = await asyncio.to_thread(_get_healthz, port, ctx, session)
    assert reused


async def test_a_pod_past_one_mebibyte_is_answered(live_server: Any, review: Review) -> None:
    """A Pod may approach etcd's 1.5 MiB object limit (large annotations): the webhook reads up to 4 MiB."""
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["example.com/blob"] = "x" * (1536 * 1024)
    resp = await answer(live_server, r)
    assert resp["uid"] == r["request"]["uid"] and "patch" in resp


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_past_the_limit_is_413_whether_or_not_it_declares_its_length(
    live_server: Any, chunked: bool
) -> None:
    from webhook.server import MAX_BODY_BYTES

    body = b"x" * (MAX_BODY_BYTES + 1)

    async def chunks() -> Any:  # an async generator body is sent chunked, with no Content-Length
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    resp = await live_server.post("/mutate", chunks() if chunked else body)
    assert resp.status == 413


async def test_head_on_healthz_answers_without_a_body(live_server: Any) -> None:
    resp = await live_server.session.head(
        live_server.base + "/healthz", ssl=live_server.client_ssl, server_hostname=SERVER_NAME
    )
    assert resp.status == 200 and await resp.read() == b""


# ---- HTTP/1.1 as the API server sees it (served by uvicorn) ------------------------------------------------


async def raw_exchange(server: Any, request: bytes) -> bytes:
    """Send raw bytes on a fresh TLS connection and read until the server closes it (bounded)."""
    import asyncio

    host, port = server.base.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=server.client_ssl, server_hostname=SERVER_NAME)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_one_kept_alive_connection_answers_request_after_request(live_server: Any, review: Review) -> None:
    import asyncio

    host, port = live_server.base.removeprefix("https://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=live_server.client_ssl, server_hostname=SERVER_NAME)
    try:
        for _ in range(3):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
            assert await reader.readexactly(3) == b"ok\n"
    finally:
        writer.close()


async def test_headers_past_the_limit_get_431_and_a_close(live_server: Any) -> None:
    from webhook.server import MAX_HEAD_BYTES

    filler = b"".join(b"x-filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 2))
    answer = await raw_exchange(live_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431")


async def test_one_endless_header_line_gets_431_without_being_held_whole(live_server: Any) -> None:
    from webhook.server import MAX_HEAD_BYTES

    answer = await raw_exchange(live_server, b"GET /healthz HTTP/1.1\r\nx-endless: " + b"e" * (2 * MAX_HEAD_BYTES))
    assert answer.startswith(b"HTTP/1.1 431")


async def test_an_unparseable_request_gets_400_with_the_reason(live_server: Any) -> None:
    answer = await raw_exchange(live_server, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"Invalid HTTP request" in answer


async def test_get_on_mutate_names_the_allowed_methods(live_server: Any) -> None:
    resp = await live_server.get("/mutate")
    assert (resp.status, resp.headers["Allow"]) == (405, "POST")


async def test_draining_finishes_the_answer_in_flight_and_takes_no_new_connection(
    serving_files: tuple[KeyPair, Path, Path], native_cfg: Any, review: Review
) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry

    from tests.webhook.conftest import FakeNamespaces, client_context
    from webhook.metrics import WebhookMetrics
    from webhook.server import CertReloader, create_app, serving

    ca, cert, key = serving_files
    namespaces = FakeNamespaces(entered=asyncio.Event(), release=asyncio.Event())
    app = create_app(cfg=native_cfg, metrics=WebhookMetrics(CollectorRegistry()), namespace_labels=namespaces)
    ctx = client_context(ca.cert_pem)
    body = json.dumps(review("bare-pod-review")).encode()
    stop = asyncio.Event()

    async def serve(bound: asyncio.Future[int]) -> None:
        async with serving(app, host="127.0.0.1", port=0, ssl_context=CertReloader(str(cert), str(key)).context) as (_, port):
            bound.set_result(port)
            await stop.wait()

    bound: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(bound))
    port = await bound
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=SERVER_NAME)
    writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await asyncio.wait_for(namespaces.entered.wait(), 10)  # the answer is in flight
    stop.set()  # the drain begins
    for _ in range(200):  # bounded poll (10 s): the listener closes first, while the answer is still owed
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            break
        w.close()
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the listener still accepts connections 10 s into the drain")
    assert not server.done()
    namespaces.release.set()
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"uid"' in answer
    await asyncio.wait_for(server, 15)


# ---- clients that stall: every request has REQUEST_TIMEOUT_S from its first byte to its last ----------------

STALL_TIMEOUT_S = 0.3  # the request timeout of the server below (default 30 s)
SILENCE_TIMEOUT_S = 2.0  # its idle timeout (default 75 s), also its keep-alive wait after an answer


@pytest.fixture
async def impatient_server(serving_files: tuple[KeyPair, Path, Path], native_cfg: Any) -> Any:
    """The webhook over TLS with short request and idle timeouts; yields an opener of raw TLS connections to it."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from tests.webhook.conftest import FakeNamespaces, client_context
    from webhook.metrics import WebhookMetrics
    from webhook.server import CertReloader, create_app, serving

    ca, cert, key = serving_files
    app = create_app(cfg=native_cfg, metrics=WebhookMetrics(CollectorRegistry()), namespace_labels=FakeNamespaces())
    ctx = client_context(ca.cert_pem)
    reloader = CertReloader(str(cert), str(key))
    async with serving(
        app,
        host="127.0.0.1",
        port=0,
        ssl_context=reloader.context,
        request_timeout=STALL_TIMEOUT_S,
        idle_timeout=SILENCE_TIMEOUT_S,
    ) as (_, port):

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=SERVER_NAME)

        yield connect


async def until_closed(reader: Any) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took (bounded: 10 s)."""
    import asyncio
    import time

    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(-1), 10)
    return data, time.monotonic() - started


async def test_a_client_that_stalls_in_its_headers_gets_408_and_a_close(impatient_server: Any) -> None:
    reader, writer = await impatient_server()
    try:
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n")  # no blank line
        answer, waited = await until_closed(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer
    assert waited >= STALL_TIMEOUT_S * 0.9  # cut off by the timeout, not at once


async def test_a_client_that_stalls_in_its_body_gets_408_and_a_close(impatient_server: Any) -> None:
    reader, writer = await impatient_server()
    try:
        writer.write(b"POST /mutate HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n" + b"{" * 10)
        answer, _ = await until_closed(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")


async def test_a_client_trickling_its_headers_is_cut_off_at_the_request_timeout(impatient_server: Any) -> None:
    """The deadline runs from the request's first byte: sending a little now and then does not extend it."""
    import asyncio

    reader, writer = await impatient_server()
    answer = b""
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(100):  # bounded: 100 x 50 ms, ~17 times the timeout
            writer.write(b"x-trickle-%d: y\r\n" % i)
            try:
                answer = await asyncio.wait_for(reader.read(-1), 0.05)
                break
            except TimeoutError:
                continue
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")


async def test_a_connection_that_never_sends_a_request_is_closed(impatient_server: Any) -> None:
    reader, writer = await impatient_server()
    try:
        answer, waited = await until_closed(reader)
    finally:
        writer.close()
    assert answer == b"" and waited >= SILENCE_TIMEOUT_S * 0.9


async def test_a_request_sent_in_time_is_answered_and_its_kept_alive_connection_outlives_the_timeout(
    impatient_server: Any,
) -> None:
    import asyncio

    reader, writer = await impatient_server()
    try:
        for _ in range(2):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(3), 10) == b"ok\n"
            # Idle between requests for longer than the request timeout (well within the keep-alive wait):
            # an answered request's deadline must not fire on the connection afterwards.
            await asyncio.sleep(STALL_TIMEOUT_S * 2)
    finally:
        writer.close()
