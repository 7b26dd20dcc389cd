"""The chaos mesh for tests/chaos: pod namespaces, Arith apps and proxies as processes, shared by the module.

Outside CI it skips (never fails) where root or `ip` is missing; it leaves no namespace or process behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from e2e import netns
from e2e.chaos import ChaosMesh


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    reason = netns.unavailable_reason()
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
