"""The architecture STYLE.md describes, checked: import-linter's contracts in pyproject.toml must hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_imports_flow_one_way_and_sidecar_and_webhook_stay_independent() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint is not None, "import-linter is a dev dependency (pyproject.toml)"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    # Every contract must be among those checked: one dropped from pyproject.toml fails here.
    out = " ".join(result.stdout.split())
    for contract in (
        "the proxy never imports the control plane",
        "the control plane imports only the proxy's contract modules",
        "the contract modules are pure",
        "the proxy does not use grpcio",
        "proxy layers import downward only",
        "the HTTP/2 codec imports nothing of the proxy's",
    ):
        assert contract in out, f"contract not checked: {contract}"


CONTRACT_MODULES = {"model", "status", "ports", "address", "spiffe", "policy", "pki"}
SHARED_WATCHER = {"discovery.objects", "discovery.watch"}  # the one Kubernetes watcher (issue 16)


def _contract(name_start: str) -> dict[str, object]:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (found,) = [c for c in contracts if c["name"].startswith(name_start)]
    return found


def test_every_sidecar_module_is_either_a_contract_module_or_forbidden_to_the_control_plane() -> None:
    # The forbidden contract lists modules by name: a new sidecar module missing from it would be open to webhook/.
    # sidecar.discovery is listed by submodule: the watcher (its package, objects and watch) is shared.
    top_level = {p.stem for p in (ROOT / "sidecar").glob("*.py") if p.stem != "__init__"}
    top_level |= {p.parent.name for p in (ROOT / "sidecar").glob("*/__init__.py") if p.parent.name != "discovery"}
    top_level |= {f"discovery.{p.stem}" for p in (ROOT / "sidecar" / "discovery").glob("*.py") if p.stem != "__init__"}
    forbidden = _contract("the control plane imports only")["forbidden_modules"]
    assert isinstance(forbidden, list)
    assert {m.removeprefix("sidecar.") for m in forbidden} == top_level - CONTRACT_MODULES - SHARED_WATCHER
    pure = _contract("the contract modules are pure")["source_modules"]
    assert isinstance(pure, list)
    assert {m.removeprefix("sidecar.") for m in pure} == CONTRACT_MODULES
