"""Patched Pods are valid Pods: checked against the Kubernetes OpenAPI schema (strict: no unknown fields)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions

from webhook.config import InjectorConfig
from webhook.patch import mutate

FIXTURES = ("deployment-pod-review", "job-pod-review", "bare-pod-review")
OPT_IN_NS = {"kuberpc.io/inject": "enabled"}
# Native sidecars (restartPolicy on an init container) need 1.29; 1.27 has no such field, so the strict
# schema proves the fallback mode does not use it.
NATIVE_VERSIONS = ("1.29.0", "1.33.0")
FALLBACK_VERSIONS = ("1.25.0", "1.27.0", "1.28.0")


def patched_pod(r: dict[str, Any], cfg: InjectorConfig) -> dict[str, Any]:
    req = r["request"]
    outcome = mutate(req["object"], OPT_IN_NS, cfg, namespace=req["namespace"])
    assert outcome.result == "injected"
    pod: dict[str, Any] = jsonpatch.apply_patch(req["object"], list(outcome.patch))
    # The API server fills these in after admission; the recorded object carries nulls for them.
    pod["metadata"].pop("creationTimestamp", None)
    pod["metadata"].setdefault("namespace", req["namespace"])
    return pod


def test_the_schema_versions_used_here_are_shipped() -> None:
    assert set(NATIVE_VERSIONS + FALLBACK_VERSIONS) <= set(all_versions())


@pytest.mark.parametrize("version", NATIVE_VERSIONS)
@pytest.mark.parametrize("name", FIXTURES)
def test_native_mode_pod_validates_on_clusters_with_native_sidecars(review: Callable[[str], dict[str, Any]], name: str, version: str) -> None:
    pod = patched_pod(review(name), InjectorConfig(kubernetes_version=(1, 29)))
    assert pod["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("version", FALLBACK_VERSIONS)
@pytest.mark.parametrize("name", FIXTURES)
def test_fallback_mode_pod_validates_on_older_clusters(review: Callable[[str], dict[str, Any]], name: str, version: str) -> None:
    pod = patched_pod(review(name), InjectorConfig(kubernetes_version=(1, 27)))
    kubernetes_validate.validate(pod, version, strict=True)


def test_native_mode_pod_is_rejected_by_a_schema_without_native_sidecars(review: Callable[[str], dict[str, Any]]) -> None:
    pod = patched_pod(review("deployment-pod-review"), InjectorConfig(kubernetes_version=(1, 29)))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.27.0", strict=True)
