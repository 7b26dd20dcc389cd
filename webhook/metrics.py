"""The webhook's Prometheus metrics, on a CollectorRegistry the caller owns.

Declares and records; never serves (server.py exposes /metrics) and never touches the default registry.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

AdmissionResult = Literal["injected", "skipped", "denied", "error"]
RESULTS: tuple[AdmissionResult, ...] = ("injected", "skipped", "denied", "error")
# Admission answers are expected within milliseconds; the API server gives up at 10 s.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.admissions = Counter(
            "kuberpc_webhook_admissions",
            "Admission reviews answered, by result",
            ["result"],
            registry=registry,
        )
        self.duration = Histogram(
            "kuberpc_webhook_admission_duration_seconds",
            "Time to answer one admission review",
            buckets=BUCKETS,
            registry=registry,
        )
        # One child per result, bound once: labels() costs a lock and a dict lookup on every answer otherwise.
        # Binding them also exports zeros, so rate() and alerts work before the first event.
        self._by_result = {result: self.admissions.labels(result=result) for result in RESULTS}

    def observe(self, result: AdmissionResult, seconds: float) -> None:
        self._by_result[result].inc()
        self.duration.observe(seconds)
