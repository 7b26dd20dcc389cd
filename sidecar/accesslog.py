"""The access log: one bounded JSON line per finished call, written to a stream (the proxy's stdout);
and the record of a call it shares with the tap (tap.py).

Never writes metadata values or message bodies; the relay calls it only when a pod asked for it
(`kuberpc.io/access-log: json` -> KUBERPC_ACCESS_LOG=json), so it costs nothing when off.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Protocol, TypedDict

# A caller chooses the method path and its length: a longer value is cut so that a line stays bounded
# (under ~1 KiB) whatever it sends.
MAX_FIELD = 256
# Lines are batched and written once per event-loop turn. If the stream cannot keep up, at most this
# many wait; later ones are dropped, and the next write says how many with a {"dropped": n} line.
MAX_PENDING = 10_000


class Stream(Protocol):
    def write(self, text: str, /) -> object: ...
    def flush(self) -> object: ...


def _cut(value: str) -> str:
    return value if len(value) <= MAX_FIELD else value[:MAX_FIELD] + "..."


class CallRecord(TypedDict):
    """One finished call as the access log and the tap show it."""

    direction: str
    service: str
    method: str
    grpc_code: int
    duration_ms: float
    request_bytes: int
    response_bytes: int
    peer: str | None
    upstream: str | None


def call_record(
    *,
    direction: str,
    service: str,
    method: str,
    grpc_code: int,
    duration_s: float,
    request_bytes: int,
    response_bytes: int,
    peer: str | None,
    upstream: str | None,
) -> CallRecord:
    """`peer`: the other side's SPIFFE ID (the caller's inbound, the server's outbound) when it has one;
    `upstream`: the endpoint an outbound call went to. Caller-chosen strings are cut to MAX_FIELD."""
    return {
        "direction": direction,
        "service": _cut(service),
        "method": _cut(method),
        "grpc_code": grpc_code,
        "duration_ms": round(duration_s * 1000, 3),
        "request_bytes": request_bytes,
        "response_bytes": response_bytes,
        "peer": _cut(peer) if peer is not None else None,
        "upstream": upstream,
    }


class AccessLog:
    """Collects lines as calls finish and writes them to `stream` in batches."""

    def __init__(self, stream: Stream, *, wall_clock: Callable[[], float] = time.time) -> None:
        self._stream = stream
        self._wall_clock = wall_clock
        self._pending: list[str] = []
        self._scheduled = False
        self.dropped = 0  # lines lost because MAX_PENDING were waiting (since the last report)

    def write(self, record: CallRecord) -> None:
        """One finished call, stamped with the wall-clock time."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        at = dt.datetime.fromtimestamp(self._wall_clock(), dt.UTC).isoformat(timespec="milliseconds")
        self._pending.append(json.dumps({"ts": at.replace("+00:00", "Z"), **record}, separators=(",", ":")))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Write every pending line (and a report of dropped ones)."""
        self._scheduled = False
        lines, self._pending = self._pending, []
        if self.dropped:
            lines.append(json.dumps({"dropped": self.dropped}))
            self.dropped = 0
        if lines:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
