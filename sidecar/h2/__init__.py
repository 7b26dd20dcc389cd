"""HTTP/2 (RFC 9113) and HPACK (RFC 7541) for the relay: framing and header coding, no routing."""
