"""RFC 9113 conformance of both listeners, driven by a strict HTTP/2 peer (the `h2` library raises on any
violation it sees in what the proxy sends), plus hand-made frames for what `h2` refuses to send, and the
known HTTP/2 attacks, each of which must be bounded while the proxy keeps serving everyone else."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest

from sidecar.h2 import frames as F
from tests.sidecar.h2peer import AUTHORITY, StrictPeer, client_tls, connect, grpc_frame, request_headers
from tests.sidecar.harness import GRPC_OPTIONS, Backend, MeshCerts, Pair, run_pair


@pytest.fixture(params=["outbound", "inbound"])
async def peer(request: pytest.FixtureRequest, pair: Pair, mesh_certs: MeshCerts) -> AsyncIterator[StrictPeer]:
    if request.param == "outbound":
        p = await connect("127.0.0.1", int(pair.target.split(":")[1]))
    else:
        p = await connect("127.0.0.1", pair.server_side.inbound_port, client_tls(mesh_certs))
    p.listener = request.param
    yield p
    p.writer.close()


async def raw(pair: Pair) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-driven client on the outbound listener, past the SETTINGS exchange."""
    reader, writer = await asyncio.open_connection("127.0.0.1", int(pair.target.split(":")[1]))
    writer.write(F.PREFACE + F.settings({}) + F.SETTINGS_ACK)
    await writer.drain()
    return reader, writer


async def read_frames(reader: asyncio.StreamReader, until_type: int, timeout: float = 5.0) -> list[tuple[int, int, int, bytes]]:
    """Frames the proxy sends, up to and including the first of `until_type` (or EOF)."""
    out = []

    async def loop() -> None:
        while True:
            head = await reader.readexactly(9)
            hi, lo, ftype, flags, sid = F.HEADER.unpack(head)
            payload = await reader.readexactly((hi << 16) | lo)
            out.append((ftype, flags, sid & 0x7FFFFFFF, payload))
            if ftype == until_type:
                return

    try:
        await asyncio.wait_for(loop(), timeout)
    except asyncio.IncompleteReadError:
        pass
    return out


def goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    for ftype, _, _, payload in frames:
        if ftype == F.GOAWAY:
            return int(struct.unpack(">I", payload[4:8])[0])
    return None


async def still_serving(pair: Pair) -> None:
    async with grpc.aio.insecure_channel(pair.target, options=[*GRPC_OPTIONS, ("grpc.default_authority", AUTHORITY)]) as ch:
        assert await ch.unary_unary("/test.Echo/Unary")(b"alive", timeout=5) == b"alive"


# ---- the normal protocol, validated by a strict peer ---------------------------------------------------


async def test_settings_are_exchanged_and_acknowledged(peer: StrictPeer) -> None:
    ev = await peer.read_until(lambda e: isinstance(e, h2.events.SettingsAcknowledged))
    assert ev is not None
    remote = peer.conn.remote_settings
    assert remote[h2.settings.SettingCodes.ENABLE_PUSH] == 0
    assert remote[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] >= 100


async def test_a_unary_call_round_trips(peer: StrictPeer) -> None:
    headers, data, trailers = await peer.call(b"hello")
    assert (b":status", b"200") in headers
    assert data == grpc_frame(b"hello")
    assert (b"grpc-status", b"0") in trailers


async def test_a_header_block_split_over_continuation_frames_is_understood(peer: StrictPeer) -> None:
    # 20 KB of metadata exceeds the 16 KB frame size, so h2 sends HEADERS + CONTINUATION.
    headers, _, trailers = await peer.call(path="/nosuch.Svc/Call", authority="nosuch.default", extra=[("x-pad", "p" * 20_000)])
    status = dict(headers + trailers)
    if peer.listener == "outbound":
        # The outbound side decoded the whole block to route it, and names what it looked up.
        assert status[b"grpc-status"] == b"14"
        assert b"nosuch" in status[b"grpc-message"]
    else:
        # The inbound side relayed the whole block to the app, which does not know the method.
        assert status[b"grpc-status"] == b"12"


async def test_padded_data_and_prioritised_headers_are_accepted(peer: StrictPeer) -> None:
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, request_headers(), priority_weight=200, priority_depends_on=0)
    peer.conn.send_data(sid, grpc_frame(b"padded"), end_stream=True, pad_length=100)
    peer.conn.prioritize(sid, weight=16)
    await peer.flush()
    _, data, trailers = await peer.response(sid)
    assert data == grpc_frame(b"padded")
    assert (b"grpc-status", b"0") in trailers


