"""gRPC status codes (grpc/doc/statuscodes.md): the proxy's one definition of them.

A plain value module: no I/O and no imports from the proxy; every other encoding of a code derives from it.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    """A gRPC status; str() gives the number, as it travels in `grpc-status` and labels metrics."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @property
    def kebab(self) -> str:
        """The name as annotations spell it (`resource-exhausted`)."""
        return self.name.lower().replace("_", "-")
