"""Fuzzing both proxy listeners with random and mutated HTTP/2 frame streams: whatever a caller sends, the
proxy never crashes, hangs or leaks, and what it answers is still well-formed HTTP/2.

Hypothesis draws inputs in a worker thread and hands each one to the test's event loop, where the proxies
run; so the proxies keep their state between examples, and a proxy that blocks the loop is seen from outside.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import ssl
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field

import grpc
import hpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sidecar.h2 import frames as F
from sidecar.relay import Relay
from tests.sidecar.h2peer import AUTHORITY, client_tls, grpc_frame, request_headers
from tests.sidecar.harness import GRPC_OPTIONS, MeshCerts, Pair

EXAMPLES = 150  # per test: six tests stay within the file's ~60 s budget on two cores
EXAMPLE_BUDGET = 10.0  # seconds one example may take, connection to cleanup (~30 ms normally): a hang
QUIET = 0.05  # a lingering fuzz connection is done once the proxy has said nothing for this long
LINGER_CAP = 1.0  # ...or after this long, even if the proxy keeps talking
SETTLE = 3.0  # bounded wait for the proxy to forget a closed connection and its streams (ms, normally)
PING_BUDGET = 3.0  # a fresh connection's PING must be answered within this (generous: CI shares cores)
LIVENESS_EVERY = 15  # examples between two real gRPC calls through the whole mesh
TASK_SLACK = 3  # event-loop tasks tolerated above the baseline once everything is closed

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs on every run, so a CI failure reproduces locally
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

U32 = (1 << 32) - 1


# ---- what one example is ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzCase:
    """Bytes for one connection, the chunk sizes they are written in, and how the connection ends."""

    data: bytes
    chunks: tuple[int, ...]
    ending: str  # linger: read until EOF or quiet; half_close: FIN then read; close; abort (RST)


ENDINGS = st.sampled_from(["linger", "half_close", "close", "abort"])
CHUNKS = st.lists(st.one_of(st.integers(1, 16), st.integers(1, 4096)), min_size=1, max_size=6).map(tuple)


def cases(body: st.SearchStrategy[bytes]) -> st.SearchStrategy[FuzzCase]:
    return st.builds(FuzzCase, body.map(lambda b: F.PREFACE + b), CHUNKS, ENDINGS)


# ---- field values --------------------------------------------------------------------------------------

stream_ids = st.one_of(
    st.sampled_from([1, 3, 5]),
    st.sampled_from([0, 2, 7, 9, 101, F.MAX_STREAM_ID, 1 << 31 | 1]),
    st.integers(0, U32),
)
any_flags = st.one_of(
    st.sets(st.sampled_from([F.FLAG_END_STREAM, F.FLAG_END_HEADERS, F.FLAG_PADDED, F.FLAG_PRIORITY])).map(
        sum
    ),
    st.integers(0, 0xFF),
)
error_codes = st.one_of(st.sampled_from(sorted(F.ERROR_NAMES)), st.integers(0, U32))
u31_edges = st.one_of(
    st.sampled_from([0, 1, 65_535, 65_536, 1 << 20, F.MAX_WINDOW, 1 << 31, U32]), st.integers(0, U32)
)
short_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=24)

PATHS = [
    "/test.Echo/Unary",
    "/test.Echo/ServerStream",
    "/test.Echo/ClientStream",
    "/test.Echo/Bidi",
    "/nosuch.Svc/Call",
    "/",
    "",
    "*",
]
AUTHORITIES = [AUTHORITY, "echo", "echo.default.svc.cluster.local:50051", "nosuch.default", "", "[::1]:x"]
METADATA_NAMES = [
    "x-fuzz",
    "x-fuzz-bin",
    "grpc-timeout",
    "te",
    "connection",
    "user-agent",
    "grpc-encoding",
    ":status",
]
TIMEOUTS = ["1S", "100m", "0n", "99999999H", "5u", "bogus", "", "123456789S"]


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[str, str]]:
    """A gRPC request's headers, sometimes made malformed (reordered, missing, forbidden or odd values)."""
    extra = draw(
        st.lists(
            st.tuples(st.sampled_from(METADATA_NAMES), st.one_of(st.sampled_from(TIMEOUTS), short_text)),
            max_size=3,
        )
    )
    headers = request_headers(
        path=draw(st.sampled_from(PATHS)), authority=draw(st.sampled_from(AUTHORITIES)), extra=extra
    )
    if draw(st.integers(0, 3)) == 0:
        headers = list(draw(st.permutations(headers)))
    if draw(st.integers(0, 3)) == 0:
        del headers[draw(st.integers(0, len(headers) - 1))]
    return headers


