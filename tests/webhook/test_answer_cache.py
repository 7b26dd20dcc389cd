"""Answers reused for identical Pods: what counts as identical, what is never kept, and how the cache is bounded."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from prometheus_client import CollectorRegistry

from sidecar.pki import KeyPair
from webhook.config import InjectorConfig
from webhook.metrics import WebhookMetrics
from webhook.patch import Outcome, mutate, read_pod
from webhook.review import prepare
from webhook.server import AnswerCache, CertReloader, create_app, serving

Review = Callable[[str], dict[str, Any]]
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"
POD: dict[str, object] = {"metadata": {"generateName": "a-"}, "spec": {"containers": [{"name": "app"}]}}


class Served:
    def __init__(self, base: str, session: aiohttp.ClientSession, ca_pem: bytes, labels: dict[str, dict[str, str]]) -> None:
        self.base, self.session, self.labels = base, session, labels
        self.ctx = ssl.create_default_context(cadata=ca_pem.decode())

    async def answer(self, review: dict[str, Any]) -> dict[str, Any]:
        async with self.session.post(
            self.base + "/mutate", data=json.dumps(review).encode(), ssl=self.ctx, server_hostname=SERVER_NAME
        ) as resp:
            assert resp.status == 200, await resp.text()
            out: dict[str, Any] = (await resp.json())["response"]
            return out


@pytest.fixture
def cache() -> AnswerCache:
    return AnswerCache(max_entries=8)


@pytest.fixture
async def served(
    serving_files: tuple[KeyPair, Path, Path], native_cfg: InjectorConfig, cache: AnswerCache
) -> AsyncIterator[Served]:
    ca, cert, key = serving_files
    labels: dict[str, dict[str, str]] = {}

    async def namespace_labels(name: str) -> dict[str, str]:
        return labels.get(name, {})

    app = create_app(
        cfg=native_cfg, metrics=WebhookMetrics(CollectorRegistry()), namespace_labels=namespace_labels, answers=cache
    )
    reloader = CertReloader(str(cert), str(key))
    async with (
        serving(app, host="127.0.0.1", port=0, ssl_context=reloader.context) as (host, port),
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        yield Served(f"https://{host}:{port}", session, ca.cert_pem, labels)


def patch_of(resp: dict[str, Any]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = json.loads(base64.b64decode(resp["patch"]))
    return ops


async def test_identical_pods_share_one_answer_each_under_its_own_uid(served: Served, cache: AnswerCache, review: Review) -> None:
    first, second = review("deployment-pod-review"), review("deployment-pod-review")
    second["request"]["uid"] = "another-uid"
    a, b = await served.answer(first), await served.answer(second)
    assert (a["uid"], b["uid"]) == (first["request"]["uid"], "another-uid")
    assert a["patch"] == b["patch"] and a.get("warnings") == b.get("warnings")
    assert len(cache) == 1


async def test_a_pod_differing_in_one_annotation_gets_its_own_answer(served: Served, cache: AnswerCache, review: Review) -> None:
    plain, bad_weight = review("deployment-pod-review"), review("deployment-pod-review")
    bad_weight["request"]["object"]["metadata"]["annotations"]["kuberpc.io/weight"] = "99999"
    await served.answer(plain)
    resp = await served.answer(bad_weight)
    assert any("kuberpc.io/weight" in w for w in resp["warnings"])
    assert len(cache) == 2


async def test_the_namespace_labels_are_part_of_what_is_identical(served: Served, review: Review) -> None:
    served.labels["meshed"] = {"kuberpc.io/inject": "enabled"}
    assert "patch" in await served.answer(review("bare-pod-review"))
    served.labels["meshed"] = {}
    assert "patch" not in await served.answer(review("bare-pod-review"))


async def test_a_reused_answer_is_the_one_a_fresh_webhook_gives(served: Served, review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    await served.answer(r)
    reused = await served.answer(r)
    fresh = mutate(r["request"]["object"], {}, native_cfg, namespace=r["request"]["namespace"])
    assert patch_of(reused) == list(fresh.patch)


async def test_replicas_differing_only_where_the_injector_does_not_look_share_one_answer(
    served: Served, cache: AnswerCache, review: Review, native_cfg: InjectorConfig
) -> None:
    """Names, the workload's own labels, env and the app's image vary between pods; the proxy does not."""
    first, second = review("deployment-pod-review"), review("deployment-pod-review")
    pod = second["request"]["object"]
    pod["metadata"]["name"] = "arith-7d9f-abcde"
    pod["metadata"].setdefault("labels", {})["pod-template-hash"] = "other"
    app = pod["spec"]["containers"][0]
    app["image"] = "example/arith:2"
    app["env"] = [{"name": "GREETING", "value": "hi"}]
    second["request"]["uid"] = "second-uid"
    await served.answer(first)
    reused = await served.answer(second)
    assert len(cache) == 1
    assert patch_of(reused) == list(mutate(pod, {}, native_cfg, namespace=second["request"]["namespace"]).patch)
    patched = jsonpatch.apply_patch(pod, patch_of(reused))
    assert patched["spec"]["containers"][-1]["image"] == "example/arith:2"  # the app is this replica's, untouched
    assert patched["metadata"]["name"] == "arith-7d9f-abcde"


def test_the_least_recently_used_answer_goes_first_past_max_entries() -> None:
    cache = AnswerCache(max_entries=2)
    keys = [cache.key(read_pod(pod_with({"n": str(i)})), "ns", {}) for i in range(3)]
    assert all(k is not None for k in keys)
    k0, k1, k2 = (k for k in keys if k is not None)
    answer = prepare(Outcome("skipped"))
    cache.put(k0, answer)
    cache.put(k1, answer)
    assert cache.get(k0) is answer  # k0 is now the most recently used
    cache.put(k2, answer)
    assert (cache.get(k0), cache.get(k1), cache.get(k2)) == (answer, None, answer)


def test_a_pod_with_annotations_past_the_limit_is_never_kept() -> None:
    cache = AnswerCache(max_annotation_bytes=100)
    assert cache.key(read_pod(pod_with({"x": "y" * 200})), "ns", {}) is None
    assert cache.key(read_pod(pod_with({"x": "y"})), "ns", {}) is not None


def test_zero_entries_turns_reuse_off() -> None:
    assert AnswerCache(max_entries=0).key(read_pod(POD), "ns", {}) is None


def test_the_key_tells_namespaces_and_their_labels_apart() -> None:
    cache = AnswerCache()
    facts = read_pod(POD)
    keys = {
        cache.key(facts, "a", {}),
        cache.key(facts, "b", {}),
        cache.key(facts, "a", {"kuberpc.io/inject": "enabled"}),
    }
    assert len(keys) == 3 and None not in keys


def pod_with(annotations: dict[str, str]) -> dict[str, object]:
    return {"metadata": {"generateName": "a-", "annotations": annotations}, "spec": {"containers": [{"name": "app"}]}}
