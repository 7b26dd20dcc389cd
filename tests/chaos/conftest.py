"""The chaos mesh for tests/chaos: pod namespaces, Arith apps and proxies as processes, shared by the module.

Outside CI it skips (never fails) where root or `ip` is missing; it leaves no namespace or process behind.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from e2e import netns
from e2e.chaos import ChaosMesh


def _unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (ip netns)"
    if netns.find_ip() is None:
        return "needs iproute2's `ip` (Debian: apt-get install iproute2; `make tools` installs it)"
    return None


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    reason = _unavailable()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the chaos tests cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    mesh = ChaosMesh(tmp_path_factory.mktemp("chaos"))
    try:
        mesh.start()
        yield mesh
    finally:
        mesh.close()
