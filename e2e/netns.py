"""Linux network namespaces as stand-in pods: a node namespace with a bridge, pods wired to it, processes in them.

It must not change the root namespace (interfaces, addresses, routes), nor remove a namespace an alive run owns.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# Every namespace this module creates starts with PREFIX and ends with `-<owner pid>-<4 hex>`, so a later
# run can tell a crashed run's leftovers (owner gone) from a concurrent run's namespaces (owner alive).
PREFIX = "kpod-"
BRIDGE = "kbr0"
POD_IFACE = "eth0"
IFNAMSIZ = 15  # the kernel's limit on interface names (16 bytes with the NUL)
IP_TIMEOUT = 10.0  # seconds one `ip` command may take
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?$")


class NetnsError(RuntimeError):
    """An `ip` command failed or the topology asked for is impossible; the message says which."""


def find_ip() -> str | None:
    """Path of iproute2's `ip`, also where /usr/sbin is not on PATH (non-root shells on Debian)."""
    found = shutil.which("ip")
    if found is not None:
        return found
    for candidate in ("/usr/sbin/ip", "/sbin/ip"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here (for a test's skip or failure), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if find_ip() is None:
        return "needs iproute2's `ip` (Debian: apt-get install iproute2; `make tools` installs it)"
    return None


def _ip_binary() -> str:
    path = find_ip()
    if path is None:
        raise NetnsError("iproute2's `ip` is not installed (Debian: apt-get install iproute2)")
    return path


def ip(*args: str, check: bool = True) -> str:
    """Run `ip ARGS`; return its stdout. Raises NetnsError with the command and its stderr on failure."""
    argv = [_ip_binary(), *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`{' '.join(argv)}` took more than {IP_TIMEOUT:.0f}s") from e
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed (status {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def new_run_id() -> str:
    """`<pid>-<4 hex>`: unique per run, and names the process whose death makes the namespaces leftovers."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def list_netns() -> list[str]:
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL what still runs in `netns` (each by pid): a namespace lives on, unnamed, while a process holds it."""
    for pid in ip("netns", "pids", netns, check=False).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def delete_netns(netns: str) -> None:
    """Kill what runs inside, then delete the namespace (its veth ends, and so their peers, go with it)."""
    _kill_inside(netns)
    ip("netns", "delete", netns)


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces of earlier runs whose owner process is gone (crashed runs); return their names."""
    owned = re.compile(rf"^{re.escape(prefix)}[a-z0-9-]+-(?P<pid>\d+)-[0-9a-f]{{4}}$")
    removed: list[str] = []
    for name in list_netns():
        m = owned.match(name)
        if m is None or _alive(int(m["pid"])):
            continue
        delete_netns(name)
        removed.append(name)
    return removed


@dataclass(frozen=True, slots=True)
class Pod:
    """One pod: a network namespace whose `eth0` has `address` on the cluster's bridge, and `lo` up."""

    name: str
    netns: str
    address: str


class Cluster:
    """A node namespace holding bridge `kbr0` (the subnet's first address) and pods attached to it.

    The bridge lives in its own namespace rather than the root one so that nothing of the host changes and
    concurrent runs cannot clash. Pods get no default route: traffic can only reach the other pods.
    Use as a context manager: everything created is removed on exit, whatever happened.
    """

    def __init__(
        self, *, subnet: str = "198.51.100.0/24", run_id: str | None = None, prefix: str = PREFIX
    ) -> None:
        self.network = ipaddress.ip_network(subnet)
        self.run_id = run_id or new_run_id()
        self.prefix = prefix
        self.gateway = str(next(self.network.hosts()))
        self.node = f"{prefix}node-{self.run_id}"
        self.pods: dict[str, Pod] = {}
        self._created: list[str] = []

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        ip("netns", "add", name)
        self._created.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def start(self) -> None:
        self._add_netns(self.node)
        ip("-n", self.node, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", self.node, "addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", BRIDGE)
        ip("-n", self.node, "link", "set", BRIDGE, "up")

    def add_pod(self, name: str, address: str) -> Pod:
        """A namespace `<prefix><name>-<run id>` with `eth0` at `address`, its veth peer enslaved to the bridge."""
        if not _DNS_LABEL.match(name):
            raise NetnsError(f"pod name {name!r} is not a short DNS label")
        if name in self.pods:
            raise NetnsError(f"pod {name!r} exists already")
        addr = ipaddress.ip_address(address)
        if addr not in self.network.hosts() or str(addr) == self.gateway:
            raise NetnsError(
                f"{address} is not a free host address of {self.network} (gateway {self.gateway})"
            )
        if any(p.address == str(addr) for p in self.pods.values()):
            raise NetnsError(f"{address} is taken")
        netns = f"{self.prefix}{name}-{self.run_id}"
        # The node end lives only in the node namespace, so a short name unique there is enough.
        node_end = f"kv{len(self.pods)}"
        assert len(node_end) <= IFNAMSIZ
        self._add_netns(netns)
        ip(
            "-n",
            self.node,
            "link",
            "add",
            node_end,
            "type",
            "veth",
            "peer",
            "name",
            POD_IFACE,
            "netns",
            netns,
        )
        ip("-n", self.node, "link", "set", node_end, "master", BRIDGE, "up")
        ip("-n", netns, "addr", "add", f"{addr}/{self.network.prefixlen}", "dev", POD_IFACE)
        ip("-n", netns, "link", "set", POD_IFACE, "up")
        pod = Pod(name, netns, str(addr))
        self.pods[name] = pod
        return pod

    def close(self) -> None:
        """Delete every namespace created (pods first, then the node); raise the first failure at the end."""
        failures: list[NetnsError] = []
        for name in reversed(self._created):
            try:
                delete_netns(name)
            except NetnsError as e:
                failures.append(e)
        self._created.clear()
        self.pods.clear()
        if failures:
            raise failures[0]


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """`ip netns exec NETNS ARGV...`: ip execs the command, so the pid is the command's own."""
    return [_ip_binary(), "netns", "exec", netns, *argv]


@dataclass
class NetnsProcess:
    """A long-running process inside a namespace; stderr (and stdout unless piped) go to files."""

    name: str
    popen: subprocess.Popen[bytes]
    stderr_path: Path
    stdout_path: Path | None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> int:
        """SIGKILL (a crash, as far as peers can tell) and reap; returns the exit status."""
        if self.alive():
            self.popen.kill()
        return self.popen.wait()

    def wait_for_line(self, prefix: str, *, timeout: float) -> str:
        """The first stdout line starting with `prefix` (stdout must be piped); NetnsError on exit or timeout."""
        stream = self.popen.stdout
        if stream is None:
            raise NetnsError(f"{self.name}: stdout is not piped")
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(stream, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = stream.readline().decode(errors="replace")
                if not line:
                    raise NetnsError(
                        f"{self.name} exited (status {self.popen.wait()}) before printing {prefix!r}"
                    )
                if line.startswith(prefix):
                    return line.rstrip("\n")
        raise NetnsError(f"{self.name} printed no {prefix!r} line within {timeout:.0f}s")


def spawn(
    netns: str,
    argv: Sequence[str],
    *,
    name: str,
    log_dir: Path,
    env: Mapping[str, str],
    cwd: Path,
    pipe_stdout: bool = False,
) -> NetnsProcess:
    """Start `argv` inside `netns`; stderr to `log_dir/<name>.stderr`, stdout to `.stdout` or a pipe."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / f"{name}.stderr"
    stdout_path = None if pipe_stdout else log_dir / f"{name}.stdout"
    with contextlib.ExitStack() as files:  # the child keeps its own copies of the descriptors
        err = files.enter_context(stderr_path.open("wb"))
        out = subprocess.PIPE if stdout_path is None else files.enter_context(stdout_path.open("wb"))
        popen = subprocess.Popen(
            exec_argv(netns, argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    return NetnsProcess(name, popen, stderr_path, stdout_path)


def run(
    netns: str, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run a short command inside `netns` to completion (killed after `timeout` seconds); never raises on status."""
    try:
        return subprocess.run(
            exec_argv(netns, argv),
            cwd=cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"`{' '.join(argv)}` in {netns} took more than {timeout:.0f}s") from e


def stop(processes: Iterable[NetnsProcess], *, timeout: float) -> None:
    """SIGTERM every live process, give them `timeout` seconds together, then SIGKILL the rest; reap all."""
    procs = list(processes)
    for p in procs:
        if p.alive():
            p.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait()
        finally:
            if p.popen.stdout is not None:
                p.popen.stdout.close()
