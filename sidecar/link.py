"""What the mesh knows about one HTTP/2 connection, kept on it as the codec's `Connection.link`.

Plain values, filled in by whoever learns them (the pool, the listeners, the directions); no I/O, no decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.identity import SpiffeId
from sidecar.model import Catalog, Endpoint, ServiceKey


@dataclass(frozen=True, slots=True)
class Verdict:
    """The authorization of one call: the Service it counts against (metrics label) and, if refused, why.

    Decided by inbound.authorize; defined here because a connection remembers the verdicts given to its peer.
    """

    service: str
    refusal: str | None = None


# Inbound: the verdicts given to a connection's peer, by the call's (authority, path), and the catalog they
# were decided on (they hold while it is the current one).
VerdictMemo = tuple[Catalog, dict[tuple[str | None, str], Verdict]]


@dataclass(slots=True)
class Link:
    """One connection's facts, as far as the mesh has learnt them (None: not known, or not relevant)."""

    endpoint: Endpoint | None = None  # client role: the endpoint dialled
    upstream: ServiceKey | None = None  # a dedicated outbound port's listener: the Service it stands for
    peer_id: SpiffeId | None = None  # the peer's identity, from its verified certificate
    error: str | None = None  # why the connection failed (connect, peer identity, closed by us), for its calls
    verdicts: VerdictMemo | None = None
