"""CPU time and resident memory of process trees, read from /proc (Linux only).

Reads /proc and nothing else; it must not signal or start processes.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, int, int]:
    """(ppid, utime, stime) in clock ticks from a /proc/<pid>/stat line.

    The command name may hold spaces and parentheses, so fields are counted after its last ')'.
    """
    rest = text[text.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
    return int(rest[1]), int(rest[11]), int(rest[12])


def parse_rss_kib(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0  # a zombie has no VmRSS line: it holds no memory


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def tree(pid: int) -> list[int]:
    """`pid` and every live descendant (a proxy may fork workers; they count as the proxy)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (text := _read(f"/proc/{entry}/stat")) is not None:
            children.setdefault(parse_stat(text)[0], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the trees rooted at `pids` (threads included: the kernel sums them per process)."""
    ticks = 0
    for root in pids:
        for p in tree(root):
            if (text := _read(f"/proc/{p}/stat")) is not None:
                _, utime, stime = parse_stat(text)
                ticks += utime + stime
    return ticks / CLOCK_TICKS


def cpu_seconds_ns(pid: int) -> float:
    """CPU time of process `pid` (all its threads) from the scheduler's nanosecond clock
    (/proc/<pid>/task/*/schedstat): for a near-idle process, where utime + stime's 10 ms ticks read 0. Threads that
    have exited are not counted (the proxy keeps none that come and go: asyncio's resolver threads live on)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0.0
    for tid in tasks:
        if (text := _read(f"/proc/{pid}/task/{tid}/schedstat")) is not None:
            total += int(text.split()[0])
    return total / 1e9


def rss_kib(pid: int) -> int:
    """VmRSS of the tree rooted at `pid`, in KiB."""
    total = 0
    for p in tree(pid):
        if (text := _read(f"/proc/{p}/status")) is not None:
            total += parse_rss_kib(text)
    return total


class PeakRss:
    """Samples each root's tree RSS every `interval` seconds in a thread; `peak` holds the maximum seen per pid.

    A thread, not a task: the load generators are blocking subprocess calls.
    """

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self.peak: dict[int, int] = dict.fromkeys(pids, 0)

    def _run(self) -> None:
        while True:
            for p in self._pids:
                self.peak[p] = max(self.peak[p], rss_kib(p))
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
