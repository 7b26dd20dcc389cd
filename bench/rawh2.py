"""A minimal HTTP/2 peer for load: frame splitting, SETTINGS/PING answers and flow-control windows, no HPACK decoding.

The load generator and the fake app build on it; it must not import the proxy's codec (sidecar.h2), so that
the harness's own cost never moves when the proxy's codec changes (bench/instructions.py subtracts it).
Header blocks are pre-encoded by the caller; blocks received are skipped (the roles need only frame flags).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
HEADER = struct.Struct(">BHBBL")
U32 = struct.Struct(">L")
# Windows we advertise: as large as HTTP/2 allows, so our side never paces the peer (the bench measures the
# proxy, and a run's byte count stays far below 2 GiB, so no WINDOW_UPDATE is ever owed after the first).
BIG_WINDOW = (1 << 31) - 1
INITIAL_WINDOW = 65_535


class PeerError(RuntimeError):
    """The other side reset a stream, sent GOAWAY or closed: the run is not a measurement."""


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def our_settings(max_streams: int = 4096) -> bytes:
    """SETTINGS (max concurrent streams, initial window) and a connection WINDOW_UPDATE to BIG_WINDOW."""
    payload = struct.pack(">HLHL", 0x3, max_streams, 0x4, BIG_WINDOW)
    return frame(SETTINGS, 0, 0, payload) + frame(WINDOW_UPDATE, 0, 0, U32.pack(BIG_WINDOW - INITIAL_WINDOW))


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


class Peer(asyncio.Protocol):
    """Splits frames and answers the connection-level ones; subclasses handle HEADERS and DATA.

    Sending windows (the other side's) are tracked so that a long stream never overruns them: `on_window`
    tells the subclass that a blocked stream may send again.
    """

    def __init__(self, on_lost: Callable[[Exception | None], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.peer_initial_window = INITIAL_WINDOW
        self.conn_window = INITIAL_WINDOW
        self.stream_windows: dict[int, int] = {}
        self.error: Exception | None = None
        self._on_lost = on_lost
        self._out: list[bytes] = []

    # ---- writing: callers queue, the end of each read (or `flush`) writes once ----
    def queue(self, data: bytes) -> None:
        self._out.append(data)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = exc or PeerError("connection closed")
        if self._on_lost is not None:
            self._on_lost(self.error)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = PeerError(message)
        if self.transport is not None:
            self.transport.close()

    def send_window(self, sid: int) -> int:
        return min(self.conn_window, self.stream_windows.get(sid, self.peer_initial_window))

    def spend(self, sid: int, n: int) -> None:
        self.conn_window -= n
        self.stream_windows[sid] = self.stream_windows.get(sid, self.peer_initial_window) - n

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        unpack = HEADER.unpack_from
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            end = pos + 9 + ((hi << 16) | lo)
            if end > n:
                break
            payload = buf[pos + 9 : end]
            pos = end
            if ftype == DATA:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                self.on_data(sid, payload, flags & END_STREAM != 0)
            elif ftype == HEADERS:
                self.on_headers(sid, flags)
            elif ftype == CONTINUATION:
                pass  # blocks are never decoded; END_STREAM rode on the HEADERS frame
            elif ftype == WINDOW_UPDATE:
                inc = U32.unpack_from(payload)[0] & 0x7FFFFFFF
                if sid:
                    self.stream_windows[sid] = self.stream_windows.get(sid, self.peer_initial_window) + inc
                else:
                    self.conn_window += inc
                self.on_window()
            elif ftype == SETTINGS:
                if not flags & ACK:
                    for i in range(0, len(payload), 6):
                        key, value = struct.unpack_from(">HL", payload, i)
                        if key == 0x4:
                            delta = value - self.peer_initial_window
                            self.peer_initial_window = value
                            for s in self.stream_windows:
                                self.stream_windows[s] += delta
                    self.queue(frame(SETTINGS, ACK, 0))
            elif ftype == PING:
                if not flags & ACK:
                    self.queue(frame(PING, ACK, 0, payload))
            elif ftype == RST_STREAM:
                self.fail(f"stream {sid} reset with code {U32.unpack_from(payload)[0]}")
            elif ftype == GOAWAY:
                self.fail(f"GOAWAY code {U32.unpack_from(payload, 4)[0]}: {payload[8:200]!r}")
        self._buf = buf[pos:] if pos < n else b""
        self.after_read()
        self.flush()

    # ---- subclass hooks ----
    def on_headers(self, sid: int, flags: int) -> None:
        raise NotImplementedError

    def on_data(self, sid: int, payload: bytes, end: bool) -> None:
        raise NotImplementedError

    def on_window(self) -> None:
        """A WINDOW_UPDATE arrived: blocked streams may send."""

    def after_read(self) -> None:
        """Every frame of one read has been handled (queue new work here: one write per read)."""
