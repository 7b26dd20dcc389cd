"""`kuberpc debug`: a proxy's /debug document rendered for a person: who it is, whether it is ready and why
not, its routes, every endpoint with its weight and state (and why it is ejected), its connections and the
SPIFFE identity of each peer.

Pure: a function of the document the proxy served. Tolerates keys it does not know and keys a proxy of another
version lacks (shown as "-"); never invents a value.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from webhook.cli.output import duration


def _get(doc: Mapping[str, Any], *path: str) -> Any:
    cur: Any = doc
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> list[str]:
    cells = [list(headers), *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    return [indent + "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]


def _expiry(iso: object, now: dt.datetime) -> str:
    if not isinstance(iso, str):
        return "-"
    try:
        when = dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    left = (when - now).total_seconds()
    return f"{iso} (in {duration(left)})" if left > 0 else f"{iso} (EXPIRED {duration(-left)} ago)"


def render(doc: Mapping[str, Any], now: dt.datetime) -> list[str]:
    """The lines `kuberpc debug` prints for one proxy's /debug document."""
    pod = _get(doc, "pod") or {}
    where = f"{pod.get('namespace') or '-'}/{pod.get('name') or '-'}"
    lines = [f"Pod:        {where}" + (f" ({pod['ip']})" if pod.get("ip") else "")]
    reasons = _get(doc, "not_ready_because") or []
    ready = _get(doc, "ready")
    lines.append(f"Ready:      {_cell(ready)}" + (f" ({'; '.join(map(str, reasons))})" if reasons else ""))
    ident = _get(doc, "identity")
    if isinstance(ident, Mapping):
        lines.append(f"Identity:   {_cell(ident.get('identity'))} (certificate from {_cell(ident.get('source'))})")
        lines.append(
            f"Certificate: serial {_cell(ident.get('serial'))}, expires {_expiry(ident.get('not_after'), now)}"
        )
        if ident.get("renew_at"):
            lines.append(f"Renewal:    at {ident['renew_at']}, {ident.get('failures', 0)} failure(s) in a row")
        if ident.get("last_failure"):
            lines.append(f"Last renewal failure: {ident['last_failure']}")
    else:
        lines.append("Identity:   - (no workload certificate source: plaintext only)")
    listeners = _get(doc, "listeners") or {}
    if isinstance(listeners, Mapping) and listeners:
        lines.append("Listeners:  " + ", ".join(f"{k} :{v}" for k, v in listeners.items()))

    upstreams = _get(doc, "routes", "upstreams") or {}
    services = _get(doc, "routes", "services") or {}
    lines += ["", "Routes:"]
    if upstreams:
        lines += _table(
            ["LOCAL PORT", "SERVICE"], [[f"127.0.0.1:{port}", target] for port, target in upstreams.items()]
        )
    if services:
        if upstreams:
            lines.append("")
        lines += _table(
            ["SERVICE", "POLICY", "TIMEOUT", "RETRY ON", "ENDPOINTS"],
            [
                [
                    name,
                    s.get("policy"),
                    s.get("timeout"),
                    ",".join(s.get("retry_on") or []) or None,
                    len(s.get("endpoints") or []),
                ]
                for name, s in sorted(services.items())
            ],
        )
    if not upstreams and not services:
        lines.append("  none yet (no Service called, no upstream declared)")

    endpoints = [(name, ep) for name, s in sorted(services.items()) for ep in s.get("endpoints") or []]
    lines += ["", "Endpoints:"]
    if endpoints:
        lines += _table(
            ["SERVICE", "ADDRESS", "POD", "WEIGHT", "STATE", "MTLS", "WHY"],
            [
                [
                    name,
                    f"{ep.get('address')}:{ep.get('port')}",
                    ep.get("pod"),
                    ep.get("weight"),
                    _state(ep),
                    ep.get("tls"),
                    ep.get("why"),
                ]
                for name, ep in endpoints
            ],
        )
    else:
        lines.append("  none")
    ejected = [(name, ep) for name, ep in endpoints if ep.get("state") in ("ejected", "probing")]
    lines.append(f"  {len(ejected)} ejected" + (":" if ejected else ""))
    for name, ep in ejected:
        lines.append(
            f"    {name} {ep.get('address')}:{ep.get('port')}: {ep.get('why') or 'no reason recorded'}"
            f" ({ep.get('ejections_in_a_row', '?')} ejection(s) in a row, back in {ep.get('back_in_s', '?')} s)"
        )

    conns: list[list[object]] = []
    for direction in ("inbound", "outbound"):
        for c in _get(doc, direction, "connections") or []:
            conns.append([f"{direction} (from app)" if direction == "outbound" else "inbound (from peer)", *_conn(c)])
    for c in _get(doc, "upstream_connections") or []:
        conns.append(["to peer", *_conn(c)])
    lines += ["", "Connections:"]
    if conns:
        lines += _table(["KIND", "PEER ADDRESS", "PEER IDENTITY", "STREAMS", "DRAINING"], conns)
    else:
        lines.append("  none")
    calls = [f"{d} {_get(doc, d, 'calls')}" for d in ("outbound", "inbound") if _get(doc, d, "calls") is not None]
    if calls:
        lines.append("  calls so far: " + ", ".join(calls))
    return lines


def _state(ep: Mapping[str, Any]) -> str:
    state = str(ep.get("state") or "-")
    fails = ep.get("consecutive_failures")
    return f"{state} ({fails} failures)" if state == "failing" and fails else state


def _conn(c: Mapping[str, Any]) -> list[object]:
    address = c.get("peer_address") or (c.get("name") if c.get("role") == "client" else None)
    return [address, c.get("peer_identity"), c.get("streams"), c.get("draining")]
