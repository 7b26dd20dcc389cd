"""The one Kubernetes watcher (sidecar/discovery/watch.py) against a fake API server with real list/watch
semantics (tests/kubefake.py): what it reports, 410 Gone, bookmarks, servers that fail, and its backoff, with a
fake clock and a fake sleep that records each delay instead of waiting."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import kmock
import pytest

from sidecar.discovery.objects import SERVICES, Key, ServiceRecord
from sidecar.discovery.watch import Backoff, Credentials, Watcher
from tests.kubefake import FakeCluster, Obj, cluster
from tests.sidecar.harness import wait_for

__all__ = ["cluster"]
WAIT_S = 5.0
BACKOFF = Backoff(base=1.0, cap=8.0)


def service(name: str, port: int = 80) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"ports": [{"name": "grpc", "port": port, "protocol": "TCP"}]},
    }


class FakeTime:
    """A clock that only moves when told, and a sleep that records its delay and moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.slept = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        self.slept.set()
        await asyncio.sleep(0.005)  # yields (a real server needs real time to answer), but never waits `delay`


@dataclass
class Run:
    watcher: Watcher[ServiceRecord]
    time: FakeTime
    changes: list[tuple[str, int | None, int | None]] = field(default_factory=list)
    lists: int = 0
    listed: list[str] = field(default_factory=list)  # the resourceVersion of each list
    restarts: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def until(self, pred: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(WAIT_S):
            while not pred():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await self.changed.wait()
        assert pred(), what


def port_of(record: ServiceRecord | None) -> int | None:
    return record.ports[0].port if record is not None else None


@contextlib.asynccontextmanager
async def watching(fake: FakeCluster) -> AsyncIterator[Run]:
    fake_time = FakeTime()
    run: Run

    def on_change(key: Key, old: ServiceRecord | None, new: ServiceRecord | None) -> None:
        run.changes.append((key[1], port_of(old), port_of(new)))
        run.changed.set()

    def on_list() -> None:
        run.lists += 1
        run.listed.append(watcher.resource_version)
        run.changed.set()

    def on_restart() -> None:
        run.restarts += 1
        run.changed.set()

    watcher = Watcher(
        SERVICES,
        Credentials(host=fake.url),
        on_change=on_change,
        on_list=on_list,
        on_restart=on_restart,
        backoff=BACKOFF,
        rng=random.Random(3),
        clock=fake_time.clock,
        sleep=fake_time.sleep,
    )
    run = Run(watcher, fake_time)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(watcher.run(session))
        try:
            yield run
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def watch_open(fake: FakeCluster, n: int = 1) -> None:
    await wait_for(lambda: len([w for w in fake.watchers if w.plural == "services"]) >= n, "an open watch", WAIT_S)


async def test_list_reports_every_record_then_watch_reports_each_change_with_old_and_new(cluster: FakeCluster) -> None:
    cluster.put(service("a", 1), service("b", 2))
    async with watching(cluster) as run:
        await run.until(lambda: run.lists == 1, "the first list")
        assert sorted(run.changes) == [("a", None, 1), ("b", None, 2)]
        await watch_open(cluster)
        cluster.put(service("a", 10))
        cluster.put(service("a", 10))  # the same record again: no change to report
        cluster.delete(service("b"))
        await run.until(lambda: len(run.changes) == 4, "two changes")
    assert run.changes[2:] == [("a", 1, 10), ("b", 2, None)]
    assert run.watcher.records.keys() == {("default", "a")} and run.restarts == 0
    watch = cluster.requests(kmock.action.WATCH, "services")[0]
    # Watched from the list's own resourceVersion, with bookmarks.
    assert watch.params["allowWatchBookmarks"] == "true" and watch.params["resourceVersion"] == run.listed[0]


async def test_410_on_the_open_watch_relists_at_once_and_reports_only_the_differences(cluster: FakeCluster) -> None:
    cluster.put(service("a", 1), service("b", 2))
    async with watching(cluster) as run:
        await run.until(lambda: run.lists == 1, "the first list")
        await watch_open(cluster)
        cluster.put(service("a", 5), silent=True)  # the watch never hears of it
        cluster.put(service("c", 3), silent=True)
        cluster.expire("services")
        await run.until(lambda: run.lists == 2, "the relist")
    assert sorted(run.changes[2:]) == [("a", 1, 5), ("c", None, 3)]
    assert run.time.sleeps == []  # a 410 is relisted at once, with no backoff
    relist = cluster.requests(kmock.action.LIST, "services")[1]
    assert "resourceVersion" not in relist.params  # the latest state, never older than what we had


async def test_410_answer_to_a_resumed_watch_relists_at_once(cluster: FakeCluster) -> None:
    cluster.put(service("a", 1))
    async with watching(cluster) as run:
        await run.until(lambda: run.lists == 1, "the first list")
        await watch_open(cluster)
        cluster.put(service("a", 2), silent=True)
        cluster.compact()
        cluster.end_watches("services")  # the watch ends; resuming from our resourceVersion gets 410
        await run.until(lambda: run.lists == 2, "the relist")
    assert run.changes[-1] == ("a", 1, 2) and run.time.sleeps == []


async def test_a_watch_ended_by_the_server_resumes_from_the_last_bookmark_without_a_list(cluster: FakeCluster) -> None:
    cluster.put(service("a", 1))
    async with watching(cluster) as run:
        await run.until(lambda: run.lists == 1, "the first list")
        await watch_open(cluster)
        cluster.put({**service("x"), "kind": "ConfigMap"})  # another kind moves the resourceVersion on
        cluster.bookmark("services")
        mark = str(cluster.rv)
        await run.until(lambda: run.watcher.resource_version == mark, "the bookmark's resourceVersion")
        cluster.compact()  # history before the bookmark is gone: resuming from an older one would be 410
        cluster.end_watches("services")
        await watch_open(cluster)
        await run.until(lambda: len(cluster.requests(kmock.action.WATCH, "services")) == 2, "a second watch")
        cluster.put(service("a", 7))
        await run.until(lambda: run.changes[-1] == ("a", 1, 7), "the change after the bookmark")
    assert cluster.requests(kmock.action.WATCH, "services")[1].params["resourceVersion"] == mark
    assert run.lists == 1 and run.restarts == 0 and run.time.sleeps == []


async def test_failures_back_off_with_jitter_growing_to_the_cap_and_a_healthy_answer_resets_it(cluster: FakeCluster) -> None:
    cluster.put(service("a", 1))
    async with watching(cluster) as run:
        await run.until(lambda: run.lists == 1, "the first list")
        await watch_open(cluster)
        await cluster.stop()
        await run.until(lambda: len(run.time.sleeps) >= 6, "six retries while the server is down")
        down = list(run.time.sleeps[:6])
        # Attempt n waits in [d/2, d], d = min(8, 1 * 2^(n-1)): 1, 2, 4, 8, 8, 8. (The watch the stop ended
        # cleanly may count as attempt 1, retried at once: then the first sleep is attempt 2's.)
        first = 1 if down[0] <= 1.0 else 2
        for n, delay in enumerate(down, start=first):
            d = min(8.0, 2.0 ** (n - 1))
            assert d / 2 <= delay <= d, (n, delay, down)
        assert run.watcher.records.keys() == {("default", "a")}  # the last good state stays
        await cluster.start()
        cluster.put(service("a", 2))
        await run.until(lambda: run.changes[-1] == ("a", 1, 2), "the change after the outage")
        retries = len(run.time.sleeps)
        # Down again: the first retry waits the first delay again, not the cap.
        await cluster.stop()
        await run.until(lambda: len(run.time.sleeps) >= retries + 1, "a retry after the second outage")
        assert run.time.sleeps[retries] <= 1.0
        await cluster.start()


async def test_a_server_that_ends_every_watch_at_once_is_slowed_down(cluster: FakeCluster) -> None:
    cluster.put(service("a", 1))
    async with watching(cluster) as run:
        await run.until(lambda: run.lists == 1, "the first list")
        for _ in range(3):
            await watch_open(cluster)
            cluster.end_watches("services")  # no event, and (fake clock) no time passed: not healthy
            await asyncio.sleep(0.05)
        await run.until(lambda: len(run.time.sleeps) >= 1, "a backoff")
    assert run.lists == 1  # resumed from the resourceVersion each time, never relisted


async def test_a_forbidden_answer_names_the_hint_and_is_retried(cluster: FakeCluster, caplog: pytest.LogCaptureFixture) -> None:
    cluster.forbidden.add("services")
    fake_time = FakeTime()
    watcher: Watcher[ServiceRecord] = Watcher(
        SERVICES, Credentials(host=cluster.url), rng=random.Random(1), clock=fake_time.clock,
        sleep=fake_time.sleep, forbidden_hint="grant list/watch on services",
    )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(watcher.run(session))
        await wait_for(lambda: len(fake_time.sleeps) >= 2, "two retries", WAIT_S)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert not watcher.synced
    assert any("HTTP 403" in r.getMessage() and "grant list/watch on services" in r.getMessage() for r in caplog.records)
