"""Counters whose count is known to be zero are exported at zero, so that dashboards show 0 rather than
"No data" on a healthy mesh; nothing is exported for labels the proxy has no reason to know.

Each test records events on Metrics, scrapes a real admin server on 127.0.0.1, and parses the text.
"""

from __future__ import annotations

import ssl

import pytest
from prometheus_client import CollectorRegistry

from sidecar.metrics import Metrics
from sidecar.pool import TLS_FAILURE_REASONS, tls_failure_reason
from tests.sidecar.test_metrics import SVC, ScrapeFn, one_call, registry, scrape

__all__ = ["registry", "scrape"]  # fixtures used below

PER_SERVICE = (
    "kuberpc_ejections_total",
    "kuberpc_discovery_updates_total",
    "kuberpc_discovery_watch_restarts_total",
)


async def test_a_balanced_service_exports_its_event_counters_at_zero(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry, retry_reasons=("connect_failure", "refused"))
    metrics.set_endpoints(SVC, ready=2, ejected=0)

    s = await scrape()

    for name in PER_SERVICE:
        assert s.value(name, service=SVC) == 0, name
    assert s.value("kuberpc_retries_total", service=SVC, reason="connect_failure") == 0
    assert s.value("kuberpc_retries_total", service=SVC, reason="refused") == 0


async def test_a_counted_event_replaces_the_zero(registry: CollectorRegistry, scrape: ScrapeFn) -> None:
    metrics = Metrics(registry, retry_reasons=("refused",))
    metrics.set_endpoints(SVC, ready=1, ejected=0)
    metrics.ejection(SVC)
    metrics.retry(SVC, "refused")
    metrics.retry(SVC, "refused")

    s = await scrape()

    assert s.value("kuberpc_ejections_total", service=SVC) == 1
    assert s.value("kuberpc_retries_total", service=SVC, reason="refused") == 2
    assert len(s.labels_of("kuberpc_retries_total")) == 1


async def test_a_service_that_left_the_catalog_loses_its_zeros_but_keeps_its_counts(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry, retry_reasons=("refused",))
    metrics.set_endpoints(SVC, ready=1, ejected=0)
    metrics.set_endpoints("gone.default", ready=1, ejected=0)
    metrics.discovery_update("gone.default")
    metrics.forget_service("gone.default")

    s = await scrape()

    assert s.value("kuberpc_discovery_updates_total", service="gone.default") == 1
    assert s.get("kuberpc_ejections_total", service="gone.default") is None
    assert s.get("kuberpc_retries_total", service="gone.default", reason="refused") is None


async def test_authorization_denials_are_zero_for_services_served_inbound_only(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics, direction="inbound", service="served.default")
    one_call(metrics, direction="outbound", service="called.default")

    s = await scrape()

    assert s.labels_of("kuberpc_authz_denied_total") == [{"service": "served.default"}]
    assert s.value("kuberpc_authz_denied_total", service="served.default") == 0


async def test_known_tls_failure_reasons_are_exported_at_zero_and_no_others(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    Metrics(registry, tls_reasons=("unknown_ca", "expired_certificate"))

    s = await scrape()

    assert sorted(d["reason"] for d in s.labels_of("kuberpc_tls_handshake_failures_total")) == [
        "expired_certificate",
        "unknown_ca",
    ]
    assert s.value("kuberpc_tls_handshake_failures_total", reason="unknown_ca") == 0


async def test_without_known_reasons_or_services_nothing_is_invented(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    Metrics(registry)

    s = await scrape()

    for name in (*PER_SERVICE, "kuberpc_retries_total", "kuberpc_authz_denied_total"):
        assert s.labels_of(name) == [], name


@pytest.mark.parametrize(
    "error",
    [
        ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"),
        ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"),
        ssl.SSLCertVerificationError(1, "certificate verify failed: certificate has expired"),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request"),
        ssl.SSLError(1, "[SSL: NO_APPLICATION_PROTOCOL] no application protocol"),
        ssl.SSLError(1, "something new"),
    ],
)
def test_every_reason_the_proxy_reports_is_among_those_exported_at_zero(error: ssl.SSLError) -> None:
    assert tls_failure_reason(error) in TLS_FAILURE_REASONS