@st.composite
def padded(draw: st.DrawFn, body: bytes) -> bytes:
    """The PADDED form of a payload: a pad length, the body, and (honestly or not) that much padding."""
    pad = draw(st.integers(0, 255))
    actual = pad if draw(st.booleans()) else draw(st.integers(0, 300))
    return bytes([pad]) + body + b"\x00" * actual


# ---- frames --------------------------------------------------------------------------------------------


@st.composite
def headers_frames(
    draw: st.DrawFn, enc: hpack.Encoder, sid: int | None = None, valid: bool = False
) -> list[bytes]:
    """HEADERS (+ CONTINUATIONs) carrying a real request encoded by `enc`, whose dynamic table the
    connection's later header blocks share, with random PADDED/PRIORITY/END_* flags and stream ids."""
    if sid is None:
        sid = draw(stream_ids)
    headers = request_headers() if valid else draw(header_lists())
    block = enc.encode(headers, huffman=draw(st.booleans()))
    flags = draw(st.sets(st.sampled_from([F.FLAG_END_STREAM, F.FLAG_PADDED, F.FLAG_PRIORITY])).map(sum))
    n_parts = draw(st.integers(1, 3))
    cuts = sorted(draw(st.lists(st.integers(0, len(block)), min_size=n_parts - 1, max_size=n_parts - 1)))
    parts = [block[a:b] for a, b in zip([0, *cuts], [*cuts, len(block)], strict=True)]
    first = parts[0]
    if flags & F.FLAG_PRIORITY:
        dep = draw(st.one_of(st.just(0), st.just(sid), st.integers(0, U32)))
        first = struct.pack(">LB", dep, draw(st.integers(0, 255))) + first
    if flags & F.FLAG_PADDED:
        first = draw(padded(first))
    end_headers = F.FLAG_END_HEADERS if len(parts) == 1 else 0
    out = [F.frame(F.HEADERS, flags | end_headers, sid, first)]
    for i, part in enumerate(parts[1:], 2):
        last = i == len(parts) and (valid or draw(st.integers(0, 5)) > 0)
        out.append(F.frame(F.CONTINUATION, F.FLAG_END_HEADERS if last else 0, sid, part))
    return out


@st.composite
def data_frames(draw: st.DrawFn, sid: int | None = None, end: bool | None = None) -> list[bytes]:
    if sid is None:
        sid = draw(stream_ids)
    body = draw(
        st.one_of(
            st.binary(max_size=64).map(grpc_frame),
            st.binary(max_size=64).map(grpc_frame),
            st.binary(max_size=64),
            st.binary(max_size=64),
            st.sampled_from([F.DEFAULT_MAX_FRAME - 1, F.DEFAULT_MAX_FRAME, F.DEFAULT_MAX_FRAME + 1]).map(
                lambda n: b"d" * n
            ),
        )
    )
    flags = draw(st.sets(st.sampled_from([F.FLAG_END_STREAM, F.FLAG_PADDED])).map(sum))
    if end is not None:
        flags = (flags & ~F.FLAG_END_STREAM) | (F.FLAG_END_STREAM if end else 0)
    if flags & F.FLAG_PADDED:
        body = draw(padded(body))
    return [F.frame(F.DATA, flags, sid, body)]


@st.composite
def settings_frames(draw: st.DrawFn) -> bytes:
    known = st.sampled_from(
        [
            F.SETTINGS_HEADER_TABLE_SIZE,
            F.SETTINGS_ENABLE_PUSH,
            F.SETTINGS_MAX_CONCURRENT_STREAMS,
            F.SETTINGS_INITIAL_WINDOW_SIZE,
            F.SETTINGS_MAX_FRAME_SIZE,
            F.SETTINGS_MAX_HEADER_LIST_SIZE,
        ]
    )
    values = st.dictionaries(st.one_of(known, st.integers(0, 0xFFFF)), u31_edges, max_size=4)
    return draw(
        st.one_of(
            values.map(F.settings),
            st.just(F.SETTINGS_ACK),
            st.builds(F.frame, st.just(F.SETTINGS), any_flags, stream_ids, st.binary(max_size=13)),
        )
    )