async def test_ping_is_answered(peer: StrictPeer) -> None:
    peer.conn.ping(b"12345678")
    await peer.flush()
    ev = await peer.read_until(lambda e: isinstance(e, h2.events.PingAckReceived))
    assert ev.ping_data == b"12345678"


async def test_the_proxy_never_exceeds_a_small_receive_window(pair: Pair) -> None:
    # A 1-byte stream window: the proxy must send the 200 KB response in 1-byte DATA frames as we grant them.
    p = await connect("127.0.0.1", int(pair.target.split(":")[1]), settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    try:
        headers, data, trailers = await p.call(b"w" * 200_000)
        assert data == grpc_frame(b"w" * 200_000)
        assert (b"grpc-status", b"0") in trailers
    finally:
        p.writer.close()


async def test_a_client_goaway_lets_open_streams_finish(peer: StrictPeer) -> None:
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, request_headers())
    peer.conn.send_data(sid, grpc_frame(b"last"), end_stream=True)
    await peer.flush()
    # Written under h2's feet: h2 itself would refuse to read a response after sending GOAWAY.
    peer.writer.write(F.goaway(0, F.NO_ERROR))
    _, data, trailers = await peer.response(sid)
    assert data == grpc_frame(b"last")


async def test_many_concurrent_streams_on_one_connection(peer: StrictPeer) -> None:
    sids = []
    for i in range(50):
        sid = peer.conn.get_next_available_stream_id()
        peer.conn.send_headers(sid, request_headers())
        peer.conn.send_data(sid, grpc_frame(b"s%d" % i), end_stream=True)
        sids.append(sid)
    await peer.flush()
    for i, sid in enumerate(sids):
        _, data, _ = await peer.response(sid)
        assert data == grpc_frame(b"s%d" % i)


# ---- protocol errors: the error the RFC names ----------------------------------------------------------


def headers_frame(sid: int, headers: list[tuple[str, str]], flags: int = F.FLAG_END_HEADERS) -> bytes:
    return F.frame(F.HEADERS, flags, sid, hpack.Encoder().encode(headers))


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (F.frame(F.HEADERS, F.FLAG_END_HEADERS, 0, b""), F.PROTOCOL_ERROR),  # HEADERS on stream 0
        (F.frame(F.DATA, 0, 0, b"x"), F.PROTOCOL_ERROR),  # DATA on stream 0
        (F.frame(F.DATA, 0, 7, b"x"), F.PROTOCOL_ERROR),  # DATA on an idle stream
        (F.frame(F.SETTINGS, 0, 1, b""), F.PROTOCOL_ERROR),  # SETTINGS on a stream
        (F.frame(F.SETTINGS, 0, 0, b"\x00" * 5), F.FRAME_SIZE_ERROR),  # SETTINGS not a multiple of 6
        (F.frame(F.SETTINGS, F.FLAG_ACK, 0, b"\x00" * 6), F.FRAME_SIZE_ERROR),  # ACK with payload
        (F.settings({F.SETTINGS_INITIAL_WINDOW_SIZE: 1 << 31}), F.FLOW_CONTROL_ERROR),
        (F.settings({F.SETTINGS_MAX_FRAME_SIZE: 100}), F.PROTOCOL_ERROR),
        (F.settings({F.SETTINGS_ENABLE_PUSH: 2}), F.PROTOCOL_ERROR),
        (F.frame(F.PING, 0, 0, b"1234567"), F.FRAME_SIZE_ERROR),
        (F.frame(F.PING, 0, 3, b"12345678"), F.PROTOCOL_ERROR),
        (F.window_update(0, 0), F.PROTOCOL_ERROR),
        (F.window_update(0, (1 << 31) - 1) + F.window_update(0, (1 << 31) - 1), F.FLOW_CONTROL_ERROR),
        (F.frame(F.RST_STREAM, 0, 0, b"\x00" * 4), F.PROTOCOL_ERROR),
        (F.frame(F.RST_STREAM, 0, 9, b"\x00" * 4), F.PROTOCOL_ERROR),  # RST on an idle stream
        (F.frame(F.CONTINUATION, F.FLAG_END_HEADERS, 1, b""), F.PROTOCOL_ERROR),  # no HEADERS before
        (F.frame(F.PUSH_PROMISE, F.FLAG_END_HEADERS, 1, b"\x00" * 4), F.PROTOCOL_ERROR),
        (F.frame(F.DATA, 0, 1, b"x" * (F.DEFAULT_MAX_FRAME + 1)), F.FRAME_SIZE_ERROR),
        (F.frame(F.HEADERS, F.FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff\xff"), F.COMPRESSION_ERROR),
        (F.frame(F.GOAWAY, 0, 1, b"\x00" * 8), F.PROTOCOL_ERROR),
    ],
    ids=lambda x: x.hex()[:20] if isinstance(x, bytes) else F.ERROR_NAMES[x],
)
async def test_a_connection_error_gets_goaway_with_the_rfc_code(pair: Pair, frame: bytes, code: int) -> None:
    reader, writer = await raw(pair)
    writer.write(frame)
    await writer.drain()
    frames = await read_frames(reader, F.GOAWAY)
    writer.close()
    assert goaway_code(frames) == code
    await still_serving(pair)


