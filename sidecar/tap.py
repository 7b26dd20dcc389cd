"""The tap: a live, bounded stream of finished calls for operators (`kuberpc tap`, `kuberpc top`).

Fans call records out to subscribers through bounded queues; the relays see it only while someone is
subscribed (the relay's `tap` is None otherwise), so it costs nothing when nobody taps. No I/O here:
the admin server streams what a subscription receives.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from sidecar.accesslog import CallRecord

# A subscriber further behind than this loses calls (counted), rather than growing the proxy's memory.
QUEUE_SIZE = 1000


class Subscription:
    """What one subscriber receives: the calls finished since it subscribed, and how many it lost."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[CallRecord] = asyncio.Queue(QUEUE_SIZE)
        self.dropped = 0

    async def next(self) -> CallRecord:
        return await self.queue.get()


class Tap:
    """`on_change(self)` when the first subscriber arrives, `on_change(None)` when the last leaves."""

    def __init__(self, on_change: Callable[[Tap | None], None]) -> None:
        self._on_change = on_change
        self._subscriptions: set[Subscription] = set()

    def publish(self, record: CallRecord) -> None:
        for sub in self._subscriptions:
            try:
                sub.queue.put_nowait(record)
            except asyncio.QueueFull:
                sub.dropped += 1

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        sub = Subscription()
        self._subscriptions.add(sub)
        if len(self._subscriptions) == 1:
            self._on_change(self)
        try:
            yield sub
        finally:
            self._subscriptions.discard(sub)
            if not self._subscriptions:
                self._on_change(None)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)
