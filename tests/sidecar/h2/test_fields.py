"""The header-list checks of RFC 9113 §8.2-8.3, as pure functions (the conformance tests drive them over the wire)."""

from __future__ import annotations

import pytest

from sidecar.h2.fields import Malformed, check_request, check_response, check_trailers

GRPC = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"), (b":authority", b"a"), (b"te", b"trailers")]


def test_a_grpc_request_is_well_formed_and_has_no_content_length() -> None:
    assert check_request(GRPC) == -1


def test_a_request_content_length_is_returned() -> None:
    assert check_request([*GRPC, (b"content-length", b"42")]) == 42


def test_a_connect_request_carries_only_method_and_authority() -> None:
    assert check_request([(b":method", b"CONNECT"), (b":authority", b"a:443")]) == -1
    with pytest.raises(Malformed):
        check_request([(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")])
    with pytest.raises(Malformed):
        check_request([(b":method", b"CONNECT")])


def test_two_different_content_lengths_are_malformed_and_two_equal_ones_are_not() -> None:
    assert check_request([*GRPC, (b"content-length", b"3"), (b"content-length", b"3")]) == 3
    with pytest.raises(Malformed):
        check_request([*GRPC, (b"content-length", b"3"), (b"content-length", b"4")])


def test_a_response_may_not_carry_a_second_pseudo_header() -> None:
    assert check_response([(b":status", b"200"), (b"content-length", b"5")]) == 5
    with pytest.raises(Malformed):
        check_response([(b":status", b"200"), (b":status", b"204")])


def test_trailers_carry_no_pseudo_header_and_no_connection_field() -> None:
    check_trailers([(b"grpc-status", b"0"), (b"x-custom-bin", b"AAE=")])
    for bad in ((b":status", b"200"), (b"connection", b"close"), (b"Grpc-Status", b"0")):
        with pytest.raises(Malformed):
            check_trailers([bad])
