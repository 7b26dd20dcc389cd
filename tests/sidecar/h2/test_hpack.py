"""HPACK: RFC 7541 Appendix C examples, Huffman code, limits, and cross-checks against the `hpack` library."""

from __future__ import annotations

import hpack
import pytest
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.h2 import huffman
from sidecar.h2.hpack import (
    ENCODER_TABLE_SIZE_LIMIT,
    SENSITIVE_NAMES,
    Decoder,
    Encoder,
    HeaderListTooLarge,
    HPACKError,
    NeverIndexedField,
    entry_size,
)

Headers = list[tuple[bytes, bytes]]


def h(text: str) -> bytes:
    """Bytes from an RFC-style hex dump ("8286 8441 ...")."""
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def table_of(*lines: str) -> Headers:
    """Dynamic table entries as the RFC prints them, newest first ("name: value")."""
    split = [line.split(": ", 1) for line in lines]
    return [(name.encode(), value.encode()) for name, value in split]


def pairs(text: str) -> Headers:
    return table_of(*text.strip().splitlines())


# --- RFC 7541 C.1: integers (seen through the size update, a 5-bit prefix) -------------------------


def test_c1_1_integer_10_fits_in_a_5_bit_prefix() -> None:
    decoder = Decoder()
    decoder.decode(bytes([0x20 | 10]))
    assert decoder.max_table_size == 10


def test_c1_2_integer_1337_with_a_5_bit_prefix_decodes_and_encodes() -> None:
    decoder = Decoder()
    decoder.decode(h("3f 9a 0a"))
    assert decoder.max_table_size == 1337
    encoder = Encoder()
    encoder.set_max_table_size(1337)
    assert encoder.encode([]) == h("3f 9a 0a")


# --- RFC 7541 C.2: field representations -----------------------------------------------------------


def test_c2_1_literal_with_indexing_adds_the_field_to_the_table() -> None:
    decoder = Decoder()
    block = h("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572")
    assert decoder.decode(block) == [(b"custom-key", b"custom-header")]
    assert decoder.dynamic_table == [(b"custom-key", b"custom-header")]
    assert decoder.table_size == 55


def test_c2_2_literal_without_indexing_leaves_the_table_empty() -> None:
    decoder = Decoder()
    assert decoder.decode(h("040c 2f73 616d 706c 652f 7061 7468")) == [(b":path", b"/sample/path")]
    assert decoder.dynamic_table == []
    assert decoder.table_size == 0


def test_c2_3_never_indexed_literal_is_marked_and_not_added() -> None:
    decoder = Decoder()
    headers = decoder.decode(h("1008 7061 7373 776f 7264 0673 6563 7265 74"))
    assert headers == [(b"password", b"secret")]
    assert type(headers[0]) is NeverIndexedField
    assert decoder.dynamic_table == []


def test_c2_4_indexed_field_reads_the_static_table() -> None:
    decoder = Decoder()
    assert decoder.decode(h("82")) == [(b":method", b"GET")]
    assert decoder.dynamic_table == []


# --- RFC 7541 C.3 / C.4: requests on one connection ------------------------------------------------

