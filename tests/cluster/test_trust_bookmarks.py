"""The trust-anchor sync on the real API server's watch stream, BOOKMARK events included.

The API server sends a bookmark to a watch about a minute after it starts (its objects arrive as plain dicts
from the client). A sync that read them as Namespaces raised AttributeError and re-listed every namespace.
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

BOOKMARK_WAIT = 150.0  # seconds; the API server's bookmark period is one minute
WINDOW = 75


def test_the_trust_anchor_sync_survives_the_api_servers_bookmarks(mesh: Kube, caplog: pytest.LogCaptureFixture) -> None:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(mesh.cp.kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    core = client.CoreV1Api(api)
    # The bundle the control plane already keeps everywhere: this second sync agrees with it, writes nothing.
    bundle = core.read_namespaced_config_map("kuberpc-trust-anchors", "kuberpc-system").data["ca.pem"]

    # A plain watch started with the sync's: it tells when the API server has sent its bookmarks.
    seen = threading.Event()

    def observe() -> None:
        rv = core.list_namespace().metadata.resource_version
        for event in watch.Watch().stream(
            core.list_namespace, resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=int(BOOKMARK_WAIT)
        ):
            if event["type"] == "BOOKMARK":
                seen.set()
                return

    observer = threading.Thread(target=observe, daemon=True)
    stop = asyncio.Event()
    # Each watch window lasts WINDOW s: long enough to receive the minute's bookmark, and the sync's
    # blocking watch ends by itself soon after `stop` (it runs in a thread that cannot be cancelled).
    sync = TrustAnchorSync(api, bundle=bundle, window_seconds=WINDOW)

    async def run() -> None:
        task = asyncio.create_task(sync.run(stop))
        observer.start()
        await asyncio.to_thread(seen.wait, BOOKMARK_WAIT)
        await asyncio.sleep(2.0)  # the sync's own watch got its bookmark about when the observer did
        stop.set()
        await asyncio.wait_for(task, WINDOW + 20)

    with caplog.at_level(logging.INFO, logger="webhook.trust"):
        asyncio.run(run())
    assert seen.is_set(), "the API server sent no bookmark"
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "trust_anchors_error" in m], messages
    assert messages.count("event=trust_anchors_synced") == 1, messages
