"""What the proxy's metrics report, as Prometheus sees it: DESIGN §5 names and labels, values, bounded labels.

Each test records events on Metrics, scrapes a real admin server on 127.0.0.1, and parses the text.
Retries and ejections are not recorded by hand here: tests/sidecar/test_resilience.py causes real ones
(a replica whose app is down, an app answering UNAVAILABLE) and reads them from a proxy's /metrics.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin import AdminServer
from sidecar.metrics import REASON_CAP, Metrics

SVC = "arith.default"
ADD = "/arith.Arith/Add"
MUL = "/arith.Arith/Multiply"

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One parsed scrape: sample values by (sample name, labels)."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.values[sample.name, frozenset(sample.labels.items())] = sample.value

    def get(self, name: str, **labels: str) -> float | None:
        return self.values.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        found = self.get(name, **labels)
        assert found is not None, f"no sample {name}{labels}"
        return found

    def labels_of(self, name: str) -> list[Mapping[str, str]]:
        return [dict(labels) for sample, labels in self.values if sample == name]

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.values}


ScrapeFn = Callable[[], Awaitable[Scrape]]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def scrape(registry: CollectorRegistry) -> AsyncIterator[ScrapeFn]:
    server = AdminServer(registry=registry, ready=lambda: True, debug=dict, shutdown=lambda: None)
    await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as client:

            async def once() -> Scrape:
                async with client.get(f"http://127.0.0.1:{server.port}/metrics") as response:
                    assert response.status == 200
                    return Scrape(await response.text())

            yield once
    finally:
        await server.close()


def one_call(
    metrics: Metrics,
    *,
    direction: str = "outbound",
    service: str = SVC,
    method: str = ADD,
    code: str = "0",
    duration: float = 0.003,
    sent: int = 10,
    received: int = 7,
) -> None:
    metrics.call_started(direction, service)
    metrics.call_finished(direction, service, method, code, duration, sent, received)


async def test_finished_calls_are_counted_by_direction_service_method_and_grpc_code(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics)
    one_call(metrics)
    one_call(metrics, code="14")
    one_call(metrics, direction="inbound")

    s = await scrape()

    total = "kuberpc_requests_total"
    assert s.value(total, direction="outbound", service=SVC, method=ADD, grpc_code="0") == 2
    assert s.value(total, direction="outbound", service=SVC, method=ADD, grpc_code="14") == 1
    assert s.value(total, direction="inbound", service=SVC, method=ADD, grpc_code="0") == 1


async def test_duration_histogram_has_cumulative_buckets_sum_and_count(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics, duration=0.003)
    one_call(metrics, duration=0.2)
    one_call(metrics, duration=30.0)

    s = await scrape()

    labels = {"direction": "outbound", "service": SVC, "method": ADD}
    bucket = "kuberpc_request_duration_seconds_bucket"
    assert s.value(bucket, le="0.0025", **labels) == 0
    assert s.value(bucket, le="0.005", **labels) == 1
    assert s.value(bucket, le="0.1", **labels) == 1
    assert s.value(bucket, le="0.25", **labels) == 2
    assert s.value(bucket, le="10.0", **labels) == 2
    assert s.value(bucket, le="+Inf", **labels) == 3
    assert s.value("kuberpc_request_duration_seconds_count", **labels) == 3
    assert math.isclose(s.value("kuberpc_request_duration_seconds_sum", **labels), 30.203)


async def test_duration_equal_to_a_bucket_bound_is_counted_in_that_bucket(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics, duration=0.005)

    s = await scrape()

    labels = {"direction": "outbound", "service": SVC, "method": ADD}
    assert s.value("kuberpc_request_duration_seconds_bucket", le="0.005", **labels) == 1
    assert s.value("kuberpc_request_duration_seconds_bucket", le="0.0025", **labels) == 0


async def test_histogram_buckets_span_half_a_millisecond_to_ten_seconds(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics)

    s = await scrape()

    bounds = [float(labels["le"]) for labels in s.labels_of("kuberpc_request_duration_seconds_bucket")]
    assert min(bounds) == 0.0005
    assert max(b for b in bounds if b != math.inf) == 10.0
    assert math.inf in bounds


async def test_request_and_response_bytes_are_summed_per_direction_and_service(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics, method=ADD, sent=100, received=40)
    one_call(metrics, method=MUL, sent=20, received=5)

    s = await scrape()

    assert s.value("kuberpc_request_bytes_total", direction="outbound", service=SVC) == 120
    assert s.value("kuberpc_response_bytes_total", direction="outbound", service=SVC) == 45


async def test_inflight_counts_calls_started_and_not_yet_finished(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    metrics.call_started("outbound", SVC)
    metrics.call_started("outbound", SVC)
    metrics.call_started("inbound", SVC)
    metrics.call_finished("outbound", SVC, ADD, "0", 0.001, 1, 1)

    s = await scrape()

    assert s.value("kuberpc_inflight_requests", direction="outbound", service=SVC) == 1
    assert s.value("kuberpc_inflight_requests", direction="inbound", service=SVC) == 1


async def test_methods_beyond_the_series_cap_fold_into_method_other(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry, max_series=2)
    for method in ("/a.A/One", "/a.A/Two", "/a.A/Three", "/a.A/Four"):
        one_call(metrics, method=method)

    s = await scrape()

    methods = {labels["method"] for labels in s.labels_of("kuberpc_requests_total")}
    assert methods == {"/a.A/One", "/a.A/Two", "other"}
    total = "kuberpc_requests_total"
    assert s.value(total, direction="outbound", service=SVC, method="other", grpc_code="0") == 2
    assert s.value(
        "kuberpc_request_duration_seconds_count", direction="outbound", service=SVC, method="other"
    ) == 2


async def test_a_method_admitted_before_the_cap_keeps_its_own_series(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry, max_series=1)
    one_call(metrics, method=ADD)
    one_call(metrics, method=MUL)
    one_call(metrics, method=ADD)

    s = await scrape()

    total = "kuberpc_requests_total"
    assert s.value(total, direction="outbound", service=SVC, method=ADD, grpc_code="0") == 2
    assert s.value(total, direction="outbound", service=SVC, method="other", grpc_code="0") == 1


async def test_services_beyond_the_cap_fold_into_service_other_and_their_inflight_returns_to_zero(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry, max_series=1)
    one_call(metrics, service="a.ns")
    metrics.call_started("outbound", "b.ns")
    metrics.call_started("outbound", "c.ns")

    during = await scrape()
    metrics.call_finished("outbound", "b.ns", ADD, "0", 0.001, 1, 1)
    metrics.call_finished("outbound", "c.ns", ADD, "0", 0.001, 1, 1)
    after = await scrape()

    assert {labels["service"] for labels in after.labels_of("kuberpc_inflight_requests")} == {"a.ns", "other"}
    assert during.value("kuberpc_inflight_requests", direction="outbound", service="other") == 2
    assert after.value("kuberpc_inflight_requests", direction="outbound", service="other") == 0


async def test_grpc_codes_outside_0_to_16_are_counted_as_other(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics, code="16")
    one_call(metrics, code="17")
    one_call(metrics, code="OK")

    s = await scrape()

    codes = {labels["grpc_code"] for labels in s.labels_of("kuberpc_requests_total")}
    assert codes == {"16", "other"}
    total = "kuberpc_requests_total"
    assert s.value(total, direction="outbound", service=SVC, method=ADD, grpc_code="other") == 2


async def test_endpoints_gauge_reports_ready_and_ejected_per_service(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    metrics.set_endpoints(SVC, ready=3, ejected=1)
    metrics.set_endpoints(SVC, ready=2, ejected=2)

    s = await scrape()

    assert s.value("kuberpc_endpoints", service=SVC, state="ready") == 2
    assert s.value("kuberpc_endpoints", service=SVC, state="ejected") == 2


async def test_forgetting_a_service_removes_its_endpoints_series_only(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    metrics.set_endpoints(SVC, ready=3, ejected=0)
    metrics.set_endpoints("other-svc.default", ready=1, ejected=0)
    one_call(metrics)

    metrics.forget_service(SVC)
    s = await scrape()

    assert s.get("kuberpc_endpoints", service=SVC, state="ready") is None
    assert s.get("kuberpc_endpoints", service=SVC, state="ejected") is None
    assert s.value("kuberpc_endpoints", service="other-svc.default", state="ready") == 1
    assert s.value("kuberpc_requests_total", direction="outbound", service=SVC, method=ADD, grpc_code="0") == 1


async def test_endpoints_of_services_beyond_the_cap_are_summed_under_other(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry, max_series=1)
    metrics.set_endpoints("a.ns", ready=5, ejected=0)
    metrics.set_endpoints("b.ns", ready=2, ejected=1)
    metrics.set_endpoints("c.ns", ready=3, ejected=0)

    s = await scrape()

    assert s.value("kuberpc_endpoints", service="a.ns", state="ready") == 5
    assert s.value("kuberpc_endpoints", service="other", state="ready") == 5
    assert s.value("kuberpc_endpoints", service="other", state="ejected") == 1


@pytest.mark.parametrize(
    ("record", "sample", "labels"),
    [
        (lambda m: m.authz_denied(SVC), "kuberpc_authz_denied_total", {"service": SVC}),
        (
            lambda m: m.tls_handshake_failure("bad_certificate"),
            "kuberpc_tls_handshake_failures_total",
            {"reason": "bad_certificate"},
        ),
        (lambda m: m.discovery_update(SVC), "kuberpc_discovery_updates_total", {"service": SVC}),
        (lambda m: m.watch_restart(SVC), "kuberpc_discovery_watch_restarts_total", {"service": SVC}),
    ],
)
async def test_each_event_counter_counts_its_events_under_its_labels(
    registry: CollectorRegistry,
    scrape: ScrapeFn,
    record: Callable[[Metrics], None],
    sample: str,
    labels: dict[str, str],
) -> None:
    metrics = Metrics(registry)
    record(metrics)
    record(metrics)

    s = await scrape()

    assert s.value(sample, **labels) == 2


async def test_tls_failure_reasons_beyond_the_cap_fold_into_other(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    for i in range(REASON_CAP + 3):
        metrics.tls_handshake_failure(f"reason-{i}")

    s = await scrape()

    assert len(s.labels_of("kuberpc_tls_handshake_failures_total")) == REASON_CAP + 1
    assert s.value("kuberpc_tls_handshake_failures_total", reason="other") == 3


async def test_cert_expiry_is_absent_until_set_then_reports_the_timestamp(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    before = await scrape()

    metrics.set_cert_expiry(1_900_000_000.0)
    after = await scrape()

    assert "kuberpc_cert_expiry_timestamp_seconds" not in before.names
    assert after.value("kuberpc_cert_expiry_timestamp_seconds") == 1_900_000_000.0


async def test_every_design_metric_name_is_exposed_after_use(
    registry: CollectorRegistry, scrape: ScrapeFn
) -> None:
    metrics = Metrics(registry)
    one_call(metrics)
    metrics.set_endpoints(SVC, ready=1, ejected=0)
    metrics.authz_denied(SVC)
    metrics.tls_handshake_failure("expired")
    metrics.set_cert_expiry(1_900_000_000.0)
    metrics.discovery_update(SVC)
    metrics.watch_restart(SVC)

    s = await scrape()

    design_samples = {
        "kuberpc_requests_total",
        "kuberpc_request_duration_seconds_bucket",
        "kuberpc_request_duration_seconds_sum",
        "kuberpc_request_duration_seconds_count",
        "kuberpc_request_bytes_total",
        "kuberpc_response_bytes_total",
        "kuberpc_inflight_requests",
        "kuberpc_endpoints",
        "kuberpc_authz_denied_total",
        "kuberpc_tls_handshake_failures_total",
        "kuberpc_cert_expiry_timestamp_seconds",
        "kuberpc_discovery_updates_total",
        "kuberpc_discovery_watch_restarts_total",
    }
    assert design_samples <= s.names


def test_an_unknown_direction_is_refused() -> None:
    metrics = Metrics(CollectorRegistry())

    with pytest.raises(ValueError, match="direction"):
        metrics.call_started("sideways", SVC)


def test_a_second_metrics_on_the_same_registry_is_refused() -> None:
    registry = CollectorRegistry()
    Metrics(registry)

    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry)
