"""The access log: one bounded JSON line per call, opt-in per pod, never metadata values or bodies.

Unit tests drive AccessLog directly with a fake clock; the mesh tests run the real proxy pair on
loopback with KUBERPC_ACCESS_LOG=json (what `kuberpc.io/access-log: json` injects) and read stdout
once the proxies have stopped (every batch is written by then).
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import grpc
import pytest

from sidecar import config
from sidecar.accesslog import MAX_FIELD, MAX_PENDING, AccessLog, call_record
from tests.sidecar.harness import Backend, MeshCerts, run_pair
from tests.sidecar.test_mesh import channel

CALL = {
    "direction": "outbound",
    "service": "arith.default",
    "method": "/arith.Arith/Add",
    "grpc_code": 0,
    "duration_s": 0.0012345,
    "request_bytes": 12,
    "response_bytes": 7,
    "peer": "spiffe://cluster.local/ns/default/sa/arith",
    "upstream": "10.1.2.3:15443",
}


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_a_finished_call_is_one_json_line_with_its_fields() -> None:
    out = io.StringIO()
    log = AccessLog(out, wall_clock=lambda: 1_800_000_000.25)

    log.write(call_record(**CALL))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the write happens on the next loop turn

    assert lines(out.getvalue()) == [
        {
            "ts": "2027-01-15T08:00:00.250Z",
            "direction": "outbound",
            "service": "arith.default",
            "method": "/arith.Arith/Add",
            "grpc_code": 0,
            "duration_ms": 1.234,
            "request_bytes": 12,
            "response_bytes": 7,
            "peer": "spiffe://cluster.local/ns/default/sa/arith",
            "upstream": "10.1.2.3:15443",
        }
    ]


async def test_calls_of_one_loop_turn_are_written_in_one_batch() -> None:
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str, /) -> int:
            writes.append(text)
            return len(text)

    log = AccessLog(Recorder())
    for _ in range(3):
        log.write(call_record(**CALL))  # type: ignore[arg-type]
    await asyncio.sleep(0)

    assert len(writes) == 1 and len(lines(writes[0])) == 3


async def test_a_method_path_longer_than_the_bound_is_cut_so_the_line_stays_bounded() -> None:
    out = io.StringIO()
    log = AccessLog(out)

    log.write(call_record(**{**CALL, "method": "/" + "x" * 100_000}))  # type: ignore[arg-type]
    await asyncio.sleep(0)

    (line,) = out.getvalue().splitlines()
    assert len(line) < 1024
    assert json.loads(line)["method"] == "/" + "x" * (MAX_FIELD - 1) + "..."


async def test_lines_beyond_the_pending_bound_are_dropped_and_reported() -> None:
    out = io.StringIO()
    log = AccessLog(out)

    for _ in range(MAX_PENDING + 5):
        log.write(call_record(**CALL))  # type: ignore[arg-type]
    await asyncio.sleep(0)

    written = lines(out.getvalue())
    assert len(written) == MAX_PENDING + 1
    assert written[-1] == {"dropped": 5}


def test_an_unknown_access_log_format_is_a_configuration_error() -> None:
    with pytest.raises(config.ConfigError, match="KUBERPC_ACCESS_LOG: 'xml'"):
        config.load(
            {
                "KUBERPC_INBOUND_ADDR": "off",
                "KUBERPC_TLS_CERT": "c",
                "KUBERPC_TLS_KEY": "k",
                "KUBERPC_TRUST_ANCHORS": "a",
                "KUBERPC_ACCESS_LOG": "xml",
            }
        )


ON = {"KUBERPC_ACCESS_LOG": "json"}


async def test_each_proxy_logs_each_call_once_with_the_peer_identity_and_no_metadata_or_body(
    mesh_certs: MeshCerts, backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path, client_env=ON, server_env=ON) as p:
        async with channel(p.target) as ch:
            for _ in range(3):
                await ch.unary_unary("/test.Echo/Unary")(
                    b"body-secret-4711", metadata=(("x-token", "metadata-secret-4242"),), timeout=10
                )

    text = capsys.readouterr().out
    calls = lines(text)
    outbound = [c for c in calls if c["direction"] == "outbound"]
    inbound = [c for c in calls if c["direction"] == "inbound"]
    assert len(outbound) == 3 and len(inbound) == 3
    assert {c["peer"] for c in outbound} == {"spiffe://cluster.local/ns/default/sa/arith"}
    assert {c["peer"] for c in inbound} == {"spiffe://cluster.local/ns/default/sa/client"}
    assert {c["upstream"] for c in outbound} == {f"127.0.0.1:{p.server_side.inbound_port}"}
    assert all(c["method"] == "/test.Echo/Unary" and c["grpc_code"] == 0 for c in calls)
    assert "secret-4711" not in text and "secret-4242" not in text and "x-token" not in text


async def test_a_rejected_call_is_logged_with_its_status(
    mesh_certs: MeshCerts, backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path, client_env=ON) as p:
        async with channel(p.target, authority="nowhere.default:50051") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await ch.unary_unary("/nowhere.Svc/Call")(b"x", timeout=10)

    (call,) = lines(capsys.readouterr().out)
    assert (call["direction"], call["method"], call["grpc_code"]) == ("outbound", "/nowhere.Svc/Call", 14)


async def test_without_the_setting_nothing_is_logged_per_call(
    mesh_certs: MeshCerts, backend: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with run_pair(mesh_certs, backend.port, tmp_path) as p:
        assert p.client_side.proxy.out_relay.access_log is None
        async with channel(p.target) as ch:
            await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)

    assert lines(capsys.readouterr().out) == []
