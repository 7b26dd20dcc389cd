"""Whatever the body, the real HTTPS server answers (never a 5xx, never a hang)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from webhook import annotations as a

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


def mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` nine times in ten, any JSON otherwise: deep enough structure to reach the patch builder."""
    return st.integers(0, 9).flatmap(lambda i: JSON if i == 9 else valid)


ANNOTATION_KEYS = st.sampled_from(
    [a.APP_PORT, a.UPSTREAMS, a.WEIGHT, a.PROXY_CPU, a.PROXY_MEMORY, a.PROXY_LOG_LEVEL, a.PROXY_IMAGE, a.NATIVE_SIDECAR, a.DRAIN_SECONDS, a.INJECTED, "prometheus.io/port"]
)
ANNOTATION_VALUES = st.sampled_from(["", "0", "1", "15090", "9001", "true", "100m", "1Gi", "a:1=9001", "a.b:1=2,c:2=2"]) | st.text(max_size=30)
CONTAINER = st.fixed_dictionaries(
    {"name": mostly(st.text(min_size=1, max_size=10))},
    optional={"ports": mostly(st.lists(st.fixed_dictionaries({"containerPort": mostly(st.integers(-5, 70000))}), max_size=3))},
)
POD = st.fixed_dictionaries(
    {
        "metadata": mostly(
            st.fixed_dictionaries(
                {"annotations": mostly(st.dictionaries(ANNOTATION_KEYS, ANNOTATION_VALUES, max_size=4).map(lambda d: {a.INJECT: a.INJECT_ENABLED, **d}))},
                optional={"labels": mostly(st.dictionaries(st.text(max_size=8) | ANNOTATION_KEYS, st.text(max_size=8), max_size=3))},
            )
        ),
        "spec": mostly(
            st.fixed_dictionaries(
                {"containers": mostly(st.lists(CONTAINER, min_size=1, max_size=3))},
                optional={
                    "initContainers": mostly(st.lists(CONTAINER, max_size=2)),
                    "volumes": mostly(st.lists(st.fixed_dictionaries({"name": mostly(st.text(max_size=8))}), max_size=2)),
                    "hostNetwork": mostly(st.booleans()),
                    "terminationGracePeriodSeconds": mostly(st.integers(-100, 10**6)),
                },
            )
        ),
    }
)
REQUEST = st.fixed_dictionaries(
    {
        "uid": mostly(st.text(min_size=1, max_size=12)),
        "object": mostly(POD),
        "kind": mostly(st.just({"group": "", "version": "v1", "kind": "Pod"})),
        "operation": mostly(st.just("CREATE")),
        "namespace": mostly(st.sampled_from(["default", "kuberpc-system", "plain"])),
    },
    optional={"subResource": mostly(st.just(""))},
)
REVIEW = st.fixed_dictionaries(
    {"apiVersion": mostly(st.just("admission.k8s.io/v1")), "kind": mostly(st.just("AdmissionReview")), "request": mostly(REQUEST)}
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON.map(lambda v: json.dumps(v).encode()),
    REVIEW.map(lambda v: json.dumps(v).encode()),
    REVIEW.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=BODIES)
async def test_any_body_gets_an_answer_that_is_not_a_server_error(live_server: Any, body: bytes) -> None:
    live_server.namespaces.labels["default"] = {a.NAMESPACE_INJECT_LABEL: a.INJECT_ENABLED}
    async with asyncio.timeout(5):  # a hang fails the example instead of stalling the suite
        resp = await live_server.post("/mutate?timeout=10s", body)
        text = await resp.text()
    assert resp.status < 500, text
    if resp.status == 200:
        review: dict[str, Any] = json.loads(text)
        event("patched" if "patch" in review["response"] else f"allowed={review['response']['allowed']}")
        assert review["kind"] == "AdmissionReview" and review["response"]["uid"] == json.loads(body)["request"]["uid"]
    else:
        assert resp.status == 400 and text.startswith("malformed AdmissionReview")