C3_LISTS = [
    pairs(":method: GET\n:scheme: http\n:path: /\n:authority: www.example.com"),
    pairs(":method: GET\n:scheme: http\n:path: /\n:authority: www.example.com\ncache-control: no-cache"),
    pairs(
        ":method: GET\n:scheme: https\n:path: /index.html\n:authority: www.example.com\n"
        "custom-key: custom-value"
    ),
]
C3_TABLES = [
    (table_of(":authority: www.example.com"), 57),
    (table_of("cache-control: no-cache", ":authority: www.example.com"), 110),
    (table_of("custom-key: custom-value", "cache-control: no-cache", ":authority: www.example.com"), 164),
]
C3_BLOCKS = [
    h("8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d"),
    h("8286 84be 5808 6e6f 2d63 6163 6865"),
    h("8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"),
]
C4_BLOCKS = [
    h("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"),
    h("8286 84be 5886 a8eb 1064 9cbf"),
    h("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
]


@pytest.mark.parametrize("blocks", [C3_BLOCKS, C4_BLOCKS], ids=["C.3-plain", "C.4-huffman"])
def test_c3_c4_request_sequence_decodes_with_table_state(blocks: list[bytes]) -> None:
    decoder = Decoder()
    for block, expected, (table, size) in zip(blocks, C3_LISTS, C3_TABLES, strict=True):
        assert decoder.decode(block) == expected
        assert decoder.dynamic_table == table
        assert decoder.table_size == size


def test_c3_request_sequence_is_what_the_encoder_emits() -> None:
    encoder = Encoder()
    for headers, block, (table, size) in zip(C3_LISTS, C3_BLOCKS, C3_TABLES, strict=True):
        assert encoder.encode(headers) == block
        assert encoder.dynamic_table == table
        assert encoder.table_size == size


# --- RFC 7541 C.5 / C.6: responses with a 256-octet table and evictions ----------------------------

C5_LISTS = [
    pairs(
        ":status: 302\ncache-control: private\ndate: Mon, 21 Oct 2013 20:13:21 GMT\n"
        "location: https://www.example.com"
    ),
    pairs(
        ":status: 307\ncache-control: private\ndate: Mon, 21 Oct 2013 20:13:21 GMT\n"
        "location: https://www.example.com"
    ),
    pairs(
        ":status: 200\ncache-control: private\ndate: Mon, 21 Oct 2013 20:13:22 GMT\n"
        "location: https://www.example.com\ncontent-encoding: gzip\n"
        "set-cookie: foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
    ),
]
C5_TABLES = [
    (
        table_of(
            "location: https://www.example.com",
            "date: Mon, 21 Oct 2013 20:13:21 GMT",
            "cache-control: private",
            ":status: 302",
        ),
        222,
    ),
    (
        table_of(
            ":status: 307",
            "location: https://www.example.com",
            "date: Mon, 21 Oct 2013 20:13:21 GMT",
            "cache-control: private",
        ),
        222,
    ),
    (
        table_of(
            "set-cookie: foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1",
            "content-encoding: gzip",
            "date: Mon, 21 Oct 2013 20:13:22 GMT",
        ),
        215,
    ),
]
C5_BLOCKS = [
    h(
        "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133"
        " 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70"
        " 6c65 2e63 6f6d"
    ),
    h("4803 3330 37c1 c0bf"),
    h(
        "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d"
        " 54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049"
        " 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e"
        " 3d31"
    ),
]
C6_BLOCKS = [
    h(
        "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6"
        " 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3"
    ),
    h("4883 640e ffc1 c0bf"),
    h(
        "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab"
        " 77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f"
        " 9587 3160 65c0 03ed 4ee5 b106 3d50 07"
    ),
]


@pytest.mark.parametrize("blocks", [C5_BLOCKS, C6_BLOCKS], ids=["C.5-plain", "C.6-huffman"])
def test_c5_c6_response_sequence_evicts_exactly(blocks: list[bytes]) -> None:
    decoder = Decoder(max_table_size=256)
    for block, expected, (table, size) in zip(blocks, C5_LISTS, C5_TABLES, strict=True):
        assert decoder.decode(block) == expected
        assert decoder.dynamic_table == table
        assert decoder.table_size == size == sum(entry_size(n, v) for n, v in table)


def test_memoryview_blocks_decode_like_bytes() -> None:
    decoder = Decoder()
    assert decoder.decode(memoryview(C4_BLOCKS[0])) == C3_LISTS[0]


# --- Huffman code ----------------------------------------------------------------------------------


def test_huffman_codes_match_rfc_7541_appendix_b_as_shipped_by_hpack() -> None:
    assert list(huffman.CODES) == REQUEST_CODES
    assert list(huffman.CODE_LENGTHS) == REQUEST_CODES_LENGTH


def test_huffman_round_trips_every_byte_value() -> None:
    every = bytes(range(256))
    for data in (every, every[::-1], *(bytes([b]) * 3 for b in range(256))):
        encoded = huffman.encode(data)
        assert len(encoded) == huffman.encoded_length(data)
        assert huffman.decode(encoded) == data


@given(st.binary(max_size=300))
def test_huffman_encoding_matches_hpack_and_round_trips(data: bytes) -> None:
    encoded = huffman.encode(data)
    assert encoded == hpack.huffman.HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert huffman.encoded_length(data) == len(encoded)
    assert huffman.decode(encoded) == data


def test_huffman_empty_string_is_empty() -> None:
    assert huffman.encode(b"") == b""
    assert huffman.decode(b"") == b""


def test_huffman_rejects_eos_inside_a_string() -> None:
    eos_then_a = (((1 << 30) - 1) << 5 | 0b00011) << 5 | 0b11111  # EOS (30 ones), 'a', 5 bits of padding
    with pytest.raises(huffman.HuffmanDecodeError):
        huffman.decode(eos_then_a.to_bytes(5, "big"))


def test_huffman_rejects_padding_longer_than_7_bits() -> None:
    assert huffman.decode(b"\x1f") == b"a"  # 'a' is 00011, padded with three 1s
    with pytest.raises(huffman.HuffmanDecodeError):
        huffman.decode(b"\x1f\xff")


def test_huffman_rejects_padding_that_is_not_all_ones() -> None:
    with pytest.raises(huffman.HuffmanDecodeError):
        huffman.decode(b"\x18")  # 'a' then 000


# --- Decoder validation ----------------------------------------------------------------------------

MALFORMED = {
    "index 0": b"\x80",
    "index past the static table": b"\xbe",
    "name index past the table": b"\x7e\x00",
    "truncated integer": b"\xff\x80",
    "integer with too many continuation bytes": b"\xff" + b"\x80" * 5 + b"\x01",
    "integer above 32 bits": b"\xff\xff\xff\xff\xff\x7f",
    "string longer than the block": b"\x40\x05abc",
    "missing value": b"\x40\x01a",
    "truncated name length": b"\x40",
    "huffman padding not ones": b"\x41\x81\x18",
    "huffman padding over 7 bits": b"\x41\x82\x1f\xff",
    "huffman eos": b"\x41\x84\xff\xff\xff\xff",
    "size update after a field": b"\x82\x20",
    "size update above advertised": b"\x3f\xe2\x1f",
}


@pytest.mark.parametrize("block", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_block_raises_hpack_error(block: bytes) -> None:
    with pytest.raises(HPACKError):
        Decoder().decode(block)


def test_an_uppercase_name_is_decoded_as_sent_for_the_connection_to_refuse_as_malformed() -> None:
    # Valid HPACK; malformed HTTP (RFC 9113 §8.2.1): a stream error, not the connection's COMPRESSION_ERROR.
    assert Decoder().decode(b"\x40\x03Foo\x01x") == [(b"Foo", b"x")]


def test_non_minimal_integer_encodings_are_accepted() -> None:
    assert Decoder().decode(b"\x0f\x80\x80\x80\x00\x01x") == [(b"accept-charset", b"x")]


def test_several_size_updates_at_the_start_are_accepted() -> None:
    decoder = Decoder()
    decoder.decode(C3_BLOCKS[0])
    assert decoder.decode(h("20 3fe1 1f 82")) == [(b":method", b"GET")]
    assert decoder.dynamic_table == []
    assert decoder.max_table_size == 4096


def test_size_update_to_exactly_the_advertised_size_is_accepted() -> None:
    decoder = Decoder(max_table_size=4096)
    decoder.decode(h("3fe1 1f"))
    assert decoder.max_table_size == 4096


def test_lowered_advertised_size_requires_a_size_update_first() -> None:
    decoder = Decoder()
    decoder.max_allowed_table_size = 100
    with pytest.raises(HPACKError):
        decoder.decode(h("82"))
    decoder = Decoder()
    decoder.max_allowed_table_size = 100
    assert decoder.decode(h("3f45 82")) == [(b":method", b"GET")]
    assert decoder.max_table_size == 100


def test_size_update_evicts_oldest_entries() -> None:
    decoder = Decoder(max_table_size=256)
    decoder.decode(C5_BLOCKS[0])
    decoder.decode(bytes([0x20 | 0x1F, 128 - 31]))  # 128: room for the two newest entries only
    assert decoder.dynamic_table == C5_TABLES[0][0][:2]
    assert decoder.table_size == 128


def test_header_list_over_the_limit_raises_after_updating_the_table() -> None:
    decoder = Decoder(max_header_list_size=100)
    with pytest.raises(HeaderListTooLarge):
        decoder.decode(C3_BLOCKS[0])  # 42 + 43 + 38 + 57 octets
    assert decoder.dynamic_table == [(b":authority", b"www.example.com")]
    assert decoder.decode(h("be")) == [(b":authority", b"www.example.com")]


def test_header_list_exactly_at_the_limit_is_accepted() -> None:
    size = sum(entry_size(n, v) for n, v in C3_LISTS[0])
    assert Decoder(max_header_list_size=size).decode(C3_BLOCKS[0]) == C3_LISTS[0]
    with pytest.raises(HeaderListTooLarge):
        Decoder(max_header_list_size=size - 1).decode(C3_BLOCKS[0])


def test_entry_larger_than_the_table_empties_it() -> None:
    decoder = Decoder(max_table_size=256)
    decoder.decode(C5_BLOCKS[0])
    assert decoder.decode(b"\x40\x01x\x7f\x81\x01" + b"v" * 256) == [(b"x", b"v" * 256)]
    assert decoder.dynamic_table == []
    assert decoder.table_size == 0


# --- Decoder memo of blocks that leave the table unchanged -----------------------------------------


def test_repeated_block_decodes_to_a_fresh_equal_list_each_time() -> None:
    decoder = Decoder()
    decoder.decode(C3_BLOCKS[0])
    first = decoder.decode(h("82 86 84 be"))
    first.append((b"x", b"y"))
    assert decoder.decode(h("82 86 84 be")) == C3_LISTS[0]


def test_repeated_block_sees_table_changes_made_since() -> None:
    decoder = Decoder()
    decoder.decode(C3_BLOCKS[0])
    assert decoder.decode(h("be")) == [(b":authority", b"www.example.com")]
    decoder.decode(h("5808 6e6f 2d63 6163 6865"))  # cache-control: no-cache becomes index 62
    assert decoder.decode(h("be")) == [(b"cache-control", b"no-cache")]
    decoder.decode(h("20"))  # size update to 0 empties the table
    decoder.decode(h("3fe1 1f"))
    with pytest.raises(HPACKError):
        decoder.decode(h("be"))


def test_repeated_block_still_obeys_a_lowered_header_list_limit() -> None:
    decoder = Decoder()
    assert decoder.decode(h("82")) == [(b":method", b"GET")]
    decoder.max_header_list_size = 41
    with pytest.raises(HeaderListTooLarge):
        decoder.decode(h("82"))


def test_repeated_block_still_needs_a_size_update_after_a_lowered_advertised_size() -> None:
    decoder = Decoder()
    decoder.decode(h("82"))
    decoder.max_allowed_table_size = 100
    with pytest.raises(HPACKError):
        decoder.decode(h("82"))


def test_repeated_never_indexed_field_stays_marked() -> None:
    decoder = Decoder()
    block = h("1008 7061 7373 776f 7264 0673 6563 7265 74")
    decoder.decode(block)
    (field,) = decoder.decode(block)
    assert type(field) is NeverIndexedField


# --- Encoder strategy ------------------------------------------------------------------------------


def hpack_decode(decoder: hpack.Decoder, block: bytes) -> list[hpack.HeaderTuple]:
    return list(decoder.decode(block, raw=True))


@pytest.mark.parametrize("name", [b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"])
def test_sensitive_fields_are_never_indexed(name: bytes) -> None:
    encoder = Encoder()
    peer = hpack.Decoder()
    for _ in range(2):
        (field,) = hpack_decode(peer, encoder.encode([(name, b"secret")]))
        assert isinstance(field, hpack.NeverIndexedHeaderTuple)
        assert tuple(field) == (name, b"secret")
    assert encoder.dynamic_table == []


def test_never_indexed_input_stays_never_indexed_through_a_relay() -> None:
    decoder = Decoder()
    relayed = decoder.decode(h("1008 7061 7373 776f 7264 0673 6563 7265 74"))
    (field,) = hpack_decode(hpack.Decoder(), Encoder().encode(relayed))
    assert isinstance(field, hpack.NeverIndexedHeaderTuple)


def test_never_indexed_input_is_not_sent_as_a_reference_to_an_equal_entry() -> None:
    encoder, peer = Encoder(), hpack.Decoder()
    hpack_decode(peer, encoder.encode([(b"x-token", b"t")]))
    (field,) = hpack_decode(peer, encoder.encode([NeverIndexedField((b"x-token", b"t"))]))
    assert isinstance(field, hpack.NeverIndexedHeaderTuple)


@pytest.mark.parametrize("name", [b"grpc-timeout", b"content-length", b"date", b"traceparent", b"x-request-id"])
def test_per_call_values_are_sent_without_indexing(name: bytes) -> None:
    encoder = Encoder()
    block = encoder.encode([(name, b"100m")])
    assert block[0] & 0xF0 == 0x00
    assert encoder.dynamic_table == []
    assert hpack_decode(hpack.Decoder(), block) == [(name, b"100m")]


def test_values_over_a_quarter_of_the_table_are_not_indexed() -> None:
    encoder = Encoder(max_table_size=4096)
    encoder.encode([(b"x-big", b"v" * (1024 - 32 - 5 + 1))])
    assert encoder.dynamic_table == []
    encoder.encode([(b"x-big", b"v" * (1024 - 32 - 5))])
    assert encoder.dynamic_table == [(b"x-big", b"v" * (1024 - 32 - 5))]


def test_repeated_list_is_all_single_byte_indexed_fields() -> None:
    encoder = Encoder()
    headers = [(b":method", b"POST"), (b"content-type", b"application/grpc"), (b"te", b"trailers")]
    encoder.encode(headers)
    block = encoder.encode(headers)
    assert len(block) == len(headers)
    assert all(byte & 0x80 for byte in block)


def test_encoder_evicts_oldest_entries_exactly() -> None:
    encoder = Encoder(max_table_size=256)
    for headers in C5_LISTS[:2]:
        encoder.encode([(n, v) for n, v in headers if n != b"date"])
    assert encoder.dynamic_table == [
        (b":status", b"307"),
        (b"location", b"https://www.example.com"),
        (b"cache-control", b"private"),
        (b":status", b"302"),
    ]
    encoder.encode([(b"x-a", b"b" * 29)])  # 64 octets: a quarter of the table, so still indexed
    assert encoder.dynamic_table == [
        (b"x-a", b"b" * 29),
        (b":status", b"307"),
        (b"location", b"https://www.example.com"),
        (b"cache-control", b"private"),
    ]
    assert encoder.table_size == 64 + 42 + 63 + 52


def test_indices_past_126_use_continuation_bytes_both_ways() -> None:
    encoder, decoder, peer = Encoder(max_table_size=8192), Decoder(max_table_size=8192), hpack.Decoder()
    peer.max_allowed_table_size = 8192
    peer.header_table_size = 8192
    many = [(b"x-%d" % i, b"v") for i in range(100)]
    for block in (encoder.encode(many), encoder.encode(many[:2])):
        assert block[0] == 0xFF or block[0] & 0xC0 == 0x40
        assert decoder.decode(block) == [tuple(f) for f in hpack_decode(peer, block)]
    assert decoder.decode(encoder.encode(many[:2])) == many[:2]


def test_table_size_lowered_then_raised_emits_minimum_then_final() -> None:
    encoder = Encoder()
    encoder.encode(C3_LISTS[0])
    encoder.set_max_table_size(0)
    encoder.set_max_table_size(4096)
    assert encoder.dynamic_table == []
    assert encoder.encode([]) == h("20 3fe1 1f")
    assert encoder.encode([]) == b""


def test_table_size_set_to_its_current_value_emits_nothing() -> None:
    encoder = Encoder()
    encoder.set_max_table_size(4096)
    assert encoder.encode([]) == b""


def test_table_size_is_capped_whatever_the_peer_allows() -> None:
    encoder = Encoder()
    encoder.set_max_table_size(2**32 - 1)
    peer = hpack.Decoder()
    peer.max_allowed_table_size = 2**32 - 1
    hpack_decode(peer, encoder.encode([]))
    assert encoder.max_table_size == ENCODER_TABLE_SIZE_LIMIT == peer.header_table_size


def test_negative_table_size_is_refused() -> None:
    with pytest.raises(ValueError):
        Encoder().set_max_table_size(-1)


# --- Cross-checks with the hpack library (hypothesis) -----------------------------------------------

POPULAR_NAMES = [b":method", b":path", b":authority", b":status", b"content-type", b"te", b"user-agent",
                 b"grpc-timeout", b"grpc-status", b"authorization", b"cookie", b"x-custom"]  # fmt: skip
POPULAR_VALUES = [b"", b"POST", b"GET", b"/", b"200", b"application/grpc", b"trailers", b"0", b"1S"]
names = st.one_of(
    st.sampled_from(POPULAR_NAMES),
    st.binary(min_size=1, max_size=20).map(lambda b: b.lower()),
)
values = st.one_of(st.sampled_from(POPULAR_VALUES), st.binary(max_size=40), st.binary(max_size=2000))
header_lists = st.lists(st.tuples(names, values), max_size=12)
# A step is a header list, or a new table size (from the peer's SETTINGS) before the next list.
steps = st.lists(st.one_of(header_lists, st.integers(min_value=0, max_value=8192)), min_size=1, max_size=8)
prop_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@prop_settings
@given(steps)
def test_our_encoder_output_decodes_with_hpack_and_with_ours(sequence: list[Headers | int]) -> None:
    encoder, theirs, ours = Encoder(), hpack.Decoder(max_header_list_size=2**20), Decoder(4096, 2**20)
    for step in sequence:
        if isinstance(step, int):
            encoder.set_max_table_size(step)
            theirs.max_allowed_table_size = ours.max_allowed_table_size = step
            continue
        block = encoder.encode(step)
        decoded = hpack_decode(theirs, block)
        assert [tuple(f) for f in decoded] == step
        assert [isinstance(f, hpack.NeverIndexedHeaderTuple) for f in decoded] == [
            n in SENSITIVE_NAMES for n, _ in step
        ]
        assert ours.decode(block) == step
        assert ours.dynamic_table == encoder.dynamic_table
        assert ours.table_size == encoder.table_size <= encoder.max_table_size


@prop_settings
@given(steps, st.booleans())
def test_hpack_encoder_output_decodes_with_ours(sequence: list[Headers | int], use_huffman: bool) -> None:
    encoder, decoder = hpack.Encoder(), Decoder(4096, 2**20)
    for step in sequence:
        if isinstance(step, int):
            # hpack's Encoder replays every intermediate size and forgets a change back to an
            # unchanged size, so each change is sent in its own (empty) block, as after an ACK.
            encoder.header_table_size = step
            decoder.max_allowed_table_size = step
            step = []
        assert decoder.decode(encoder.encode(step, huffman=use_huffman)) == step
        assert decoder.dynamic_table == list(encoder.header_table.dynamic_entries)


# --- Fuzz: only HPACKError, and no hang ------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_blocks_decode_or_raise_hpack_error(blocks: list[bytes]) -> None:
    decoder = Decoder(max_header_list_size=4096)
    for block in blocks:
        try:
            headers = decoder.decode(block)
        except HPACKError:
            continue
        assert all(type(n) is bytes and type(v) is bytes for n, v in headers)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(C3_BLOCKS + C4_BLOCKS + C5_BLOCKS + C6_BLOCKS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, 200),
)
def test_mutated_blocks_decode_or_raise_hpack_error(
    block: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    mutated = bytearray(block)
    for position, byte in edits:
        mutated[position % len(mutated)] = byte
    for candidate in (bytes(mutated), bytes(mutated[: cut % (len(mutated) + 1)])):
        try:
            headers = Decoder(max_table_size=256).decode(candidate)
        except HPACKError:
            continue
        assert all(type(n) is bytes and type(v) is bytes for n, v in headers)


def test_a_repeated_header_list_is_served_from_the_memo_and_still_decodes() -> None:
    enc = Encoder()
    peer = hpack.Decoder()
    fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-replica", b"a")]
    first = enc.encode(fields)  # inserts x-replica: not memoised
    second = enc.encode(fields)  # all indexed: memoised
    third = enc.encode(list(fields))
    assert third is second
    for block in (first, second, third):
        assert [(bytes(n), bytes(v)) for n, v in peer.decode(block, raw=True)] == fields


def test_the_memo_is_forgotten_when_the_table_changes() -> None:
    enc = Encoder()
    a = [(b"x-a", b"1")]
    enc.encode(a)
    memoised = enc.encode(a)
    enc.encode([(b"x-b", b"2")])  # a new entry: every dynamic index shifts by one
    after = enc.encode(a)
    assert after != memoised
    # A peer that sees every block in order agrees with an encoder that memoises along the way.
    check = hpack.Decoder()
    e2 = Encoder()
    for fields in (a, a, [(b"x-b", b"2")], a, a):
        assert [(bytes(n), bytes(v)) for n, v in check.decode(e2.encode(fields), raw=True)] == fields


def test_a_never_indexed_field_is_not_served_a_plain_fields_memo_entry() -> None:
    enc = Encoder()
    plain = [(b"x-token", b"t")]
    enc.encode(plain)
    enc.encode(plain)  # memoised as an indexed reference
    block = enc.encode([NeverIndexedField((b"x-token", b"t"))])
    assert block[0] & 0xF0 == 0x10  # a never-indexed literal (RFC 7541 §6.2.3), not a table reference


def test_blocks_carrying_a_per_call_value_are_not_memoised_on_either_side() -> None:
    # They never come again: remembering them would only push out the blocks that do.
    enc, dec = Encoder(), Decoder()
    for i in range(3):
        fields = [(b":status", b"200"), (b"x-request-id", b"%d" % i)]
        assert dec.decode(enc.encode(fields)) == fields
    assert enc._memo == {} and dec._memo == {}


@pytest.mark.parametrize("entries", [1, 100, 300])
def test_literals_naming_a_dynamic_entry_decode_at_one_and_two_continuation_bytes(entries: int) -> None:
    # Name indices 62..; 63-190 take one continuation byte after the 6-bit prefix, 191 and up take two.
    enc, dec = hpack.Encoder(), Decoder(max_table_size=65536)
    enc.header_table_size = 65536
    first = [(b"x-name-%03d" % i, b"v") for i in range(entries)]
    assert dec.decode(enc.encode(first)) == first
    again = [(b"x-name-000", b"other"), (b"x-name-%03d" % (entries - 1), b"w")]
    block = enc.encode(again)
    assert block[0] & 0xC0 == 0x40  # literal with incremental indexing, indexed name
    assert dec.decode(block) == again


def test_every_byte_step_of_the_huffman_automaton_matches_a_bit_by_bit_walk_of_the_code_tree() -> None:
    # The byte table is composed from nibble steps; a plain walk of 8 bits is the reference.
    tree = huffman._build_tree()
    dead = len(tree)
    for state in range(len(tree)):
        for byte in range(256):
            node, out = state, b""
            for shift in range(7, -1, -1):
                child = tree[node][(byte >> shift) & 1]
                if child >= 0:
                    node = child
                elif -child - 1 == huffman.EOS:
                    node = dead
                    break
                else:
                    out += bytes((-child - 1,))
                    node = 0
            index = (state << 8) | byte
            assert huffman._NEXT_STATE[index] == node << 8
            if node != dead:  # what a step into the dead state emits is never returned
                assert huffman._EMITTED[index] == out
