"""A strict HTTP/2 client for tests: the `h2` library validates everything the proxy sends it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events

from tests.sidecar.harness import MeshCerts

AUTHORITY = "echo.default:50051"


def grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def request_headers(path: str = "/test.Echo/Unary", authority: str = AUTHORITY, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *(extra or []),
    ]


@dataclass
class StrictPeer:
    """An `h2` client over a real socket to one of the proxy's listeners."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h2.connection.H2Connection
    events: list[Any] = field(default_factory=list)
    listener: str = "outbound"

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def read_until(self, pred: Any, timeout: float = 5.0) -> Any:
        """Feed what the proxy sends into `h2` (which validates it) until an event matches."""
        async def loop() -> Any:
            while True:
                for ev in self.events:
                    if pred(ev):
                        self.events.remove(ev)
                        return ev
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed by the proxy")
                self.events.extend(self.conn.receive_data(data))
                # h2's automatic replies (ACKs, window updates) may find the proxy gone after it finished a
                # drained connection; the events already read still count.
                with contextlib.suppress(ConnectionError):
                    await self.flush()

        return await asyncio.wait_for(loop(), timeout)

    async def call(self, body: bytes = b"ping", **kw: Any) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, request_headers(**kw))
        await self.send_body(sid, grpc_frame(body))
        return await self.response(sid)

    async def send_body(self, sid: int, data: bytes, end: bool = True) -> None:
        """DATA frames no larger than the proxy's MAX_FRAME_SIZE, within its flow-control windows."""
        view = memoryview(data)
        while True:
            size = min(self.conn.max_outbound_frame_size, self.conn.local_flow_control_window(sid), len(view))
            if size == 0 and len(view):
                await self.read_until(lambda e: isinstance(e, h2.events.WindowUpdated))
                continue
            self.conn.send_data(sid, bytes(view[:size]), end_stream=end and size == len(view))
            view = view[size:]
            await self.flush()
            if not len(view):
                return

    async def response(self, sid: int) -> tuple[list[tuple[bytes, bytes]], bytes, list[tuple[bytes, bytes]]]:
        headers: list[tuple[bytes, bytes]] = []
        trailers: list[tuple[bytes, bytes]] = []
        data = b""
        while True:
            ev = await self.read_until(lambda e: getattr(e, "stream_id", None) == sid)
            if isinstance(ev, h2.events.ResponseReceived):
                headers = ev.headers
            elif isinstance(ev, h2.events.DataReceived):
                data += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                with contextlib.suppress(ConnectionError):  # the proxy may close once a drained stream ends
                    await self.flush()
            elif isinstance(ev, h2.events.TrailersReceived):
                trailers = ev.headers
            elif isinstance(ev, h2.events.StreamEnded):
                return headers, data, trailers
            elif isinstance(ev, h2.events.StreamReset):
                raise AssertionError(f"stream reset with {ev.error_code!r}")


async def connect(host: str, port: int, ssl_ctx: ssl.SSLContext | None = None, settings: dict[int, int] | None = None) -> StrictPeer:
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx, limit=1 << 20)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    if settings:
        conn.update_settings(settings)
    peer = StrictPeer(reader, writer, conn)
    await peer.flush()
    await peer.read_until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
    return peer


def client_tls(mesh_certs: MeshCerts) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(mesh_certs.client.ca)
    ctx.load_cert_chain(mesh_certs.client.cert, mesh_certs.client.key)
    ctx.set_alpn_protocols(["h2"])
    return ctx