async def test_headers_interrupted_by_another_frame_is_a_protocol_error(pair: Pair) -> None:
    reader, writer = await raw(pair)
    writer.write(headers_frame(1, request_headers(), flags=0) + F.ping(b"12345678"))
    await writer.drain()
    assert goaway_code(await read_frames(reader, F.GOAWAY)) == F.PROTOCOL_ERROR
    writer.close()


async def test_an_even_stream_id_from_a_client_is_a_protocol_error(pair: Pair) -> None:
    reader, writer = await raw(pair)
    writer.write(headers_frame(2, request_headers()))
    await writer.drain()
    assert goaway_code(await read_frames(reader, F.GOAWAY)) == F.PROTOCOL_ERROR
    writer.close()


async def test_data_after_end_stream_is_a_stream_closed_error(pair: Pair) -> None:
    reader, writer = await raw(pair)
    writer.write(
        headers_frame(1, request_headers(), flags=F.FLAG_END_HEADERS)
        + F.frame(F.DATA, F.FLAG_END_STREAM, 1, grpc_frame(b"x"))
        + F.frame(F.DATA, 0, 1, b"late")
    )
    await writer.drain()
    frames = await read_frames(reader, F.RST_STREAM)
    writer.close()
    rst = [f for f in frames if f[0] == F.RST_STREAM]
    assert rst and rst[0][2] == 1 and struct.unpack(">I", rst[0][3])[0] == F.STREAM_CLOSED


async def test_a_malformed_request_is_reset_with_protocol_error(pair: Pair) -> None:
    reader, writer = await raw(pair)
    bad = [(":method", "POST"), (":path", "/test.Echo/Unary"), ("connection", "keep-alive")]
    writer.write(headers_frame(1, bad, flags=F.FLAG_END_HEADERS | F.FLAG_END_STREAM))
    await writer.drain()
    frames = await read_frames(reader, F.RST_STREAM)
    writer.close()
    rst = [f for f in frames if f[0] == F.RST_STREAM]
    assert rst and struct.unpack(">I", rst[0][3])[0] == F.PROTOCOL_ERROR


async def test_an_oversized_header_list_gets_431(pair: Pair) -> None:
    reader, writer = await raw(pair)
    block = hpack.Encoder().encode(request_headers(extra=[("x-big", "b" * 15_000)] * 6))
    # Sent as HEADERS + CONTINUATIONs of at most 16 KB each.
    chunks = [block[i : i + 16_000] for i in range(0, len(block), 16_000)]
    out = F.frame(F.HEADERS, F.FLAG_END_STREAM, 1, chunks[0])
    for i, c in enumerate(chunks[1:], 1):
        out += F.frame(F.CONTINUATION, F.FLAG_END_HEADERS if i == len(chunks) - 1 else 0, 1, c)
    writer.write(out)
    await writer.drain()
    frames = await read_frames(reader, F.HEADERS)
    writer.close()
    hdr = [f for f in frames if f[0] == F.HEADERS]
    assert hdr and (b":status", b"431") in hpack.Decoder().decode(hdr[0][3], raw=True)
    await still_serving(pair)


# ---- attacks: each one bounded, everyone else still served --------------------------------------------


