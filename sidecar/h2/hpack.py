"""HPACK (RFC 7541) header block coding for the relay: one Decoder and one Encoder per connection direction.

Bytes in, header lists out (and back): no frames, no I/O, no HTTP semantics beyond what HPACK needs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Final

from sidecar.h2.huffman import HuffmanDecodeError
from sidecar.h2.huffman import decode as huffman_decode

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "ENCODER_TABLE_SIZE_LIMIT",
    "ENTRY_OVERHEAD",
    "SENSITIVE_NAMES",
    "STATIC_TABLE",
    "UNINDEXED_NAMES",
    "Decoder",
    "Encoder",
    "HPACKError",
    "HeaderListTooLarge",
    "NeverIndexedField",
    "entry_size",
]

# The initial SETTINGS_HEADER_TABLE_SIZE of HTTP/2 (RFC 9113 §6.5.2).
DEFAULT_TABLE_SIZE: Final = 4096
# The encoder never grows its table past this, whatever the peer allows: every entry is kept alive
# per connection, and a peer advertising 4 GiB must not make us hold gigabytes of old headers.
ENCODER_TABLE_SIZE_LIMIT: Final = 65536
# Encoder memo bound: distinct header lists remembered per connection while the table is unchanged.
_ENCODER_MEMO_ENTRIES: Final = 64
# RFC 7541 §4.1: each entry costs its name and value lengths plus 32 octets of bookkeeping.
ENTRY_OVERHEAD: Final = 32
# Decoder memo bounds: blocks longer than this are rarely repeated byte for byte, and the memo is
# emptied when it holds this many blocks, so it stays a few kilobytes per connection.
_MEMO_MAX_BLOCK: Final = 256
_MEMO_MAX_ENTRIES: Final = 32
# Bound on integer continuation bytes: 5 carry 35 bits, enough for any 32-bit size, so a longer
# run can only be an attack on the decoder (RFC 7541 §7.4 lets decoders limit integers).
_MAX_INT_SHIFT: Final = 28
_MAX_INT: Final = (1 << 32) - 1


class HPACKError(Exception):
    """A malformed header block: the connection must end with GOAWAY COMPRESSION_ERROR."""


class HeaderListTooLarge(HPACKError):
    """The decoded list exceeds max_header_list_size (RFC 9113 §6.5.2).

    The whole block was still processed, so the dynamic table is in sync and the connection may
    refuse only the stream.
    """


class NeverIndexedField(tuple[bytes, bytes]):
    """A field the peer sent as never-indexed (RFC 7541 §6.2.3).

    Decoder output marks such fields with this tuple subclass so that the Encoder can honour
    §7.1.3: an intermediary must re-encode them as never-indexed too. It compares equal to the plain
    (name, value) tuple, but hashes apart from it, so that the Encoder's memo (keyed by header lists)
    can never serve a never-indexed field from a plain field's entry.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        return hash((NeverIndexedField, *self))

    def __eq__(self, other: object) -> bool:
        return tuple.__eq__(self, other)


def entry_size(name: bytes, value: bytes) -> int:
    """Size of a table entry and of a field in a header list (RFC 7541 §4.1, RFC 9113 §6.5.2)."""
    return len(name) + len(value) + ENTRY_OVERHEAD