sane_settings = st.fixed_dictionaries(
    {},
    optional={
        F.SETTINGS_HEADER_TABLE_SIZE: st.integers(0, 1 << 16),
        F.SETTINGS_ENABLE_PUSH: st.integers(0, 1),
        F.SETTINGS_MAX_CONCURRENT_STREAMS: st.integers(0, 1 << 10),
        F.SETTINGS_INITIAL_WINDOW_SIZE: st.integers(0, F.MAX_WINDOW),
        F.SETTINGS_MAX_FRAME_SIZE: st.integers(F.DEFAULT_MAX_FRAME, F.MAX_FRAME_LIMIT),
        F.SETTINGS_MAX_HEADER_LIST_SIZE: st.integers(0, 1 << 20),
    },
).map(F.settings)


@st.composite
def control_frames(draw: st.DrawFn, open_ids: list[int]) -> bytes:
    """One frame of any other type. Fields lean towards valid values and towards the streams this
    connection opened (so the frame reaches the stream logic), with a fair share of anything at all."""
    sid = draw(st.one_of(st.sampled_from(open_ids or [1]), stream_ids))
    kind = draw(
        st.sampled_from(
            [
                "settings",
                "window",
                "ping",
                "rst",
                "priority",
                "unknown",
                "goaway",
                "continuation",
                "push",
                "raw",
            ]
        )
    )
    if kind == "settings":
        return draw(st.one_of(sane_settings, settings_frames()))
    if kind == "window":
        increment = draw(st.one_of(st.integers(1, 1 << 16), u31_edges))
        return F.window_update(draw(st.one_of(st.just(0), st.just(sid))), increment)
    if kind == "ping":
        return draw(
            st.one_of(
                st.builds(F.ping, st.binary(min_size=8, max_size=8), st.booleans()),
                st.builds(F.frame, st.just(F.PING), any_flags, stream_ids, st.binary(max_size=12)),
            )
        )
    if kind == "rst":
        return F.rst_stream(sid, draw(error_codes))
    if kind == "priority":
        dep = draw(st.one_of(st.sampled_from([0, sid]), st.integers(0, U32)))
        body = struct.pack(">LB", dep, draw(st.integers(0, 255)))
        return F.frame(F.PRIORITY, 0, sid, draw(st.one_of(st.just(body), st.binary(max_size=6))))
    if kind == "unknown":  # must be ignored (RFC 9113 §5.5)
        return F.frame(
            draw(st.integers(10, 0xFF)),
            draw(any_flags),
            draw(st.one_of(st.just(0), st.just(sid))),
            draw(st.binary(max_size=32)),
        )
    if kind == "goaway":
        return F.goaway(
            draw(st.one_of(st.sampled_from([0, sid]), st.integers(0, U32 >> 1))),
            draw(error_codes),
            draw(st.binary(max_size=16)),
        )
    if kind == "continuation":
        return F.frame(F.CONTINUATION, draw(any_flags), sid, draw(st.binary(max_size=32)))
    if kind == "push":
        return F.frame(F.PUSH_PROMISE, draw(any_flags), sid, draw(st.binary(max_size=16)))
    return F.frame(
        draw(st.integers(0, 0xFF)), draw(any_flags), draw(stream_ids), draw(st.binary(max_size=32))
    )


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[bytes]:
    """A connection's frames after the preface: its SETTINGS, then gRPC calls on fresh stream ids
    interleaved with every other frame type, each with random field values."""
    enc = hpack.Encoder()
    out = [draw(st.one_of(st.just(F.settings({})), sane_settings))]  # mutations may still break it
    next_sid = 1
    open_ids: list[int] = []
    for _ in range(draw(st.integers(0, 12))):
        # Calls weigh most: a sequence that dies at its first frame teaches little about the relay.
        kind = draw(
            st.sampled_from(
                ["call", "call", "open", "body", "headers", "data", "control", "control", "control"]
            )
        )
        if kind == "call":  # a complete request
            out += draw(headers_frames(enc, next_sid, valid=True))
            out += draw(data_frames(next_sid, end=True))
        elif kind == "open":  # a request whose body may never end: closing the connection must clean it up
            out += draw(headers_frames(enc, next_sid))
            open_ids.append(next_sid)
        elif kind == "body" and open_ids:  # more of an open request's body, or its end
            out += draw(data_frames(draw(st.sampled_from(open_ids))))
        elif kind == "headers":
            out += draw(headers_frames(enc))
        elif kind == "data":
            out += draw(data_frames())
        else:
            out.append(draw(control_frames(open_ids)))
        if kind in ("call", "open"):
            next_sid += 2
    return out


