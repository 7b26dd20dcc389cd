"""Where to connect or listen: one `Address` and one `host:port` parser, shared by the proxy's configuration and
the injector's (webhook/config.py validates identityAddr and discoveryAddr with the parser the proxy will use on
the value it injects, so the injector never accepts an address the proxy would refuse).

A contract module: pure values and parsing, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[^:\s]*)):(?P<port>\d{1,5})$")
# Used with fullmatch (`$` would also match before a trailing newline).
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*")


def is_host_name(text: str) -> bool:
    """An RFC 1123 host name (labels of letters, digits and inner hyphens, 253 characters at most)."""
    return _HOSTNAME.fullmatch(text) is not None


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not text.isdigit() or not low <= int(text) <= 65535:
        raise ValueError(f"{text!r} is not a port ({low}-65535)")
    return int(text)


def parse_address(text: str) -> Address:
    """A listener address; an empty host listens on every address, port 0 binds any free port (tests)."""
    m = _HOSTPORT.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not host:port")
    host = m.group("v6") or m.group("host") or "0.0.0.0"
    return Address(host, parse_port(m.group("port"), allow_zero=True))


def parse_dial_address(text: str) -> Address:
    """A host name or IP and a port (1-65535) to connect to."""
    m = _HOSTPORT.match(text.strip())
    if not m or not (m.group("v6") or m.group("host")):
        raise ValueError(f"{text!r} is not host:port")
    host = m.group("v6") or m.group("host")
    if not m.group("v6") and not is_host_name(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    try:
        return Address(host, parse_port(m.group("port")))
    except ValueError as e:
        raise ValueError(f"{text!r}: {e}") from e
