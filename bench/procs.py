"""Starting, readiness-polling and stopping the processes of a path (proxies, backends), pinned to a core.

Owns process lifetimes only; it must not measure load (measure.py does) or render configs.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class StartError(RuntimeError):
    """A process exited or never became ready; carries the tail of its log."""


@dataclass(frozen=True, slots=True)
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    startup_s: float
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


def free_port() -> int:
    """A loopback port the kernel just handed out (closed again; the brief race is harmless on a quiet host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tcp_accepting(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    return check


def http_ok(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""


@contextmanager
def launched(
    name: str,
    argv: list[str],
    *,
    ready: Callable[[], bool],
    log_dir: Path,
    core: int | None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    deadline_s: float = 20.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Started]:
    """Start `argv` (under `taskset -c core`), poll `ready` until it holds, yield, then SIGTERM (SIGKILL after 5 s).

    startup_s runs from just before exec to the first successful `ready()`, polled every millisecond.
    """
    full = ["taskset", "-c", str(core), *argv] if core is not None else argv
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        start = clock()
        popen = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        while not ready():
            if popen.poll() is not None:
                raise StartError(f"{name} exited with {popen.returncode}:\n{_tail(log)}")
            if clock() - start > deadline_s:
                raise StartError(f"{name} not ready after {deadline_s:.0f} s:\n{_tail(log)}")
            time.sleep(0.001)
        yield Started(name, popen, clock() - start, log)
    finally:
        stop(popen, grace_s=5)


def stop(popen: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if `popen` has not exited within `grace_s`; returns once it has exited."""
    if popen.poll() is not None:
        return
    popen.terminate()
    try:
        popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=5)