@st.composite
def mutated(draw: st.DrawFn, frames: st.SearchStrategy[list[bytes]]) -> bytes:
    """A frame sequence after a few mutations: frame-level (duplicate, drop, swap, splice in frames of
    another sequence, lie about a length) then byte-level (bit flips, inserted bytes, truncation)."""
    seq = list(draw(frames))
    # Each kind of mutation is absent half the time, so valid sequences and single mutations stay common.
    frame_ops = st.lists(
        st.sampled_from(["dup", "drop", "swap", "splice", "relength"]), min_size=1, max_size=3
    )
    for op in draw(st.one_of(st.just([]), frame_ops)):
        # Frame 0 (the SETTINGS that must come first) is hit only by byte-level mutations: hypothesis favours
        # index 0, and a connection that dies at its first frame reaches nothing else.
        i = draw(st.integers(1, len(seq) - 1)) if len(seq) > 1 else 0
        if op == "dup" and i:
            seq[i:i] = [seq[i]] * draw(st.integers(1, 3))
        elif op == "drop" and i:
            del seq[i]
        elif op == "swap" and i:
            j = draw(st.integers(1, len(seq) - 1))
            seq[i], seq[j] = seq[j], seq[i]
        elif op == "splice":
            seq[i + 1 : i + 1] = draw(frames)[1:]
        elif op == "relength" and i:
            n = draw(st.one_of(st.integers(0, 64), st.integers(0, (1 << 24) - 1)))
            seq[i] = struct.pack(">L", n)[1:] + seq[i][3:]
    data = bytearray(b"".join(seq))
    byte_ops = st.lists(st.sampled_from(["flip", "insert", "truncate"]), min_size=1, max_size=4)
    for op in draw(st.one_of(st.just([]), byte_ops)):
        i = draw(st.integers(0, len(data))) if data else 0
        if op == "flip" and i < len(data):
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[i:]
    return bytes(data)


# ---- HPACK blocks --------------------------------------------------------------------------------------


def hpack_int(value: int, prefix: int, high: int, overlong: int = 0) -> bytes:
    """RFC 7541 §5.1 integer. Hand-written because the fuzzer needs what no encoder emits: redundant
    continuation bytes (`overlong`) that still decode to the same value, and values of any size."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([high | value])
    out = bytearray([high | limit])
    value -= limit
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    if overlong:
        out.append(0x80 | value)
        out += b"\x80" * (overlong - 1)
        out.append(0)
    else:
        out.append(value)
    return bytes(out)


@st.composite
def hpack_strings(draw: st.DrawFn, names: bool = False) -> bytes:
    body = draw(
        st.one_of(
            st.sampled_from(
                [b":path", b":method", b":authority", b"content-type", b"te", b"x-fuzz", b"Upper"]
            )
            if names
            else st.sampled_from([b"/test.Echo/Unary", b"POST", b"application/grpc", b"trailers", b""]),
            st.binary(max_size=40),
        )
    )
    lie = draw(st.one_of(st.just(0), st.integers(-3, 3), st.sampled_from([1 << 14, 1 << 40])))
    huffman = draw(st.booleans())  # over random bytes: mostly invalid codes, EOS, bad padding
    return (
        hpack_int(max(0, len(body) + lie), 7, 0x80 if huffman else 0, draw(st.sampled_from([0, 0, 1, 9])))
        + body
    )


@st.composite
def hpack_representations(draw: st.DrawFn, enc: hpack.Encoder) -> bytes:
    kind = draw(st.sampled_from(["indexed", "literal", "size_update", "real", "raw"]))
    overlong = draw(st.sampled_from([0, 0, 1, 12]))
    if kind == "indexed":
        index = draw(st.one_of(st.integers(0, 70), st.integers(0, 1 << 40)))
        return hpack_int(index, 7, 0x80, overlong)
    if kind == "literal":
        # with incremental indexing / without indexing / never indexed
        high, prefix = draw(st.sampled_from([(0x40, 6), (0x00, 4), (0x10, 4)]))
        name_index = draw(st.one_of(st.just(0), st.integers(0, 70)))
        name = draw(hpack_strings(names=True)) if name_index == 0 else b""
        return hpack_int(name_index, prefix, high, overlong) + name + draw(hpack_strings())
    if kind == "size_update":
        size = draw(st.one_of(st.sampled_from([0, 4096, 4097, 1 << 16]), st.integers(0, U32)))
        return hpack_int(size, 5, 0x20, overlong)
    if kind == "real":
        return bytes(enc.encode(draw(header_lists()), huffman=draw(st.booleans())))
    return draw(st.binary(min_size=1, max_size=32))


@st.composite
def hpack_sequences(draw: st.DrawFn) -> bytes:
    """SETTINGS, then header blocks of random HPACK representations on successive streams (so the dynamic
    table carries over), each sometimes split over CONTINUATIONs and followed by a request body."""
    enc = hpack.Encoder()
    out = [draw(settings_frames()) if draw(st.booleans()) else F.settings({})]
    for n in range(draw(st.integers(1, 4))):
        sid = 1 + 2 * n
        block = b"".join(draw(st.lists(hpack_representations(enc), min_size=1, max_size=8)))
        end_stream = draw(st.booleans())
        out.append(
            F.headers_frames(sid, block, end_stream, draw(st.sampled_from([F.DEFAULT_MAX_FRAME, 7, 1])))
        )
        if not end_stream and draw(st.booleans()):
            out.append(F.frame(F.DATA, F.FLAG_END_STREAM, sid, grpc_frame(b"hpack")))
    return b"".join(out)


RANDOM_BYTES = cases(
    st.one_of(st.binary(max_size=64), st.binary(min_size=64, max_size=4096)).map(lambda b: F.settings({}) + b)
)
MUTATED_FRAMES = cases(mutated(frame_sequences()))
HPACK_BLOCKS = cases(hpack_sequences())


# ---- the listeners and what is checked around every example --------------------------------------------


@dataclass
class Listener:
    name: str
    port: int
    tls: ssl.SSLContext | None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.tls)


@pytest.fixture(params=["outbound", "inbound"])
def listener(request: pytest.FixtureRequest, pair: Pair, mesh_certs: MeshCerts) -> Listener:
    if request.param == "outbound":
        return Listener("outbound", int(pair.target.rsplit(":", 1)[1]), None)
    return Listener("inbound", pair.server_side.inbound_port, client_tls(mesh_certs))


class ErrorRecords(logging.Handler):
    """Every ERROR the proxy (or asyncio, for an exception escaping a callback or protocol) logs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def report(self, start: int = 0) -> str:
        fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
        return "\n".join(fmt.format(r) for r in self.records[start:])