async def test_rapid_reset_is_cut_off_with_enhance_your_calm(pair: Pair) -> None:
    reader, writer = await raw(pair)
    enc = hpack.Encoder()
    burst = b"".join(
        F.frame(F.HEADERS, F.FLAG_END_HEADERS, sid, enc.encode(request_headers())) + F.rst_stream(sid, F.CANCEL)
        for sid in range(1, 2 * 3000, 2)
    )
    writer.write(burst)
    await writer.drain()
    assert goaway_code(await read_frames(reader, F.GOAWAY, timeout=10)) == F.ENHANCE_YOUR_CALM
    writer.close()
    await still_serving(pair)


@pytest.mark.parametrize("flood", ["settings", "ping", "priority", "unknown"])
async def test_control_frame_floods_are_cut_off(pair: Pair, flood: str) -> None:
    one = {
        "settings": F.settings({F.SETTINGS_HEADER_TABLE_SIZE: 4096}),
        "ping": F.ping(b"floodfld"),
        "priority": F.frame(F.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10"),
        "unknown": F.frame(0x42, 0, 0, b"junk"),
    }[flood]
    reader, writer = await raw(pair)
    writer.write(one * 5000)
    with _tolerate_reset():
        await writer.drain()
    frames = await read_frames(reader, F.GOAWAY, timeout=10)
    writer.close()
    assert goaway_code(frames) == F.ENHANCE_YOUR_CALM
    await still_serving(pair)


class _tolerate_reset:
    """The proxy may hang up on a flood before we finish writing it: that is a pass, not an error."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ConnectionError)  # type: ignore[arg-type]


async def test_a_continuation_flood_is_cut_off(pair: Pair) -> None:
    reader, writer = await raw(pair)
    writer.write(F.frame(F.HEADERS, 0, 1, hpack.Encoder().encode(request_headers())))
    writer.write(F.frame(F.CONTINUATION, 0, 1, b"") * 10_000)
    with _tolerate_reset():
        await writer.drain()
    assert goaway_code(await read_frames(reader, F.GOAWAY, timeout=10)) == F.ENHANCE_YOUR_CALM
    writer.close()
    await still_serving(pair)


async def test_a_client_at_the_last_stream_id_is_served_then_must_reconnect(pair: Pair) -> None:
    reader, writer = await raw(pair)
    last = F.MAX_STREAM_ID
    writer.write(
        F.frame(F.HEADERS, F.FLAG_END_HEADERS, last, hpack.Encoder().encode(request_headers()))
        + F.frame(F.DATA, F.FLAG_END_STREAM, last, grpc_frame(b"edge"))
    )
    await writer.drain()
    frames = await read_frames(reader, F.HEADERS)
    frames += await read_frames(reader, F.HEADERS)  # response headers, then trailers
    writer.close()
    assert any(f[0] == F.DATA and f[2] == last and f[3] == grpc_frame(b"edge") for f in frames)
    await still_serving(pair)


async def test_a_zero_window_client_stalls_only_itself_and_buffers_are_bounded(pair: Pair) -> None:
    p = await connect("127.0.0.1", int(pair.target.split(":")[1]), settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    try:
        sid = p.conn.get_next_available_stream_id()
        p.conn.send_headers(sid, request_headers(path="/test.Echo/ServerStream", extra=[("x-count", "400")]))
        await p.send_body(sid, grpc_frame(b"z" * 50_000))
        await p.read_until(lambda e: isinstance(e, h2.events.ResponseReceived))
        await asyncio.sleep(1.0)  # the backend would send 20 MB if nothing held it back
        held = sum(
            len(item[0])
            for conn in pair.client_side.proxy.out_relay.downstream
            for s in conn.streams.values()
            for item in (s.pending or ())
            if len(item) == 4
        )
        limit = pair.client_side.proxy.out_relay.limits.initial_window + F.DEFAULT_MAX_FRAME
        assert 0 < held <= limit
        await still_serving(pair)
    finally:
        p.writer.close()


async def test_an_upstream_connection_out_of_stream_ids_is_replaced_without_failing_a_call(pair: Pair) -> None:
    await still_serving(pair)  # dials the upstream connection
    pool = pair.client_side.proxy.outbound.pool
    assert pool is not None
    (conn,) = [c for conns in pool._conns.values() for c in conns]
    conn.next_stream_id = F.MAX_STREAM_ID  # the next call takes the last id this connection may use
    await still_serving(pair)
    assert conn.draining  # no id left: it finishes what it has and closes
    await still_serving(pair)  # placed on a fresh connection
    live = [c for conns in pool._conns.values() for c in conns if not c.closed]
    assert live and conn not in live


# ---- malformed messages (RFC 9113 §8.1.1-8.3): refused by the proxy itself, never forwarded -----------


def malformed(kind: str) -> list[tuple[str, str]]:
    good = request_headers()
    pseudo, regular = good[:4], good[4:]
    return {
        "duplicate :method": [pseudo[0], *pseudo, *regular],
        "duplicate :scheme": [*pseudo[:2], pseudo[1], *pseudo[2:], *regular],
        "duplicate :path": [*pseudo, (":path", "/test.Echo/Other"), *regular],
        "unknown pseudo-header": [*pseudo, (":foo", "bar"), *regular],
        "response pseudo-header": [*pseudo, (":status", "200"), *regular],
        "pseudo-header after a regular field": [*pseudo[:3], *regular, pseudo[3]],
        "no :method": [*pseudo[1:], *regular],
        "no :scheme": [pseudo[0], *pseudo[2:], *regular],
        "no :path": [*pseudo[:2], pseudo[3], *regular],
        "empty :path": [*pseudo[:2], (":path", ""), pseudo[3], *regular],
        "connection": [*good, ("connection", "keep-alive")],
        "keep-alive": [*good, ("keep-alive", "timeout=5")],
        "proxy-connection": [*good, ("proxy-connection", "keep-alive")],
        "transfer-encoding": [*good, ("transfer-encoding", "chunked")],
        "upgrade": [*good, ("upgrade", "h2c")],
        "te other than trailers": [*pseudo, ("content-type", "application/grpc"), ("te", "gzip")],
        "uppercase field name": [*good, ("X-Upper", "1")],
        "field name with a space": [*good, ("x bad", "1")],
        "content-length not a number": [*good, ("content-length", "ten")],
    }[kind]


def lax(peer: StrictPeer) -> StrictPeer:
    """Let the strict peer send what it would refuse to (it still validates every frame the proxy sends)."""
    peer.conn.config.validate_outbound_headers = False
    peer.conn.config.normalize_outbound_headers = False
    return peer


async def expect_protocol_error(peer: StrictPeer, sid: int, backend: Backend) -> None:
    ev = await peer.read_until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid)
    assert ev.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert backend.state.seen_metadata == []  # never forwarded
    _, data, _ = await peer.call(b"still here")  # a stream error: the connection goes on
    assert data == grpc_frame(b"still here")


@pytest.mark.parametrize(
    "kind",
    [
        "duplicate :method",
        "duplicate :scheme",
        "duplicate :path",
        "unknown pseudo-header",
        "response pseudo-header",
        "pseudo-header after a regular field",
        "no :method",
        "no :scheme",
        "no :path",
        "empty :path",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te other than trailers",
        "uppercase field name",
        "field name with a space",
        "content-length not a number",
    ],
)
async def test_a_malformed_request_is_reset_with_protocol_error_and_never_forwarded(
    peer: StrictPeer, backend: Backend, kind: str
) -> None:
    lax(peer)
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, malformed(kind), end_stream=True)
    await peer.flush()
    await expect_protocol_error(peer, sid, backend)


@pytest.mark.parametrize(("declared", "sent"), [(10, b"12345"), (3, b"12345"), (5, b"")])
async def test_data_not_adding_up_to_content_length_is_a_stream_error(
    peer: StrictPeer, backend: Backend, declared: int, sent: bytes
) -> None:
    lax(peer)
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, request_headers(extra=[("content-length", str(declared))]), end_stream=not sent)
    if sent:
        peer.conn.send_data(sid, sent, end_stream=True)
    await peer.flush()
    await expect_protocol_error(peer, sid, backend)


async def test_a_pseudo_header_in_trailers_is_a_stream_error(peer: StrictPeer, backend: Backend) -> None:
    lax(peer)
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, request_headers())
    peer.conn.send_data(sid, grpc_frame(b"x"))
    peer.conn.send_headers(sid, [(":path", "/sneaky")], end_stream=True)
    await peer.flush()
    ev = await peer.read_until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid)
    assert ev.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_a_request_that_is_not_grpc_gets_415_from_the_proxy(peer: StrictPeer, backend: Backend) -> None:
    sid = peer.conn.get_next_available_stream_id()
    peer.conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", AUTHORITY)], end_stream=True)
    await peer.flush()
    headers, body, _ = await peer.response(sid)
    assert (b":status", b"415") in headers
    assert b"application/grpc" in body
    assert backend.state.seen_metadata == []


async def test_headers_on_a_closed_stream_is_a_stream_closed_connection_error(peer: StrictPeer) -> None:
    await peer.call(b"done")  # stream 1, closed both ways
    # Written under h2's feet, which would not send it (a fresh encoder's block is still valid HPACK).
    peer.writer.write(headers_frame(1, request_headers(), flags=F.FLAG_END_HEADERS | F.FLAG_END_STREAM))
    ev = await peer.read_until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
    assert ev.error_code == h2.errors.ErrorCodes.STREAM_CLOSED


async def test_a_stream_id_lower_than_one_already_opened_is_a_protocol_error(pair: Pair) -> None:
    reader, writer = await raw(pair)
    enc = hpack.Encoder()
    writer.write(
        F.frame(F.HEADERS, F.FLAG_END_HEADERS, 5, enc.encode(request_headers()))
        + F.frame(F.HEADERS, F.FLAG_END_HEADERS, 3, enc.encode(request_headers()))
    )
    await writer.drain()
    assert goaway_code(await read_frames(reader, F.GOAWAY)) == F.PROTOCOL_ERROR
    writer.close()


async def test_a_priority_frame_making_a_stream_depend_on_itself_is_a_stream_error(pair: Pair) -> None:
    reader, writer = await raw(pair)
    writer.write(headers_frame(1, request_headers()) + F.frame(F.PRIORITY, 0, 1, struct.pack(">IB", 1, 16)))
    await writer.drain()
    rst = [f for f in await read_frames(reader, F.RST_STREAM) if f[0] == F.RST_STREAM]
    writer.close()
    assert rst and rst[0][2] == 1 and struct.unpack(">I", rst[0][3])[0] == F.PROTOCOL_ERROR


class MalformedResponder(asyncio.Protocol):
    """A backend that answers every request with the response its class names (h2 told not to validate)."""

    response: list[tuple[bytes, bytes]]
    body = grpc_frame(b"answer")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False)
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.StreamEnded):
                self.conn.send_headers(ev.stream_id, self.response)
                self.conn.send_data(ev.stream_id, self.body)
                self.conn.send_headers(ev.stream_id, [(b"grpc-status", b"0")], end_stream=True)
        self.transport.write(self.conn.data_to_send())


@pytest.mark.parametrize(
    ("response", "well_formed_headers"),
    [
        ([(b":status", b"200"), (b":status", b"200"), (b"content-type", b"application/grpc")], False),
        ([(b":status", b"200"), (b":path", b"/"), (b"content-type", b"application/grpc")], False),
        ([(b":status", b"200"), (b"connection", b"close"), (b"content-type", b"application/grpc")], False),
        ([(b":status", b"200"), (b"Content-Type", b"application/grpc")], False),
        # Only the DATA that follows shows this one short of its content-length: the headers went on.
        ([(b":status", b"200"), (b"content-type", b"application/grpc"), (b"content-length", b"1000")], True),
    ],
    ids=["duplicate :status", "request pseudo-header", "connection", "uppercase", "content-length"],
)
async def test_a_malformed_response_never_reaches_the_caller_whole(
    mesh_certs: MeshCerts, tmp_path: Path, response: list[tuple[bytes, bytes]], well_formed_headers: bool
) -> None:
    responder = type("Responder", (MalformedResponder,), {"response": response})
    server = await asyncio.get_running_loop().create_server(responder, "127.0.0.1", 0)
    try:
        async with run_pair(mesh_certs, server.sockets[0].getsockname()[1], tmp_path) as pair:
            p = await connect("127.0.0.1", int(pair.target.split(":")[1]))
            try:
                sid = p.conn.get_next_available_stream_id()
                p.conn.send_headers(sid, request_headers(), end_stream=True)
                await p.flush()
                seen = []
                while not seen or not isinstance(seen[-1], h2.events.StreamReset | h2.events.StreamEnded):
                    seen.append(await p.read_until(lambda e: getattr(e, "stream_id", None) == sid))
            finally:
                p.writer.close()
    finally:
        server.close()
    # The inbound proxy refused it with RST_STREAM PROTOCOL_ERROR, which reached the caller as a reset.
    assert isinstance(seen[-1], h2.events.StreamReset), seen
    assert seen[-1].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert not any(isinstance(e, h2.events.TrailersReceived) for e in seen)
    assert any(isinstance(e, h2.events.ResponseReceived) for e in seen) == well_formed_headers
