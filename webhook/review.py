"""AdmissionReview (admission.k8s.io/v1) in and out: parse a request body, shape the response.

Pure: no I/O and no decisions about pods (patch.py decides); a body it cannot read is MalformedReview.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NotRequired, TypedDict

from webhook.patch import JsonPatchOp, Outcome, Result

_loads: Callable[[bytes], object]
_dumps: Callable[[object], bytes]
try:
    # orjson encodes and decodes these documents 5-10x faster than json: it is most of an answer's CPU time.
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # the standard library gives the same results, only slower
    _loads = json.loads

    def _dumps(value: object) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

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
    """An outcome with its patch already encoded: answers any number of reviews that share it, whatever their uid.

    Holds strings only, not the patch's JSON objects: kept answers then cost the garbage collector nothing to walk.
    """

    result: Result
    patch: str  # base64 JSON Patch; "" when the outcome has none
    warnings: tuple[str, ...]
    message: str


def prepare(outcome: Outcome) -> PreparedAnswer:
    return PreparedAnswer(
        result=outcome.result,
        patch=encode_patch(outcome.patch) if outcome.patch else "",
        warnings=outcome.warnings,
        message=outcome.message,
    )


def respond_prepared(uid: str, prepared: PreparedAnswer) -> AdmissionReviewResponse:
    """The AdmissionReview answering `uid` with a prepared outcome."""
    if prepared.result == "denied":
        return _review(
            AdmissionResponse(uid=uid, allowed=False, status=Status(code=400, reason="Invalid", message=prepared.message))
        )
    review = allow(uid, prepared.warnings)
    if prepared.patch:
        review["response"]["patchType"] = "JSONPatch"
        review["response"]["patch"] = prepared.patch
    return review


def respond(uid: str, outcome: Outcome) -> AdmissionReviewResponse:
    """The AdmissionReview answering `uid` with `outcome` (allowed + patch, allowed untouched, or denied)."""
    return respond_prepared(uid, prepare(outcome))


def object_key(obj: Mapping[str, object]) -> bytes | None:
    """The object's JSON encoding, to recognise an identical object again; None if it cannot be re-encoded.

    Equal keys mean equal objects (same keys, values and order), so any pure function of the object may be
    reused for both. orjson refuses some documents that it decodes (nesting deeper than it encodes): None then.
    """
    try:
        return _dumps(obj)
    except (TypeError, ValueError, RecursionError):  # orjson.JSONEncodeError is a TypeError
        return None
