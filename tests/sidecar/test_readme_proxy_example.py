"""The README's "A proxy by hand" example works as written: its certificate commands, its env file and
its endpoints file start a proxy that carries a call to the plain gRPC server the endpoints file names.

Only what a test must change is changed: listeners on port 0 (parallel runs) and the backend's port.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import grpc
import pytest
import yaml

from sidecar import config
from sidecar.app import Proxy, serve
from sidecar.certs import main as certs_main
from tests.sidecar.harness import GRPC_OPTIONS, Backend, backend

__all__ = ["backend"]  # fixture used below

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    """The fenced block right after `<!-- example: NAME -->` in the README."""
    match = re.search(
        rf"<!-- example: {re.escape(name)} -->\n```\w*\n(.*?)\n```", README.read_text(), re.DOTALL
    )
    assert match is not None, f"README has no example {name}"
    return match[1]


def env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines; '#' comments and blank lines ignored (what `env $(grep -v '^#' f | xargs)` does)."""
    pairs = [line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return {k: v for k, v in pairs}


def test_the_example_env_file_sets_only_documented_variables() -> None:
    assert env_file(example("proxy.env")).keys() <= config.ENV_DOC.keys()


def test_the_example_endpoints_file_parses_without_a_problem() -> None:
    from sidecar.discovery.file import parse_endpoints_file

    catalog, problems = parse_endpoints_file(example("endpoints.yaml"), namespace="default")

    assert problems == []
    assert [str(key) for key in catalog.services] == ["arith.default"]


def prepare_files(backend_port: int) -> None:
    """In the current directory: the certificates of the README's commands and its endpoints file,
    pointed at the test's backend."""
    for line in example("commands").splitlines():
        if line.startswith("python -m sidecar certs "):
            assert certs_main(shlex.split(line)[4:]) == 0, line
    endpoints = yaml.safe_load(example("endpoints.yaml"))
    endpoints["services"][0]["endpoints"][0]["port"] = backend_port
    Path("endpoints.yaml").write_text(yaml.safe_dump(endpoints))


async def test_a_proxy_started_from_the_readme_files_carries_a_call(
    backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    prepare_files(backend.port)
    environ = env_file(example("proxy.env")) | {
        "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0",
        "KUBERPC_ADMIN_ADDR": "127.0.0.1:0",
    }

    stop = asyncio.Event()
    started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config.load(environ), stop=stop, started=started))
    try:
        done, _ = await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert started in done, task.result() if task in done else "the proxy did not start within 20 s"
        target = f"127.0.0.1:{started.result().bound_port('outbound')}"
        options = [*GRPC_OPTIONS, ("grpc.default_authority", "arith.default:50051")]
        async with grpc.aio.insecure_channel(target, options=options) as ch:
            reply = await ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=10)
        assert reply == b"hello"
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