@pytest.fixture
def proxy_errors() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    loggers = [logging.getLogger("sidecar"), logging.getLogger("asyncio")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def peer_of(conn: object) -> object:
    transport = getattr(conn, "transport", None)
    return None if transport is None else transport.get_extra_info("peername")


async def until(pred: Callable[[], object], what: Callable[[], str], timeout: float = SETTLE) -> None:
    """Bounded poll: the proxy forgets a closed connection a few loop turns after the socket closes."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {what()}")
        await asyncio.sleep(0.002)


async def still_serving(pair: Pair) -> None:
    async with grpc.aio.insecure_channel(
        pair.target, options=[*GRPC_OPTIONS, ("grpc.default_authority", AUTHORITY)]
    ) as ch:
        assert await ch.unary_unary("/test.Echo/Unary")(b"alive", timeout=5) == b"alive"


@dataclass
class Reply:
    data: bytearray = field(default_factory=bytearray)
    ended: str = "cut"  # eof, reset, quiet; cut: we closed first


def check_reply(reply: Reply) -> None:
    """What the proxy sent on a fuzzed connection is well-formed HTTP/2, whatever it was sent: whole frames,
    its SETTINGS first, only frame types a server may send on the streams it may use, header blocks a strict
    HPACK decoder accepts, never INTERNAL_ERROR (a bug of the proxy's), nothing after an error's GOAWAY."""
    data, pos = bytes(reply.data), 0
    if not data:
        # We hung up first, the proxy was slow to answer (quiet), or it hung up with our bytes unread and the
        # kernel dropped its answer (reset). A clean close, though, comes after its SETTINGS at least.
        assert reply.ended != "eof", "the proxy closed the connection without a word"
        return
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 1 << 16  # the fuzzed SETTINGS may have raised HEADER_TABLE_SIZE
    block, first = b"", True
    while len(data) - pos >= 9:
        hi, lo, ftype, flags, sid = F.HEADER.unpack_from(data, pos)
        length = (hi << 16) | lo
        if pos + 9 + length > len(data):
            break
        payload = data[pos + 9 : pos + 9 + length]
        pos += 9 + length
        if first:
            assert ftype == F.SETTINGS and not flags & F.FLAG_ACK and sid == 0, (
                "the proxy's first frame is not SETTINGS"
            )
            first = False
        assert ftype <= F.CONTINUATION and ftype not in (F.PUSH_PROMISE, F.PRIORITY), f"frame type {ftype}"
        if sid == 0:
            assert ftype in (F.SETTINGS, F.PING, F.GOAWAY, F.WINDOW_UPDATE), f"frame type {ftype} on stream 0"
        else:
            assert ftype not in (F.SETTINGS, F.PING, F.GOAWAY), f"frame type {ftype} on stream {sid}"
            # Even ids are the server's, and the proxy opens no streams: such a stream is idle (RFC 9113 §5.1).
            assert sid & 1, (
                f"frame type {ftype} on stream {sid}, which is idle: the client cannot have opened it"
            )
        if ftype in (F.HEADERS, F.CONTINUATION):
            if ftype == F.HEADERS:
                assert not flags & (F.FLAG_PADDED | F.FLAG_PRIORITY)  # the proxy sends neither
            block += payload
            if flags & F.FLAG_END_HEADERS:
                decoder.decode(block, raw=True)
                block = b""
        if ftype == F.GOAWAY:
            code = F.u32(payload, 4)
            assert code != F.INTERNAL_ERROR, f"the proxy hit an internal error: {payload[8:]!r}"
            assert code == F.NO_ERROR or pos == len(data), (
                "frames after a GOAWAY reporting a connection error"
            )
    if reply.ended == "eof":
        assert pos == len(data), f"the connection ended inside a frame: {data[pos:]!r}"


class Fuzzer:
    """Runs examples against one listener of a running pair and checks the proxies after each.

    Each example is judged only on what it added (connections and streams still held, errors logged), so a
    failure is pinned on the input that caused it, not on every example after it.
    """

    def __init__(self, pair: Pair, listener: Listener, errors: ErrorRecords) -> None:
        self.pair = pair
        self.listener = listener
        self.errors = errors
        self.fuzz_peers: set[object] = set()  # our sockets' addresses, as the proxy sees them
        self.examples = 0

    @property
    def relays(self) -> list[Relay]:
        return [
            r
            for side in (self.pair.client_side, self.pair.server_side)
            for r in (side.proxy.out_relay, side.proxy.in_relay)
            if r is not None
        ]

    def leftovers(self) -> set[str]:
        """Connections from fuzz sockets the proxies still hold, and streams held anywhere (once a fuzz
        connection is closed nothing else is calling, so every stream is a leak)."""
        out = set()
        for relay in self.relays:
            for conn in relay.downstream:
                if peer_of(conn) in self.fuzz_peers:
                    out.add(f"{relay.direction} listener still holds fuzz connection {peer_of(conn)}")
                if conn.closed:  # a TLS transport forgets its peer's address once closed
                    out.add(f"{relay.direction} listener still holds closed connection {id(conn):x}")
                for sid in conn.streams:
                    out.add(f"{relay.direction} listener connection {id(conn):x} holds stream {sid}")
        for side in (self.pair.client_side, self.pair.server_side):
            proxy = side.proxy
            for pool in (proxy.outbound.pool, proxy.inbound.pool if proxy.inbound is not None else None):
                for up in pool.debug() if pool is not None else []:
                    if up["streams"] or up["waiting"]:
                        out.add(f"upstream connection {up}")
        return out

    def check_alive(self, errors_before: int = 0) -> None:
        for side in (self.pair.client_side, self.pair.server_side):
            assert not side.task.done(), f"a proxy task died: {side.task}"
        assert len(self.errors.records) == errors_before, (
            f"the proxy logged errors:\n{self.errors.report(errors_before)}"
        )

    async def settled(self, before: set[str]) -> None:
        await until(
            lambda: not self.leftovers() - before, lambda: "; ".join(sorted(self.leftovers() - before))
        )

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self.listener.open()
        self.fuzz_peers.add(writer.get_extra_info("sockname"))
        return reader, writer

    async def run(self, case: FuzzCase) -> None:
        before, errors_before = self.leftovers(), len(self.errors.records)
        async with asyncio.timeout(EXAMPLE_BUDGET):
            reader, writer = await self.connect()
            reply = Reply()
            sent = asyncio.Event()
            # Read while writing: the proxy's answer is in hand before a hang-up can make the kernel drop it.
            reading = asyncio.create_task(self.read_reply(reader, sent, reply))
            try:
                await self.send(writer, case)
                if case.ending == "half_close" and writer.can_write_eof():
                    with contextlib.suppress(OSError):  # the proxy may have hung up already
                        writer.write_eof()
                if case.ending in ("linger", "half_close"):
                    sent.set()
                    await reading
            finally:
                reading.cancel()
                await asyncio.wait([reading])
                if case.ending == "abort":
                    writer.transport.abort()
                else:
                    writer.close()
            check_reply(reply)
            await self.settled(before)
            self.check_alive(errors_before)
            await self.answers_ping(before)
        self.examples += 1
        if self.examples % LIVENESS_EVERY == 0:
            await still_serving(self.pair)

    async def send(self, writer: asyncio.StreamWriter, case: FuzzCase) -> None:
        data, pos, i = case.data, 0, 0
        try:
            while pos < len(data):
                n = case.chunks[i % len(case.chunks)]
                writer.write(data[pos : pos + n])
                pos, i = pos + n, i + 1
                await writer.drain()
                # One loop turn between chunks: the proxy reads each chunk on its own, so frames (and
                # the preface) arrive split at arbitrary points.
                await asyncio.sleep(0)
        except (ConnectionError, ssl.SSLError):
            pass  # the proxy hung up on us mid-stream: allowed, and its answer is checked all the same

    @staticmethod
    async def read_reply(reader: asyncio.StreamReader, sent: asyncio.Event, reply: Reply) -> None:
        """Collect what the proxy sends until EOF, a reset, or (once we are done sending) a quiet spell."""
        cap: float | None = None
        while True:
            done_sending = sent.is_set()
            if done_sending:
                cap = cap or time.monotonic() + LINGER_CAP
                if time.monotonic() > cap:
                    reply.ended = "quiet"
                    return
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow our cancel when it races a timeout.
                async with asyncio.timeout(QUIET):
                    chunk = await reader.read(1 << 16)
            except TimeoutError:
                if done_sending:
                    reply.ended = "quiet"
                    return
                continue
            except (ConnectionError, ssl.SSLError):
                reply.ended = "reset"
                return
            if not chunk:
                reply.ended = "eof"
                return
            reply.data += chunk

    async def answers_ping(self, before: set[str]) -> None:
        """A fresh connection to the same listener gets its PING answered: the listener still serves."""
        reader, writer = await self.connect()
        try:
            async with asyncio.timeout(PING_BUDGET):
                writer.write(F.PREFACE + F.settings({}) + F.SETTINGS_ACK + F.ping(b"liveness"))
                await writer.drain()
                while True:
                    hi, lo, ftype, flags, _ = F.HEADER.unpack(await reader.readexactly(9))
                    payload = await reader.readexactly((hi << 16) | lo)
                    if ftype == F.PING and flags & F.FLAG_ACK and payload == b"liveness":
                        break
        except TimeoutError:
            raise AssertionError(f"the {self.listener.name} listener stopped answering PING") from None
        finally:
            writer.close()
        await self.settled(before)


def drive(
    loop: asyncio.AbstractEventLoop,
    loop_thread: int,
    strategy: st.SearchStrategy[FuzzCase],
    run: Callable[[FuzzCase], Coroutine[object, object, None]],
) -> None:
    """Hypothesis, in this worker thread, hands each example to the proxies' loop and waits for it from
    outside: a proxy that blocks the loop fails the example instead of freezing the test.

    The first failing input is reported as drawn: shrinking it against a live proxy can run for minutes
    (hypothesis allows itself five), too long for CI. To minimise one locally, set KUBERPC_FUZZ_SHRINK=1.
    """
    failures: dict[FuzzCase, BaseException] = {}
    shrink = os.environ.get("KUBERPC_FUZZ_SHRINK") == "1"

    @settings(FUZZ_SETTINGS, phases=list(Phase) if shrink else [Phase.explicit, Phase.reuse, Phase.generate])
    @given(strategy)
    def example(case: FuzzCase) -> None:
        if case in failures:
            # Hypothesis replays a failure to report it: the same answer, whatever the proxy's state now.
            raise failures[case]
        if any(isinstance(e, LoopBlocked) for e in failures.values()):
            return  # nothing more can be learnt from a stuck loop
        fut = asyncio.run_coroutine_threadsafe(run(case), loop)
        try:
            fut.result(timeout=EXAMPLE_BUDGET + 5)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            frame = sys._current_frames().get(loop_thread)
            stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
            failures[case] = LoopBlocked(f"the event loop was blocked by this input; it was at:\n{stack}")
            raise failures[case] from None
        except BaseException as e:
            failures[case] = e
            raise

    example()


class LoopBlocked(AssertionError):
    """An example did not finish although it bounds its own time: something holds the event loop."""


async def fuzz(
    pair: Pair, listener: Listener, errors: ErrorRecords, strategy: st.SearchStrategy[FuzzCase]
) -> None:
    """Every example, then the proxies as a whole: alive, serving, and back to holding nothing."""
    await still_serving(pair)  # warm: the mesh connection and grpcio's own tasks exist before the baseline
    await until(
        lambda: not pair.client_side.proxy.out_relay.downstream,
        lambda: "the warm-up call's connection to close",
    )
    baseline = len(asyncio.all_tasks())
    fuzzer = Fuzzer(pair, listener, errors)
    await asyncio.to_thread(drive, asyncio.get_running_loop(), threading.get_ident(), strategy, fuzzer.run)
    assert fuzzer.examples >= EXAMPLES // 2, "hypothesis ran too few examples to mean anything"
    await still_serving(pair)
    fuzzer.check_alive()
    mesh = len(pair.client_side.proxy.outbound.pool.debug()) if pair.client_side.proxy.outbound.pool else 0

    def held() -> list[str]:
        out = sorted(fuzzer.leftovers())
        for relay in fuzzer.relays:
            if relay.direction == "outbound" and relay.downstream:
                out.append(f"outbound listener still holds {len(relay.downstream)} connections")
        inbound = pair.server_side.proxy.in_relay
        if inbound is not None and len(inbound.downstream) > mesh:
            out.append(f"inbound listener holds {len(inbound.downstream)} connections, the mesh uses {mesh}")
        if len(asyncio.all_tasks()) > baseline + TASK_SLACK:
            out.append(f"{len(asyncio.all_tasks())} tasks, {baseline} before fuzzing")
        return out

    await until(lambda: not held(), lambda: "; ".join(held()), timeout=10)


# ---- the fuzz tests ------------------------------------------------------------------------------------


async def test_random_bytes_after_the_preface_never_crash_hang_or_leak(
    pair: Pair, listener: Listener, proxy_errors: ErrorRecords
) -> None:
    await fuzz(pair, listener, proxy_errors, RANDOM_BYTES)


async def test_mutated_frame_sequences_never_crash_hang_or_leak(
    pair: Pair, listener: Listener, proxy_errors: ErrorRecords
) -> None:
    await fuzz(pair, listener, proxy_errors, MUTATED_FRAMES)


async def test_random_hpack_blocks_never_crash_hang_or_leak(
    pair: Pair, listener: Listener, proxy_errors: ErrorRecords
) -> None:
    await fuzz(pair, listener, proxy_errors, HPACK_BLOCKS)


# ---- regressions: inputs the fuzzer found ---------------------------------------------------------------
# Found by test_mutated_frame_sequences_never_crash_hang_or_leak (both listeners): a PRIORITY frame of the
# wrong length (RFC 9113 §6.3) on a stream the client never opened is answered with RST_STREAM on that idle
# stream, which §6.4 forbids ("RST_STREAM frames MUST NOT be sent for a stream in the idle state"); a strict
# peer such as `h2` treats that as a connection error and drops every call it has on the connection.
# Acceptable answers: ignore the frame, or a connection error (GOAWAY FRAME_SIZE_ERROR, as `h2` does).


@pytest.mark.parametrize("sid", [7, 3160], ids=["odd-idle", "even"])
async def test_a_malformed_priority_on_an_idle_stream_gets_no_rst_stream(
    listener: Listener, sid: int
) -> None:
    reader, writer = await listener.open()
    writer.write(
        F.PREFACE
        + F.settings({})
        + F.SETTINGS_ACK
        + F.frame(F.PRIORITY, 0, sid, b"\x00" * 4)
        + F.ping(b"12345678")
    )
    await writer.drain()
    seen: list[tuple[int, int]] = []
    try:
        async with asyncio.timeout(5):
            while not seen or seen[-1][0] not in (F.PING, F.GOAWAY):
                hi, lo, ftype, _, stream = F.HEADER.unpack(await reader.readexactly(9))
                await reader.readexactly((hi << 16) | lo)
                seen.append((ftype, stream))
    except asyncio.IncompleteReadError:
        pass  # closed after a connection error: also acceptable
    finally:
        writer.close()
    assert (F.RST_STREAM, sid) not in seen
