"""One benchmark run: start the shared backend, bring each path up in turn, measure it, tear it down.

Wires processes to measurements; it must not compute ratios or format tables (report.py does).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import certs, configs, grpcwire, measure
from bench.configs import CLIENT_SA, SERVER_SA, Identity
from bench.procs import Started, free_port, http_ok, launched, tcp_accepting

REPO = Path(__file__).resolve().parent.parent
PATHS = ("direct", "kuberpc-1hop", "kuberpc-pair", "envoy-1hop", "envoy-pair", "nginx-1hop")
HOPS = {"direct": 0, "kuberpc-1hop": 1, "envoy-1hop": 1, "nginx-1hop": 1, "kuberpc-pair": 2, "envoy-pair": 2}
# External programs each path needs besides h2load and nginx (the backend), which every path needs.
# The work subdirectories holding each path's proxy logs, quoted when the path fails.
PROXY_DIRS = {"kuberpc-1hop": ("out",), "kuberpc-pair": ("in", "out"),
              "envoy-1hop": ("out",), "envoy-pair": ("in", "out"), "nginx-1hop": ("proxy",)}
EXTRA_TOOLS = {"envoy-1hop": ("envoy",), "envoy-pair": ("envoy",)}


@dataclass(frozen=True, slots=True)
class Tools:
    found: dict[str, str]

    @classmethod
    def discover(cls) -> Tools:
        venv_bin = Path(sys.executable).parent
        found: dict[str, str] = {"python": sys.executable}
        for name in ("h2load", "nginx", "envoy", "taskset", "py-spy"):
            path = shutil.which(name) or next(
                (str(p) for p in (venv_bin / name, Path("/usr/sbin") / name) if p.exists()), None
            )
            if path is not None:
                found[name] = path
        return cls(found)

    def missing(self, path: str) -> list[str]:
        return [t for t in ("h2load", "nginx", *EXTRA_TOOLS.get(path, ())) if t not in self.found]

    def versions(self) -> dict[str, str]:
        argv = {"h2load": ["--version"], "nginx": ["-v"], "envoy": ["--version"]}
        out = {}
        for name, args in argv.items():
            if name in self.found:
                done = subprocess.run([self.found[name], *args], capture_output=True, text=True, timeout=30, check=False)
                m = re.search(r"\d+\.\d+\.\d+", done.stdout + done.stderr)
                out[name] = m.group(0) if m else "unknown"
        return out


@dataclass(frozen=True, slots=True)
class Context:
    work: Path
    tools: Tools
    identities: dict[str, Identity]
    backend_port: int
    load_core: int | None
    proxy_core: int | None


def cores() -> tuple[int | None, int | None]:
    """(load and backend core, proxy core): 0 and 1 where there are two, no pinning on a one-core host."""
    available = sorted(os.sched_getaffinity(0))
    return (available[0], available[1]) if len(available) >= 2 else (None, None)


def _dir(ctx: Context, name: str) -> Path:
    d = ctx.work / name
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def _kuberpc(ctx: Context, name: str, *, inbound: bool, upstream_port: int, upstream_tls: bool,
             identity: Identity, service_account: str, app_port: int | None) -> Iterator[tuple[Started, int, int]]:
    d = _dir(ctx, name)
    endpoints = d / "endpoints.yaml"
    endpoints.write_text(configs.kuberpc_endpoints(upstream_port, upstream_tls))
    outbound, admin = free_port(), free_port()
    inbound_port = free_port() if inbound else None
    env = {**os.environ, **configs.kuberpc_env(
        outbound_port=outbound, inbound_port=inbound_port, admin_port=admin, app_port=app_port,
        endpoints_file=str(endpoints), identity=identity, service_account=service_account)}
    with launched(name, [ctx.tools.found["python"], "-m", "sidecar", "run"], env=env, cwd=str(REPO),
                  ready=http_ok(f"http://127.0.0.1:{admin}/ready"), log_dir=d, core=ctx.proxy_core) as proc:
        yield proc, outbound, inbound_port or 0


@contextmanager
def _envoy(ctx: Context, name: str, config: dict[str, Any], listen_port: int) -> Iterator[Started]:
    d = _dir(ctx, name)
    conf = d / "envoy.json"
    conf.write_text(json.dumps(config, indent=1))
    argv = [ctx.tools.found["envoy"], "-c", str(conf), "--concurrency", "1", "--disable-hot-restart",
            "-l", "warning", "--log-path", str(d / "envoy-app.log")]
    with launched(name, argv, ready=tcp_accepting(listen_port), log_dir=d, core=ctx.proxy_core) as proc:
        yield proc


@contextmanager
def _nginx(ctx: Context, name: str, conf_text: str, listen_port: int, core: int | None) -> Iterator[Started]:
    d = _dir(ctx, name)
    conf = d / "nginx.conf"
    conf.write_text(conf_text)
    argv = [ctx.tools.found["nginx"], "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)]
    with launched(name, argv, ready=tcp_accepting(listen_port), log_dir=d, core=core) as proc:
        yield proc


@contextmanager
def topology(ctx: Context, path: str) -> Iterator[measure.Target]:
    """The processes of `path` on the proxy core, yielding where clients connect and which pids are proxy.

    Process and directory names carry the path, so that every path can run at once (rounds alternate them).
    """
    client_id, server_id = ctx.identities[CLIENT_SA], ctx.identities[SERVER_SA]
    backend = ctx.backend_port
    with ExitStack() as stack:
        if path == "direct":
            yield measure.Target(backend, [])
        elif path == "kuberpc-1hop":
            out, port, _ = stack.enter_context(_kuberpc(
                ctx, f"{path}-out", inbound=False, upstream_port=backend, upstream_tls=False,
                identity=client_id, service_account=CLIENT_SA, app_port=None))
            yield measure.Target(port, [out])
        elif path == "kuberpc-pair":
            # The server side's own outbound listener is unused; its discovery file still names the backend.
            inb, _, in_port = stack.enter_context(_kuberpc(
                ctx, f"{path}-in", inbound=True, upstream_port=backend, upstream_tls=False,
                identity=server_id, service_account=SERVER_SA, app_port=backend))
            out, port, _ = stack.enter_context(_kuberpc(
                ctx, f"{path}-out", inbound=False, upstream_port=in_port, upstream_tls=True,
                identity=client_id, service_account=CLIENT_SA, app_port=None))
            yield measure.Target(port, [out, inb])
        elif path == "envoy-1hop":
            port = free_port()
            out = stack.enter_context(_envoy(ctx, f"{path}-out", configs.envoy_outbound(port, free_port(), backend, None), port))
            yield measure.Target(port, [out])
        elif path == "envoy-pair":
            in_port, port = free_port(), free_port()
            inb = stack.enter_context(_envoy(
                ctx, f"{path}-in", configs.envoy_inbound(in_port, free_port(), backend, server_id), in_port))
            out = stack.enter_context(_envoy(
                ctx, f"{path}-out", configs.envoy_outbound(port, free_port(), in_port, client_id), port))
            yield measure.Target(port, [out, inb])
        elif path == "nginx-1hop":
            port = free_port()
            d = _dir(ctx, f"{path}-proxy")
            out = stack.enter_context(_nginx(ctx, f"{path}-proxy", configs.nginx_proxy(str(d), port, backend), port,
                                             ctx.proxy_core))
            yield measure.Target(port, [out])
        else:
            raise ValueError(f"unknown path {path!r}")


@contextmanager
def backends(work: Path, tools: Tools, core: int | None) -> Iterator[tuple[int, int]]:
    """The nginx fixed-reply backend (Add, and Accumulate passed on) and the raw HTTP/2 streaming app behind it.

    The streaming app (bench.rawapp) answers each message in a few microseconds, so that the stream load
    saturates the proxies rather than the app (a grpcio server managed ~4k calls/s on this core).
    """
    stream_port, port = free_port(), free_port()
    d = work / "backend"
    www = d / "www" / "arith.Arith"
    www.mkdir(parents=True)
    (www / "Add").write_bytes(grpcwire.frame(grpcwire.encode_reply(configs.REPLY_C)))
    (d / "nginx.conf").write_text(configs.nginx_backend(str(d), str(d / "www"), port, stream_port))
    with ExitStack() as stack:
        stack.enter_context(launched(
            "stream-app", [tools.found["python"], "-m", "bench.rawapp", "--port", str(stream_port),
                           "--method", "accumulate"],
            cwd=str(REPO), ready=tcp_accepting(stream_port), log_dir=d, core=core))
        stack.enter_context(launched(
            "nginx-backend", [tools.found["nginx"], "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf")],
            ready=tcp_accepting(port), log_dir=d, core=core))
        yield port, stream_port


def run(
    *, settings: measure.Settings, work: Path, paths: tuple[str, ...], ci: bool, profile_dir: Path | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Measure every path in `paths` in alternating rounds; a path whose tool is missing is skipped (failed
    under CI), a broken one failed (its figures void, the reason recorded, the others still measured)."""
    tools = Tools.discover()
    load_core, proxy_core = cores()
    if load_core is not None:
        # h2load, the load generator (this process), and the backends run here; proxies under taskset -c proxy_core.
        os.sched_setaffinity(0, {load_core})
    work.chmod(0o755)  # nginx workers run as an unprivileged user and must read the reply file below it
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "smoke": settings.saturation_s < 1,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "host": {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                 "load_core": load_core, "proxy_core": proxy_core},
        "tools": tools.versions(),
        "backend_alone": {},
        "paths": {},
    }
    if "h2load" not in tools.found or "nginx" not in tools.found:
        for path in paths:
            results["paths"][path] = _unmeasured(path, tools.missing(path), ci)
        return results
    identities = certs.issue(work / "certs", [CLIENT_SA, SERVER_SA], python=tools.found["python"], cwd=str(REPO))
    measure.write_request(work, *configs.ARGS)
    with backends(work, tools, load_core) as (backend_port, _), ExitStack() as stack:
        ctx = Context(work, tools, identities, backend_port, load_core, proxy_core)
        # The backends alone, on the load core: they must outrun every proxy path by a margin.
        direct = measure.Target(backend_port, [])
        results["backend_alone"] = {
            f"{load}_per_s": round(measure.saturation_rps(direct, work, settings, load), 1) for load in measure.LOADS
        }
        # Every path up at once (idle ones cost their core next to nothing), so that rounds can alternate them.
        targets: dict[str, measure.Target] = {}
        for path in paths:
            if missing := tools.missing(path):
                results["paths"][path] = _unmeasured(path, missing, ci)
                continue
            entry: dict[str, Any] = {"hops": HOPS[path], "status": "ok", "rounds": []}
            results["paths"][path] = entry
            try:
                targets[path] = stack.enter_context(topology(ctx, path))
                entry.update(measure.idle(targets[path]))
            except Exception as e:
                _fail(entry, e, work, path)
                targets.pop(path, None)
        for n in range(settings.rounds):
            # Rotate the order every round, so that no path always runs first (or right after a given one).
            live = [p for p in targets if results["paths"][p]["status"] == "ok"]
            order = live[n % len(live):] + live[: n % len(live)] if live else []
            for load in measure.LOADS:
                for path in order:
                    entry = results["paths"][path]
                    if entry["status"] != "ok":
                        continue
                    try:
                        sample = measure.saturation_sample(load, targets[path], work, settings)
                    except Exception as e:
                        _fail(entry, e, work, path)
                        continue
                    sample.update(round=n, load=load)
                    entry["rounds"].append(sample)
                    log(f"round {n} {load} {path}: {sample['us_per_call']} us/call, busy {sample['core_busy']}, "
                        f"{sample['rate']}/s, rejected {sample['rejected']}")
            for path in order:
                entry = results["paths"][path]
                if entry["status"] != "ok":
                    continue
                try:
                    entry.setdefault("pingpong_rounds", []).append(measure.pingpong(targets[path], work, settings))
                except Exception as e:
                    _fail(entry, e, work, path)
        for path, target in targets.items():
            entry = results["paths"][path]
            if entry["status"] != "ok":
                continue
            try:
                entry["rate"] = measure.paced_latency(target, settings)
                if profile_dir is not None and "py-spy" in tools.found:
                    entry["profiles"] = measure.profile(target, work, settings, py_spy=tools.found["py-spy"],
                                                        out_dir=profile_dir, label=path)
            except Exception as e:
                _fail(entry, e, work, path)
            log(f"{path}: {entry['status']}")
    return results


def _fail(entry: dict[str, Any], e: Exception, work: Path, path: str) -> None:
    # StartError, LoadCheckError, LoadError, VerifyError, a timeout: the path's figures are void, the reason
    # is recorded, and the other paths are still measured in this run.
    entry.update(status="failed", reason=f"{type(e).__name__}: {e}"[:4000] + _log_tails(work, path))


def _log_tails(work: Path, path: str, lines: int = 15) -> str:
    out = []
    for name in PROXY_DIRS.get(path, ()):
        for log in sorted((work / f"{path}-{name}").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"\n--- {name}/{log.name} (last {len(text)} lines)\n" + "\n".join(text))
    return "".join(out)


def _unmeasured(path: str, missing: list[str], ci: bool) -> dict[str, Any]:
    reason = f"missing tool(s): {', '.join(missing)}"
    return {"hops": HOPS[path], "status": "failed" if ci else "skipped", "reason": reason}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
