"""h2load command lines for unary gRPC, and the parsing and checking of what h2load reports.

Builds argv and parses text; running the command is the caller's (it must not spawn processes itself).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path


class LoadCheckError(RuntimeError):
    """h2load's counts show a lost, failed or short response: the run is not a measurement."""


@dataclass(frozen=True, slots=True)
class H2loadResult:
    total: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    data_bytes: int
    elapsed_s: float
    rps: float


def command(
    url: str,
    body_file: str,
    authority: str,
    *,
    clients: int,
    streams: int,
    requests: int | None = None,
    duration_s: int | None = None,
    log_file: str | None = None,
    threads: int = 1,
) -> list[str]:
    argv = [
        "h2load",
        "-t",
        str(threads),
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f":authority: {authority}",
        "-d",
        body_file,
    ]
    if requests is not None:
        argv += ["-n", str(requests)]
    if duration_s is not None:
        argv += ["-D", str(duration_s)]
    if log_file is not None:
        argv += [f"--log-file={log_file}"]
    return [*argv, url]


_REQUESTS = re.compile(
    r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_TRAFFIC = re.compile(r"traffic: .*?, \S+ \((\d+)\) data")
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")


def parse(stdout: str) -> H2loadResult:
    """The summary lines of h2load's output; raises LoadCheckError if any is missing."""
    m_req, m_status = _REQUESTS.search(stdout), _STATUS.search(stdout)
    m_traffic, m_fin = _TRAFFIC.search(stdout), _FINISHED.search(stdout)
    if not (m_req and m_status and m_traffic and m_fin):
        raise LoadCheckError(f"unrecognised h2load output:\n{stdout[-2000:]}")
    elapsed = float(m_fin.group(1)) / (1000 if m_fin.group(2) == "ms" else 1)
    total, succeeded, failed, errored, timeout = (int(g) for g in m_req.groups())
    return H2loadResult(
        total=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status_2xx=int(m_status.group(1)),
        data_bytes=int(m_traffic.group(1)),
        elapsed_s=elapsed,
        rps=float(m_fin.group(3)),
    )


def check(result: H2loadResult, expected: int, reply_bytes: int) -> None:
    """Every call answered 2xx with exactly one framed reply's bytes (a gRPC error carries no DATA)."""
    problems = []
    if result.succeeded != expected or result.status_2xx != expected:
        problems.append(f"{result.succeeded} succeeded and {result.status_2xx} 2xx of {expected}")
    if result.failed or result.errored or result.timeout:
        problems.append(f"{result.failed} failed, {result.errored} errored, {result.timeout} timed out")
    if result.data_bytes != expected * reply_bytes:
        problems.append(f"{result.data_bytes} response bytes, expected {expected} x {reply_bytes}")
    if problems:
        raise LoadCheckError("; ".join(problems))


def read_log(path: str) -> list[int]:
    """Per-request durations in µs from h2load's --log-file (start µs, status, duration µs per line)."""
    out = []
    for line in Path(path).read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out.append(int(parts[2]))
    return out


def percentile(values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])
