"""The architecture STYLE.md describes, checked: import-linter's contracts in pyproject.toml must hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
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
        "sidecar and webhook share nothing",
        "the proxy does not use grpcio",
        "proxy layers import downward only",
        "the HTTP/2 codec imports nothing of the proxy's",
    ):
        assert contract in out, f"contract not checked: {contract}"
