"""Loopback port numbers for listeners that need a fixed number (an upstream's local port, an address a child
process is told to bind) before anything binds it.

Binding port 0 and closing returns a port from the kernel's ephemeral range, which any outgoing connection of the
suite can take before the listener binds it; a fixed number inside that range (the suite had 39517-39520) collides
the same way. CI failed on exactly that ("address already in use"). So hand out numbers *below* the ephemeral range,
where the kernel never places a connection's local port, each checked free by binding it and never handed out twice
in one run."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()
_FALLBACK_EPHEMERAL_LOW = 32768


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that is free now, outside the ephemeral range, and not returned before in this run."""
    high = _ephemeral_low() - 1
    if high < 2048:  # an ephemeral range starting this low leaves no room below it: use the top of the ports
        high = 65535
    low = max(1024, high - 12000)
    rng = random.Random()
    for _ in range(500):
        port = rng.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high} on {host} after 500 tries")


def dead_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (a dead app or proxy), which no listener of this run will be given either."""
    return free_port(host)
