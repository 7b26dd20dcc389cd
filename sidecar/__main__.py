"""Entry point: `python -m sidecar run | certs | wait-ready`.

The only reader of os.environ and the only place that installs signal handlers and configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.request

from sidecar import config as config_mod


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _run(_: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(os.environ)
    except config_mod.ConfigError as e:
        print(f"kuberpc-proxy: {e}", file=sys.stderr)
        return 2
    _configure_logging(cfg.log_level)
    from sidecar.app import run  # imported late: `--help` and `certs` stay light

    return run(cfg, install_signals=_install_signals)


def _wait_ready(args: argparse.Namespace) -> int:
    """For the postStart hook of a non-native sidecar: block until the proxy answers /ready."""
    url = f"http://{args.admin}/ready"
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return 0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    print(f"kuberpc-proxy: not ready after {args.timeout}s ({url})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:
        from sidecar.certs import main as certs_main

        return certs_main(argv[1:])
    env_help = "\n".join(f"  {k:34} {v}" for k, v in config_mod.ENV_DOC.items())
    parser = argparse.ArgumentParser(
        prog="python -m sidecar",
        description="kuberpc sidecar proxy: gRPC over mTLS between meshed pods.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n  run          run the proxy (configured by environment)\n"
        "  certs ...    create a local mesh CA and workload certificates (see `certs --help`)\n"
        "  wait-ready   wait until the proxy's /ready answers 200\n\n"
        f"environment (run):\n{env_help}",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the proxy", epilog=f"environment:\n{env_help}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p_run.set_defaults(func=_run)
    sub.add_parser("certs", help="local CA and workload certificates")
    p_wait = sub.add_parser("wait-ready", help="wait until the proxy is ready")
    p_wait.add_argument("--admin", default=f"127.0.0.1:{config_mod.ADMIN_PORT}")
    p_wait.add_argument("--timeout", type=float, default=120.0)
    p_wait.set_defaults(func=_wait_ready)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
