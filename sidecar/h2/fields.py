"""Well-formedness of HTTP/2 header lists (RFC 9113 §8.2-8.3): requests, responses and trailers.

Pure checks on decoded header lists, one pass each; the connection turns a `Malformed` into the stream error
the RFC names. It knows nothing of gRPC: which requests the relay accepts is the relay's business.
"""

from __future__ import annotations

import re

Headers = list[tuple[bytes, bytes]]


class Malformed(Exception):
    """The header list makes the message malformed (§8.1.1): a stream error of type PROTOCOL_ERROR."""


# §8.2.2: fields that only mean something to one HTTP/1.1 connection; `te` is allowed, as `trailers` only.
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})

# Names a gRPC call carries: a set lookup settles them, so only other names pay for the full check below.
_KNOWN_GOOD = frozenset(
    {
        b"content-type",
        b"user-agent",
        b"grpc-timeout",
        b"grpc-encoding",
        b"grpc-accept-encoding",
        b"grpc-status",
        b"grpc-message",
        b"grpc-status-details-bin",
        b"grpc-previous-rpc-attempts",
        b"accept-encoding",
        b"content-encoding",
        b"date",
        b"server",
        b"traceparent",
        b"tracestate",
        b"x-request-id",
    }
)
# §8.2.1: a field name is a token in lowercase (RFC 9110 §5.1, tchar minus A-Z).
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9a-z]|^$").search


def _content_length(value: bytes, seen: int) -> int:
    if not value.isdigit() or len(value) > 18:
        raise Malformed(f"content-length {value[:32]!r} is not a number")
    n = int(value)
    if seen >= 0 and n != seen:
        raise Malformed("two different content-length values")
    return n


def _regular(name: bytes, value: bytes, length: int) -> int:
    """A regular field not in `_KNOWN_GOOD`: its name and meaning. Returns the content-length so far."""
    if name[:1] == b":":
        raise Malformed(f"pseudo-header {name[:64]!r} after a regular field, or in trailers")
    if _BAD_NAME(name) is not None:
        raise Malformed(f"invalid field name {name[:64]!r}")
    if name in CONNECTION_SPECIFIC:
        raise Malformed(f"connection-specific field {name!r}")
    if name == b"te":
        if value != b"trailers":
            raise Malformed("te other than trailers")
    elif name == b"content-length":
        return _content_length(value, length)
    return length


# A request's pseudo-headers by slot in check_request's list; the names gRPC sends settle in one dict lookup.
_METHOD, _SCHEME, _PATH, _AUTHORITY = 1, 2, 3, 4
_KIND = dict.fromkeys(_KNOWN_GOOD, 0) | {b":method": _METHOD, b":scheme": _SCHEME, b":path": _PATH, b":authority": _AUTHORITY}
_kind = _KIND.get


def check_request(headers: Headers) -> int:
    """Raises Malformed unless `headers` is a well-formed request (§8.3.1); returns its content-length
    (-1: none). CONNECT (§8.5) carries only :method and :authority.

    One pass and one dict lookup per field: this runs for every call the proxy relays."""
    length = -1
    pseudo: list[bytes | None] = [None, None, None, None, None]
    regular = False
    for name, value in headers:
        kind = _kind(name, -1)
        if kind == 0:
            regular = True
        elif kind > 0:
            if regular:
                raise Malformed(f"pseudo-header {name.decode()} after a regular field")
            if pseudo[kind] is not None:
                raise Malformed(f"duplicate {name.decode()}")
            pseudo[kind] = value
        elif name == b"te" and value == b"trailers":
            regular = True
        else:
            if name[:1] == b":" and not regular:
                raise Malformed(f"pseudo-header {name[:64]!r} is not one of a request")
            regular = True
            length = _regular(name, value, length)
    method = pseudo[_METHOD]
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT":
        if pseudo[_PATH] is not None or pseudo[_SCHEME] is not None or pseudo[_AUTHORITY] is None:
            raise Malformed("CONNECT with :path or :scheme, or without :authority")
    elif not pseudo[_PATH] or pseudo[_SCHEME] is None:
        raise Malformed("no :scheme, or no or an empty :path")
    return length


def check_response(headers: Headers) -> int:
    """Raises Malformed unless `headers` is a well-formed response header section (§8.3.2, :status first and
    only); returns its content-length (-1: none)."""
    length = -1
    for name, value in headers[1:]:
        if name not in _KNOWN_GOOD:
            length = _regular(name, value, length)
    return length


def check_trailers(headers: Headers) -> None:
    """Raises Malformed unless `headers` is a well-formed trailer section (§8.1: no pseudo-header)."""
    for name, value in headers:
        if name not in _KNOWN_GOOD:
            _regular(name, value, -1)
