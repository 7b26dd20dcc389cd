"""AdmissionReview (admission.k8s.io/v1) in and out: parse a request body, shape the response.

Pure: no I/O and no decisions about pods (patch.py decides); a body it cannot read is MalformedReview.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

# orjson encodes and decodes these documents 5-10x faster than json: it is most of an answer's CPU time.
import orjson

from webhook.patch import JsonPatchOp, Outcome, Result

_loads = orjson.loads
_dumps = orjson.dumps

API_VERSION = "admission.k8s.io/v1"
KIND = "AdmissionReview"


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class Status(TypedDict):
    code: int
    message: str
    reason: NotRequired[str]


class AdmissionResponse(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]
    warnings: NotRequired[list[str]]
    status: NotRequired[Status]


class AdmissionReviewResponse(TypedDict):
    apiVersion: str
    kind: str
    response: AdmissionResponse


class MalformedReview(ValueError):
    """The body is not an AdmissionReview this webhook can answer (HTTP 400, never an admission answer)."""


@dataclass(frozen=True, slots=True)
class Request:
    """What the webhook needs from `request`: who asks, about what, and the object."""

    uid: str
    operation: str
    namespace: str
    kind: GroupVersionKind
    sub_resource: str
    obj: Mapping[str, object]

    @property
    def is_pod_creation(self) -> bool:
        k = self.kind
        return (k["group"], k["version"], k["kind"]) == ("", "v1", "Pod") and self.operation == "CREATE" and not self.sub_resource


def _str(obj: Mapping[str, object], key: str) -> str:
    v = obj.get(key)
    return v if isinstance(v, str) else ""


def parse_review(body: bytes) -> Request:
    """Decode and check a request body; raise MalformedReview with the reason."""
    try:
        doc = _loads(body)
    except (ValueError, RecursionError) as e:  # every decoder's errors (and UnicodeDecodeError) are ValueErrors
        raise MalformedReview(f"body is not JSON: {type(e).__name__}") from e
    if not isinstance(doc, dict):
        raise MalformedReview("body is not a JSON object")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise MalformedReview(f"expected apiVersion {API_VERSION} and kind {KIND}")
    req = doc.get("request")
    if not isinstance(req, dict):
        raise MalformedReview("request is missing")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        raise MalformedReview("request.uid is missing")
    obj = req.get("object")
    if not isinstance(obj, dict):
        raise MalformedReview("request.object is missing")
    raw_kind = req.get("kind")
    if isinstance(raw_kind, dict):
        kind = GroupVersionKind(group=_str(raw_kind, "group"), version=_str(raw_kind, "version"), kind=_str(raw_kind, "kind"))
    else:
        # Older callers omit request.kind: fall back to the object's own type.
        group, _, version = _str(obj, "apiVersion").rpartition("/")
        kind = GroupVersionKind(group=group, version=version, kind=_str(obj, "kind"))
    return Request(
        uid=uid,
        operation=_str(req, "operation"),
        namespace=_str(req, "namespace"),
        kind=kind,
        sub_resource=_str(req, "subResource"),
        obj=obj,
    )


def _review(response: AdmissionResponse) -> AdmissionReviewResponse:
    return AdmissionReviewResponse(apiVersion=API_VERSION, kind=KIND, response=response)


def allow(uid: str, warnings: Sequence[str] = ()) -> AdmissionReviewResponse:
    response = AdmissionResponse(uid=uid, allowed=True)
    if warnings:
        response["warnings"] = list(warnings)
    return _review(response)


def encode_patch(patch: Sequence[JsonPatchOp]) -> str:
    return base64.b64encode(_dumps(list(patch))).decode("ascii")


def encode(review: AdmissionReviewResponse) -> bytes:
    """The response body."""
    return _dumps(review)


@dataclass(frozen=True, slots=True)
class PreparedAnswer:
    """An outcome already encoded as a response body for any uid: answers every review that shares it.

    Holds strings and bytes only, not the patch's JSON objects: kept answers then cost the garbage collector
    nothing to walk. `body_tail` is the body after the uid, so a response body is two concatenations.
    """

    result: Result
    message: str  # a denial's reason, for the log
    body_tail: bytes


def _answer(uid: str, result: Result, patch: str, warnings: Sequence[str], message: str) -> AdmissionReviewResponse:
    if result == "denied":
        return _review(AdmissionResponse(uid=uid, allowed=False, status=Status(code=400, reason="Invalid", message=message)))
    review = allow(uid, warnings)
    if patch:
        review["response"]["patchType"] = "JSONPatch"
        review["response"]["patch"] = patch
    return review


# The response's first field is its uid: a body is this head, the encoded uid, then a prepared answer's tail.
_EMPTY_UID_BODY = encode(allow(""))
_BODY_HEAD = _EMPTY_UID_BODY[: _EMPTY_UID_BODY.index(b'"uid":""') + len(b'"uid":')]


def prepare(outcome: Outcome) -> PreparedAnswer:
    patch = encode_patch(outcome.patch) if outcome.patch else ""
    body = encode(_answer("", outcome.result, patch, outcome.warnings, outcome.message))
    return PreparedAnswer(outcome.result, outcome.message, body_tail=body[len(_BODY_HEAD) + len(b'""') :])


def encode_prepared(uid: str, prepared: PreparedAnswer) -> bytes:
    """The response body answering `uid`: `encode(respond(uid, outcome))` for the outcome it was prepared from."""
    return _BODY_HEAD + _dumps(uid) + prepared.body_tail


def respond(uid: str, outcome: Outcome) -> AdmissionReviewResponse:
    """The AdmissionReview answering `uid` with `outcome` (allowed + patch, allowed untouched, or denied)."""
    patch = encode_patch(outcome.patch) if outcome.patch else ""
    return _answer(uid, outcome.result, patch, outcome.warnings, outcome.message)
