"""Hand-encoded arith protobufs and gRPC length-prefixed framing, so the bench needs no protoc step.

Pure byte functions: no sockets, no generated stubs.
"""

from __future__ import annotations

import struct

_U64 = (1 << 64) - 1


def _varint(n: int) -> bytes:
    # int64 fields encode negatives as 10-byte two's complement varints (protobuf wire format).
    n &= _U64
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(data: bytes) -> dict[int, int]:
    """Varint fields of a message (the only wire type Args and Reply use); raises ValueError otherwise."""
    fields: dict[int, int] = {}
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        if key & 7 != 0:
            raise ValueError(f"field {key >> 3} has wire type {key & 7}, expected varint")
        value, i = _read_varint(data, i)
        fields[key >> 3] = value - (1 << 64) if value >> 63 else value
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated or oversized varint")
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def encode_args(a: int, b: int) -> bytes:
    """`arith.Args{a, b}`; zero fields are omitted as proto3 does."""
    return (b"\x08" + _varint(a) if a else b"") + (b"\x10" + _varint(b) if b else b"")


def decode_args(data: bytes) -> tuple[int, int]:
    f = _fields(data)
    return f.get(1, 0), f.get(2, 0)


def encode_reply(c: int) -> bytes:
    """`arith.Reply{c}`."""
    return b"\x08" + _varint(c) if c else b""


def decode_reply(data: bytes) -> int:
    return _fields(data).get(1, 0)


def frame(message: bytes) -> bytes:
    """One gRPC message on the wire: uncompressed flag, 4-byte big-endian length, payload."""
    return struct.pack(">BI", 0, len(message)) + message
