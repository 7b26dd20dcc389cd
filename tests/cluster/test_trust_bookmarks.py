"""The trust-anchor sync on the real API server's watch stream, BOOKMARK events included.

The API server sends a watch with a deadline a bookmark 2 s before that deadline (and about every minute),
once the watched kind's resourceVersion has moved past the watch's start. Bookmark objects arrive from the
client as plain dicts: a sync that read them as Namespaces raised AttributeError and re-listed everything.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from kubernetes import client, config, watch

from tests.cluster.conftest import Kube
from webhook.trust import TrustAnchorSync

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

WINDOW = 20  # seconds each watch lasts; its bookmark comes at WINDOW - 2
BOOKMARK_WAIT = WINDOW + 15.0


def test_the_trust_anchor_sync_survives_the_api_servers_bookmarks(mesh: Kube, caplog: pytest.LogCaptureFixture) -> None:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(mesh.cp.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    core = client.CoreV1Api(api)
    # The bundle the control plane already keeps everywhere: this second sync agrees with it, writes nothing new.
    bundle = core.read_namespaced_config_map("kuberpc-trust-anchors", "kuberpc-system").data["ca.pem"]

    # A plain watch started with the sync's own: it tells when the API server has sent the bookmark.
    started, seen = threading.Event(), threading.Event()

    def observe() -> None:
        rv = core.list_namespace().metadata.resource_version
        stream = watch.Watch().stream(core.list_namespace, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=WINDOW)
        started.set()
        for event in stream:
            if event["type"] == "BOOKMARK":
                seen.set()
                return

    stop = asyncio.Event()
    sync = TrustAnchorSync(api, bundle=bundle, window_seconds=WINDOW)
    synced = threading.Event()

    class Synced(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == "event=trust_anchors_synced":
                synced.set()  # the sync has listed and is about to watch from that list

    async def run() -> None:
        task = asyncio.create_task(sync.run(stop))
        observer = threading.Thread(target=observe, daemon=True)
        observer.start()
        await asyncio.to_thread(started.wait, 10)
        await asyncio.to_thread(synced.wait, 10)
        # Moves the namespaces' resourceVersion past both watches' start: bookmarks carry it, so they are sent.
        mesh.kubectl("create", "namespace", "bookmark-probe")
        await asyncio.to_thread(seen.wait, BOOKMARK_WAIT)
        stop.set()
        # The sync's blocking watch runs in a thread: it ends with its window, soon after the bookmark.
        await asyncio.wait_for(task, WINDOW + 20)

    handler = Synced()
    logging.getLogger("webhook.trust").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="webhook.trust"):
            asyncio.run(run())
    finally:
        logging.getLogger("webhook.trust").removeHandler(handler)
    assert seen.is_set(), "the API server sent no bookmark"
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "trust_anchors_error" in m], messages
    assert messages.count("event=trust_anchors_synced") == 1, messages
