"""The interface every discovery source implements: publish Catalog snapshots as they change.

Declares the contract only: no source, no wiring (app.py picks and runs one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from sidecar.model import Catalog


class Discovery(Protocol):
    async def run(self, publish: Callable[[Catalog], None]) -> None:
        """Run until cancelled; publish a Catalog as soon as there is one and on every change.

        On errors the source keeps the last good catalog (it simply publishes nothing new).
        """
        ...
