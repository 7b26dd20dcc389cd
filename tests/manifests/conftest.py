"""Fixtures shared by the deployables' tests: the repository root, its manifests, external tools.

Reads files only; tools that are not installed are skipped outside CI and fail in CI (CI=true).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def load_docs() -> Callable[[Path], list[dict[str, Any]]]:
    """Every non-empty YAML document of a file."""

    def load(path: Path) -> list[dict[str, Any]]:
        with path.open(encoding="utf-8") as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]

    return load


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str, str], str]:
    """Path of an external tool; skip (with the reason printed) when absent, but fail in CI.

    CI installs every tool these tests use (see the Makefile), so there a missing tool is a broken
    set-up, not a reason to pass silently.
    """

    def find(name: str, install_hint: str) -> str:
        path = shutil.which(name)
        if path is not None:
            return path
        reason = f"{name} not found ({install_hint})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must install it")
        print(f"SKIP: {reason}", file=sys.stderr)
        pytest.skip(reason)

    return find