STATIC_TABLE: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""),  # 1
    (b":method", b"GET"),  # 2
    (b":method", b"POST"),  # 3
    (b":path", b"/"),  # 4
    (b":path", b"/index.html"),  # 5
    (b":scheme", b"http"),  # 6
    (b":scheme", b"https"),  # 7
    (b":status", b"200"),  # 8
    (b":status", b"204"),  # 9
    (b":status", b"206"),  # 10
    (b":status", b"304"),  # 11
    (b":status", b"400"),  # 12
    (b":status", b"404"),  # 13
    (b":status", b"500"),  # 14
    (b"accept-charset", b""),  # 15
    (b"accept-encoding", b"gzip, deflate"),  # 16
    (b"accept-language", b""),  # 17
    (b"accept-ranges", b""),  # 18
    (b"accept", b""),  # 19
    (b"access-control-allow-origin", b""),  # 20
    (b"age", b""),  # 21
    (b"allow", b""),  # 22
    (b"authorization", b""),  # 23
    (b"cache-control", b""),  # 24
    (b"content-disposition", b""),  # 25
    (b"content-encoding", b""),  # 26
    (b"content-language", b""),  # 27
    (b"content-length", b""),  # 28
    (b"content-location", b""),  # 29
    (b"content-range", b""),  # 30
    (b"content-type", b""),  # 31
    (b"cookie", b""),  # 32
    (b"date", b""),  # 33
    (b"etag", b""),  # 34
    (b"expect", b""),  # 35
    (b"expires", b""),  # 36
    (b"from", b""),  # 37
    (b"host", b""),  # 38
    (b"if-match", b""),  # 39
    (b"if-modified-since", b""),  # 40
    (b"if-none-match", b""),  # 41
    (b"if-range", b""),  # 42
    (b"if-unmodified-since", b""),  # 43
    (b"last-modified", b""),  # 44
    (b"link", b""),  # 45
    (b"location", b""),  # 46
    (b"max-forwards", b""),  # 47
    (b"proxy-authenticate", b""),  # 48
    (b"proxy-authorization", b""),  # 49
    (b"range", b""),  # 50
    (b"referer", b""),  # 51
    (b"refresh", b""),  # 52
    (b"retry-after", b""),  # 53
    (b"server", b""),  # 54
    (b"set-cookie", b""),  # 55
    (b"strict-transport-security", b""),  # 56
    (b"transfer-encoding", b""),  # 57
    (b"user-agent", b""),  # 58
    (b"vary", b""),  # 59
    (b"via", b""),  # 60
    (b"www-authenticate", b""),  # 61
)
_STATIC_LEN: Final = len(STATIC_TABLE)
_STATIC_SIZES: Final = tuple(len(name) + len(value) + 32 for name, value in STATIC_TABLE)
_FIRST_DYNAMIC: Final = _STATIC_LEN + 1  # HPACK index of the newest dynamic entry

