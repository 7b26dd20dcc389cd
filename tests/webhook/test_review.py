"""AdmissionReview parsing and answers: what is malformed, what is untouched, what the response carries."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from webhook.patch import Outcome
from webhook.review import MalformedReview, encode, encode_prepared, parse_review, prepare, respond

Review = Callable[[str], dict[str, Any]]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}', "expected apiVersion"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "Pod"}', "expected apiVersion"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request is missing"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"object": {}}}', "request.uid is missing"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u"}}', "request.object is missing"),
    ],
)
def test_malformed_reviews_are_rejected_with_a_reason(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedReview, match=reason):
        parse_review(body)


def test_a_recorded_pod_creation_is_recognised(review: Review) -> None:
    req = parse_review(json.dumps(review("deployment-pod-review")).encode())
    assert req.is_pod_creation
    assert (req.uid, req.namespace) == ("7f0b2891-916f-4ed6-b7cd-27bff1815a8c", "shop")


@pytest.mark.parametrize(
    "change",
    [
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"operation": "UPDATE"},
        {"subResource": "ephemeralcontainers"},
    ],
)
def test_anything_but_a_pod_creation_is_not_a_pod_creation(review: Review, change: dict[str, Any]) -> None:
    r = review("deployment-pod-review")
    r["request"].update(change)
    assert not parse_review(json.dumps(r).encode()).is_pod_creation


def test_without_request_kind_the_objects_own_kind_is_used(review: Review) -> None:
    r = review("deployment-pod-review")
    del r["request"]["kind"]
    assert parse_review(json.dumps(r).encode()).is_pod_creation


def test_an_injection_answer_carries_the_uid_and_a_base64_json_patch() -> None:
    patch = ({"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},)
    out = respond("uid-1", Outcome("injected", patch, ("kuberpc: note",)))  # type: ignore[arg-type]
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    resp = out["response"]
    assert resp["uid"] == "uid-1" and resp["allowed"] is True and resp["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(resp["patch"])) == list(patch)
    assert resp["warnings"] == ["kuberpc: note"]


def test_a_skip_is_allowed_without_a_patch_and_says_why() -> None:
    resp = respond("uid-2", Outcome("skipped", warnings=("kuberpc: not injected: already injected",)))["response"]
    assert resp == {"uid": "uid-2", "allowed": True, "warnings": ["kuberpc: not injected: already injected"]}


def test_a_denial_is_not_allowed_and_carries_the_message() -> None:
    resp = respond("uid-3", Outcome("denied", message="kuberpc: kuberpc.io/app-port: 'x' is not a port (1-65535)"))["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert resp["status"]["message"] == "kuberpc: kuberpc.io/app-port: 'x' is not a port (1-65535)"


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome("injected", ({"op": "add", "path": "/metadata/labels", "value": {"a": "b"}},), ("kuberpc: note",)),
        Outcome("skipped", warnings=("kuberpc: not injected: already injected",)),
        Outcome("denied", message="kuberpc: kuberpc.io/app-port: 'x' is not a port (1-65535)"),
    ],
)
def test_a_prepared_answer_serves_any_uid_exactly_as_a_fresh_one(outcome: Outcome) -> None:
    prepared = prepare(outcome)
    # The uid is spliced into bytes encoded beforehand: any text, quotes and escapes included, must come out
    # as the same body a fresh encoding gives.
    for uid in ("uid-a", "705ab4f5-6393-11e8-b7cc-42010a800002", "", 'quote " and \\ back', "ünï\u2028\x00"):
        body = encode_prepared(uid, prepared)
        assert body == encode(respond(uid, outcome))
        assert json.loads(body)["response"]["uid"] == uid
