"""The interface every discovery source implements (publish Catalog snapshots as they change) and the helpers they share.

Declares the contract and shared helpers only: no source, no wiring (app.py picks and runs one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from sidecar.model import Catalog


class Discovery(Protocol):
    async def run(self, publish: Callable[[Catalog], None]) -> None:
        """Run until cancelled; publish a Catalog as soon as there is one and on every change.

        On errors the source keeps the last good catalog (it simply publishes nothing new).
        """
        ...


def port_or_none(value: object) -> int | None:
    """`value` if it is a TCP port number (an int from 1 to 65535), else None."""
    # bool is an int in Python: `port: true` must not become port 1.
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    return None


class ProblemLog:
    """Logs each problem (a bad annotation, a bad field) once per appearance, as a WARNING.

    `report` takes every problem present now: one still present is not logged again, one that went away
    and came back is. `message` is a %-format whose last placeholder receives the problem.
    """

    def __init__(self, logger: logging.Logger, message: str, *args: object) -> None:
        self._logger = logger
        self._message = message
        self._args = args
        self._logged: set[str] = set()

    def report(self, problems: Iterable[str]) -> None:
        current = dict.fromkeys(problems)  # ordered and deduplicated
        for problem in current:
            if problem not in self._logged:
                self._logger.warning(self._message, *self._args, problem)
        self._logged = set(current)