# Credentials: never indexed anywhere on the path, so a compression oracle cannot probe them (§7.1.3).
SENSITIVE_NAMES: Final = frozenset((b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"))
# Values that differ on every call: indexing them would only churn the table and evict useful entries,
# and every insert empties both memos (ours and the next hop's). A per-call deadline, and the trace and
# request ids tracing systems put on every call (W3C, B3, Jaeger, Envoy's, Google's, AWS's).
UNINDEXED_NAMES: Final = frozenset((
    b"grpc-timeout", b"content-length", b"date",
    b"traceparent", b"x-request-id", b"x-client-trace-id", b"b3", b"x-b3-traceid", b"x-b3-spanid",
    b"x-b3-parentspanid", b"uber-trace-id", b"grpc-trace-bin", b"x-cloud-trace-context", b"x-amzn-trace-id",
))

# Encoder look-ups, built once and only read (each Encoder copies the first): exact
# (name, value) -> -(static index), sensitive names left out so that they always take the
# never-indexed path; and name -> lowest static index carrying it.
_STATIC_PAIRS: Final[dict[tuple[bytes, bytes], int]] = {
    field: -index
    for index, field in reversed(list(enumerate(STATIC_TABLE, 1)))
    if field[0] not in SENSITIVE_NAMES
}
_STATIC_NAMES: Final[dict[bytes, int]] = {
    field[0]: index for index, field in reversed(list(enumerate(STATIC_TABLE, 1)))
}

_SHORT_INT: Final[tuple[bytes, ...]] = tuple(bytes((i,)) for i in range(256))


def _encode_int(flags: int, prefix_bits: int, value: int) -> bytes:
    """RFC 7541 §5.1 integer with `flags` in the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return _SHORT_INT[flags | value]
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal_name(name: bytes) -> bytes:
    """The start of a literal without indexing (§6.2.2) of `name`: its static index, or the raw name."""
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return _encode_int(0x00, 4, index)
    return b"\x00" + _encode_int(0, 7, len(name)) + name


# UNINDEXED_NAMES are never inserted into our table, so each one's name is always sent the same way.
_UNINDEXED_PREFIX: Final[dict[bytes, bytes]] = {name: _literal_name(name) for name in UNINDEXED_NAMES}


def _decode_int(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """Continuation bytes of an integer whose prefix was all 1s (`value`); returns (int, next pos).

    Reading past the end raises IndexError, which decode() reports as a truncated block.
    """
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            if value > _MAX_INT:
                raise HPACKError(f"integer {value} exceeds 32 bits")
            return value, pos
        shift += 7
        if shift > _MAX_INT_SHIFT:
            raise HPACKError("integer has too many continuation bytes")


class Decoder:
    """Decodes the header blocks of one direction of one connection; its table follows the peer's Encoder.

    `max_table_size` is the size the peer's encoder starts with as well as the advertised limit: in
    HTTP/2 leave it at 4096 (the peer may send blocks before it sees our SETTINGS) and lower
    `max_allowed_table_size` when a smaller SETTINGS_HEADER_TABLE_SIZE is acknowledged.
    """

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE, max_header_list_size: int = 65536) -> None:
        # What we advertised in SETTINGS_HEADER_TABLE_SIZE. Lower it only once the peer has
        # acknowledged the SETTINGS frame: the next block must then shrink the table (§4.2).
        self.max_allowed_table_size = max_table_size
        self.max_header_list_size = max_header_list_size
        self._max_size = max_table_size
        self._size = 0
        # One list for both tables so an HPACK index is a list index: [0] is unused (index 0 is
        # invalid), [1..61] the static table, then the dynamic table, newest first.
        self._table: list[tuple[bytes, bytes]] = [(b"", b""), *STATIC_TABLE]
        # Each entry's size (RFC 7541 §4.1), index for index: the hot loop adds one number per indexed field
        # to the header list size instead of measuring the field's name and value.
        self._sizes: list[int] = [0, *_STATIC_SIZES]
        # Results of recent blocks that left the table unchanged (no size update, no incremental
        # literal). Such a block's result depends only on its bytes and the table, and every table
        # change empties the memo, so a hit is exactly what decoding again would give. It turns a
        # warm connection's repeated blocks (all indexed fields) into one dict look-up.
        self._memo: dict[bytes, tuple[tuple[tuple[bytes, bytes], ...], int]] = {}

    @property
    def table_size(self) -> int:
        """Current size of the dynamic table (sum of entry sizes)."""
        return self._size

    @property
    def max_table_size(self) -> int:
        """Current maximum size of the dynamic table, as last set by the peer's size update."""
        return self._max_size

    @property
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table entries, newest first (a copy)."""
        return self._table[_FIRST_DYNAMIC:]

    def _resize(self, size: int) -> None:
        if size > self.max_allowed_table_size:
            raise HPACKError(
                f"table size update to {size} above the advertised {self.max_allowed_table_size}"
            )
        self._max_size = size
        self._memo.clear()
        table, sizes = self._table, self._sizes
        while self._size > size:
            table.pop()
            self._size -= sizes.pop()

    def _insert(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        table, sizes = self._table, self._sizes
        if self._memo:
            self._memo.clear()
        if size > self._max_size:
            # §4.4: an entry larger than the table empties it and is not added.
            del table[_FIRST_DYNAMIC:]
            del sizes[_FIRST_DYNAMIC:]
            self._size = 0
            return
        self._size += size
        limit = self._max_size
        while self._size > limit:
            table.pop()
            self._size -= sizes.pop()
        table.insert(_FIRST_DYNAMIC, field)
        sizes.insert(_FIRST_DYNAMIC, size)

    def decode(self, block: bytes | memoryview) -> list[tuple[bytes, bytes]]:
        """Decode one complete header block (HEADERS plus CONTINUATIONs, unpadded).

        Raises HPACKError for any malformed block and HeaderListTooLarge (after updating the table)
        when the list exceeds max_header_list_size. Never-indexed fields come back as
        NeverIndexedField.
        """
        data = bytes(block)
        end = len(data)
        memo = self._memo
        # Length first: hashing a long block that cannot be in the memo would cost more than a miss.
        hit = memo.get(data) if end <= _MEMO_MAX_BLOCK and memo else None
        if hit is not None:
            fields, size = hit
            if self._max_size > self.max_allowed_table_size:
                raise HPACKError(
                    f"table size is {self._max_size} but {self.max_allowed_table_size} was advertised"
                )
            if size > self.max_header_list_size:
                raise HeaderListTooLarge(f"header list size {size} exceeds {self.max_header_list_size}")
            return list(fields)
        table, sizes = self._table, self._sizes
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        list_size = 0
        limit = self.max_header_list_size
        pos = 0
        cacheable = True
        # Bounds are left to IndexError (reading past the block, or an index past the table) and
        # invalid Huffman to HuffmanDecodeError, both turned into HPACKError below: the hot loop
        # then carries no explicit range checks. Python 3.11's try costs nothing when not raised.
        try:
            while pos < end and data[pos] & 0xE0 == 0x20:  # size updates: only at the start (§4.2)
                size = data[pos] & 0x1F
                pos += 1
                if size == 0x1F:
                    size, pos = _decode_int(data, pos, 0x1F)
                self._resize(size)
                cacheable = False
            if self._max_size > self.max_allowed_table_size:
                raise HPACKError(
                    f"table size is {self._max_size} but {self.max_allowed_table_size} was advertised,"
                    " and the block does not begin with a size update"
                )
            while pos < end:
                byte = data[pos]
                pos += 1
                if byte & 0x80:  # §6.1 indexed field
                    index = byte & 0x7F
                    if index == 0x7F:
                        index, pos = _decode_int(data, pos, 0x7F)
                    elif not index:
                        raise HPACKError("indexed field with index 0")
                    list_size += sizes[index]
                    if list_size <= limit:
                        append(table[index])
                    continue
                if byte & 0x40:  # §6.2.1 literal with incremental indexing
                    index = byte & 0x3F
                    if index == 0x3F:
                        # A dynamic-table name (index 63-190) takes one continuation byte: read it here,
                        # since a peer that indexes every field (grpc-go, nghttp2) sends one per literal.
                        if data[pos] < 0x80:
                            index += data[pos]
                            pos += 1
                        else:
                            index, pos = _decode_int(data, pos, 0x3F)
                    incremental = True
                    never = False
                elif byte & 0x20:
                    raise HPACKError("dynamic table size update after the first field")
                else:  # §6.2.2 without indexing (0x00) and §6.2.3 never indexed (0x10)
                    index = byte & 0x0F
                    if index == 0x0F:
                        index, pos = _decode_int(data, pos, 0x0F)
                    incremental = False
                    never = byte & 0x10 != 0
                if index:
                    name = table[index][0]
                else:
                    byte = data[pos]
                    length = byte & 0x7F
                    pos += 1
                    if length == 0x7F:
                        length, pos = _decode_int(data, pos, 0x7F)
                    stop = pos + length
                    if stop > end:
                        raise HPACKError("string length beyond the end of the block")
                    name = data[pos:stop]
                    pos = stop
                    if byte & 0x80:
                        name = huffman_decode(name)
                byte = data[pos]
                length = byte & 0x7F
                pos += 1
                if length == 0x7F:
                    length, pos = _decode_int(data, pos, 0x7F)
                stop = pos + length
                if stop > end:
                    raise HPACKError("string length beyond the end of the block")
                value = data[pos:stop]
                pos = stop
                if byte & 0x80:
                    value = huffman_decode(value)
                field = NeverIndexedField((name, value)) if never else (name, value)
                if incremental:
                    self._insert(field)
                    cacheable = False
                elif cacheable and name in UNINDEXED_NAMES:
                    cacheable = False  # a per-call value: this block will not come again
                list_size += len(name) + len(value) + ENTRY_OVERHEAD
                if list_size <= limit:
                    append(field)
        except IndexError as e:
            raise HPACKError("truncated header block or index beyond the table") from e
        except HuffmanDecodeError as e:
            raise HPACKError(str(e)) from e
        if list_size > limit:
            raise HeaderListTooLarge(f"header list size {list_size} exceeds {limit}")
        if cacheable and end <= _MEMO_MAX_BLOCK:
            if len(memo) >= _MEMO_MAX_ENTRIES:
                memo.clear()
            memo[data] = (tuple(headers), list_size)
        return headers


class Encoder:
    """Encodes the header blocks of one direction of one connection for the peer's Decoder.

    Literal strings are sent without Huffman coding. Both ends of the mesh are this relay, and a
    Huffman-coded 24-byte :path costs ~1.5 us to encode plus ~1 us to decode (bench/hpack_micro.py)
    against a slice for a raw one, to save 7 bytes on loopback or the pod network; repeated values
    are indexed after their first use anyway. The Decoder accepts both forms, as RFC 7541 requires.
    """

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        # The size the peer's decoder starts with (HTTP/2: 4096 until SETTINGS say otherwise).
        self._max_size = max_table_size
        self._size = 0
        # Dynamic table, newest at the left: (name, value, sequence number). The n-th inserted entry
        # has sequence n, so its HPACK index is 62 + (newest sequence - n): indices shift on every
        # insert but the look-up dicts below stay valid without rewriting.
        self._entries: deque[tuple[bytes, bytes, int]] = deque()
        # (name, value) -> newest sequence, or -(static index): one dict, so one hash per field.
        self._pairs: dict[tuple[bytes, bytes], int] = dict(_STATIC_PAIRS)
        self._names: dict[bytes, int] = {}  # name -> newest sequence
        self._seq = 0
        # Size updates owed to the peer at the start of the next block (§4.2): the smallest size
        # set since the last block, then the final one.
        self._pending_min: int | None = None
        # Header list -> block, for lists that left the table unchanged; emptied whenever the table
        # changes (indices shift). Response headers and trailers repeat call after call, so on a busy
        # connection most blocks come from here.
        self._memo: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    @property
    def table_size(self) -> int:
        """Current size of the dynamic table (sum of entry sizes)."""
        return self._size

    @property
    def max_table_size(self) -> int:
        """Current maximum size of the dynamic table."""
        return self._max_size

    @property
    def dynamic_table(self) -> list[tuple[bytes, bytes]]:
        """The dynamic table entries, newest first (a copy)."""
        return [(name, value) for name, value, _ in self._entries]

    def set_max_table_size(self, n: int) -> None:
        """Apply the peer's SETTINGS_HEADER_TABLE_SIZE; the next block starts with the size update(s)."""
        if n < 0:
            raise ValueError(f"table size must not be negative: {n}")
        size = min(n, ENCODER_TABLE_SIZE_LIMIT)
        if size == self._max_size and self._pending_min is None:
            return
        self._pending_min = size if self._pending_min is None else min(self._pending_min, size)
        self._max_size = size
        self._memo.clear()
        self._evict(0)

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until `room` more octets fit."""
        limit = self._max_size - room
        entries = self._entries
        while self._size > limit and entries:
            name, value, seq = entries.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD
            if self._pairs.get((name, value)) == seq:
                del self._pairs[name, value]
            if self._names.get(name) == seq:
                del self._names[name]

    def _insert(self, name: bytes, value: bytes, size: int) -> None:
        self._memo.clear()
        self._evict(size)
        self._seq += 1
        self._entries.appendleft((name, value, self._seq))
        self._pairs[name, value] = self._seq
        self._names[name] = self._seq
        self._size += size

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        """Encode one header list as a complete header block.

        Names must already be lowercase bytes (HTTP/2 requires it; the connection refuses others as malformed).
        """
        key = tuple(headers)
        memo = self._memo
        if memo and self._pending_min is None:
            hit = memo.get(key)
            if hit is not None:
                return hit
        cacheable = self._pending_min is None
        out = bytearray()
        if self._pending_min is not None:
            if self._pending_min < self._max_size:
                out += _encode_int(0x20, 5, self._pending_min)
            out += _encode_int(0x20, 5, self._max_size)
            self._pending_min = None
        pairs = self._pairs
        short = _SHORT_INT
        unindexed = _UNINDEXED_PREFIX
        newest = start = self._seq
        for field in key:
            seq = pairs.get(field)
            if seq is not None and type(field) is not NeverIndexedField:
                index = -seq if seq < 0 else _FIRST_DYNAMIC + newest - seq
                if index < 0x7F:
                    out.append(0x80 | index)
                else:
                    out += _encode_int(0x80, 7, index)
                continue
            prefix = unindexed.get(field[0])
            if prefix is not None and type(field) is not NeverIndexedField:
                # A per-call value (deadline, trace id): its name's representation never changes, since
                # such fields are never inserted; only the value is new.
                value = field[1]
                length = len(value)
                out += prefix
                out += short[length] if length < 0x7F else _encode_int(0, 7, length)
                out += value
                cacheable = False  # this list will not come again
                continue
            name, value = field
            if type(field) is not NeverIndexedField and name not in SENSITIVE_NAMES:
                size = len(name) + len(value) + ENTRY_OVERHEAD
                if size * 4 > self._max_size:
                    flags, prefix_bits = 0x00, 4
                else:
                    flags, prefix_bits = 0x40, 6
            else:
                flags, prefix_bits = 0x10, 4
            name_index = _STATIC_NAMES.get(name)
            if name_index is None:
                seq = self._names.get(name)
                if seq is not None:
                    name_index = _FIRST_DYNAMIC + newest - seq
            if name_index is None:
                out.append(flags)
                length = len(name)
                out += short[length] if length < 0x7F else _encode_int(0, 7, length)
                out += name
            else:
                out += _encode_int(flags, prefix_bits, name_index)
            length = len(value)
            out += short[length] if length < 0x7F else _encode_int(0, 7, length)
            out += value
            if flags == 0x40:
                self._insert(name, value, size)
                newest = self._seq
        block = bytes(out)
        if cacheable and newest == start:
            if len(memo) >= _ENCODER_MEMO_ENTRIES:
                memo.clear()
            memo[key] = block
        return block
