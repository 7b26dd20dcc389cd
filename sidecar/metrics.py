"""Every Prometheus metric of the proxy (DESIGN §5), counted in plain dicts and exposed by a custom Collector.

Must not call prometheus_client per call, touch the default registry, keep module-level state, or do I/O.
"""

# Why hand-written counting: prometheus_client's `.labels(...).inc()` costs several µs per call (label
# handling, a lock, a child lookup) and the proxy's whole per-call budget is ~20 µs. Here a call costs a
# few dict lookups and integer adds; prometheus_client is used only at scrape time, through
# CounterMetricFamily / GaugeMetricFamily / HistogramMetricFamily.
#
# Label conventions:
# - `direction` is "outbound" or "inbound".
# - `service` is the mesh name `name.namespace` (str(ServiceKey)).
# - `method` is the gRPC path as received (`/arith.Arith/Add`).
# - `grpc_code` is the numeric gRPC status as a string, "0" (OK) ... "16" (UNAUTHENTICATED), like
#   Linkerd's `grpc_status` and gRPC's own metrics: numbers are the same in every language and cheap to
#   compare. A value outside 0..16 is counted as "other".
# - `tls="false"` is added to `kuberpc_requests_total` for calls placed on a non-meshed endpoint (plaintext,
#   DESIGN §3); mTLS calls' series have no `tls` label, so queries written before it keep their meaning.
#
# Cardinality is bounded because `method` comes from untrusted request paths: at most `max_series`
# distinct (direction, service, method) series are kept and later methods fold into method="other"; at
# most `max_series` distinct services, later ones fold into service="other"; at most REASON_CAP distinct
# `reason` values per metric, later ones fold into reason="other". "other" never collides with a real
# value: services are `name.namespace` and methods start with "/".
#
# Zero where the count is known to be zero, so that a dashboard shows 0 rather than "No data" on a
# healthy mesh: ejections, retries (per known reason), discovery updates and watch restarts of every
# Service in the balancer's view; authorization denials of every Service served inbound; TLS handshake
# failures per known reason. Added at scrape time only, and only for labels already bounded above.
#
# Not thread-safe by design: every method, the scrape included, runs on the proxy's one event loop.

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import NamedTuple

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from sidecar.status import Status

OTHER = "other"
DIRECTIONS = frozenset({"outbound", "inbound"})
GRPC_CODES = frozenset(str(code) for code in Status)
REASON_CAP = 64

# Upper bounds (seconds) of the latency histogram: 0.5 ms (a loopback unary call through two proxies)
# to 10 s (a typical long deadline); slower calls land in +Inf. Same spacing as Prometheus' defaults.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# floatToGoString is the exact `le` spelling prometheus_client's own histograms use ("0.0005", "1.0").
_BUCKET_LABELS: tuple[str, ...] = (
    *(floatToGoString(b) for b in DURATION_BUCKETS),  # type: ignore[no-untyped-call]
    "+Inf",
)

_CALL_LABELS = ("direction", "service")
_METHOD_LABELS = ("direction", "service", "method")


class _Cap:
    """Admits up to `limit` distinct label values; every later value is reported as OTHER.

    Admission is permanent, so a value folds the same way at the start and at the end of a call.
    """

    __slots__ = ("_admitted", "_limit")

    def __init__(self, limit: int) -> None:
        self._admitted: set[str] = set()
        self._limit = limit

    def admit(self, value: str) -> str:
        if value in self._admitted:
            return value
        if len(self._admitted) < self._limit:
            self._admitted.add(value)
            return value
        return OTHER

    def label(self, value: str) -> str:
        """The label `value` is reported under, without admitting it."""
        return value if value in self._admitted else OTHER


class _MethodStats:
    """Per (direction, service, method): status counts and the latency histogram (not cumulative)."""

    __slots__ = ("buckets", "codes", "plain_codes", "sum")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.plain_codes: dict[str, int] = {}  # calls placed on non-meshed endpoints: tls="false"
        self.buckets: list[int] = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0


class _CallStats:
    """Per (direction, service): in-flight calls, bytes, and the methods seen."""

    __slots__ = ("inflight", "methods", "request_bytes", "response_bytes")

    def __init__(self) -> None:
        self.inflight = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.methods: dict[str, _MethodStats] = {}


class Metrics:
    """The proxy's metrics. Registers itself as a Collector on `registry`.

    Raises ValueError at construction if `registry` already holds metrics of the same names.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_series: int = 1000,
        retry_reasons: Iterable[str] = (),
        tls_reasons: Iterable[str] = (),
    ) -> None:
        """`retry_reasons` and `tls_reasons`: the reasons the proxy can report, exported at zero."""
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        self._max_series = max_series
        self._series = 0  # admitted (direction, service, method) series, "other" ones not counted
        self._services = _Cap(max_series)
        self._retry_reasons = _Cap(REASON_CAP)
        self._tls_reasons = _Cap(REASON_CAP)
        self._known_retry_reasons = [self._retry_reasons.admit(r) for r in retry_reasons]
        self._known_tls_reasons = [self._tls_reasons.admit(r) for r in tls_reasons]
        # Keyed by (direction, service label). A folded service misses here on every call and takes
        # the slow path: caching its raw name would let untrusted names grow the dict without bound.
        self._calls: dict[tuple[str, str], _CallStats] = {}
        # Keyed by the raw service name (bounded by the catalog; forget_service removes it) so that a
        # folded service's gauge can be summed into "other" at scrape time instead of overwriting it.
        self._endpoints: dict[str, tuple[int, int]] = {}
        self._retries: dict[tuple[str, str], int] = {}
        self._ejections: dict[str, int] = {}
        self._authz_denied: dict[str, int] = {}
        self._tls_failures: dict[str, int] = {}
        self._cert_expiry: float | None = None
        self._discovery_updates: dict[str, int] = {}
        self._watch_restarts: dict[str, int] = {}
        self._discovery_age: Callable[[], float] | None = None
        registry.register(self)

    # -- the per-call path: keep it to dict lookups and adds -------------------------------------

    def call_started(self, direction: str, service: str) -> None:
        """A call began: in-flight +1."""
        try:
            self._calls[direction, service].inflight += 1
        except KeyError:
            self._call_stats(direction, service).inflight += 1

    def call_finished(
        self,
        direction: str,
        service: str,
        method: str,
        grpc_code: str,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        *,
        plaintext: bool = False,
    ) -> None:
        """A call ended (after call_started with the same direction and service).

        `duration_s` comes from a monotonic clock; bytes are gRPC message bytes (DATA payloads).
        `plaintext`: the call went to a non-meshed endpoint without mTLS (counted with tls="false").
        """
        try:
            calls = self._calls[direction, service]
        except KeyError:
            calls = self._call_stats(direction, service)
        calls.inflight -= 1
        calls.request_bytes += request_bytes
        calls.response_bytes += response_bytes
        try:
            stats = calls.methods[method]
        except KeyError:
            stats = self._method_stats(calls, method)
        stats.buckets[bisect_left(DURATION_BUCKETS, duration_s)] += 1
        stats.sum += duration_s
        codes = stats.plain_codes if plaintext else stats.codes
        try:
            codes[grpc_code] += 1
        except KeyError:
            code = grpc_code if grpc_code in GRPC_CODES else OTHER
            codes[code] = codes.get(code, 0) + 1

    def _call_stats(self, direction: str, service: str) -> _CallStats:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'outbound' or 'inbound', got {direction!r}")
        key = (direction, self._services.admit(service))
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = _CallStats()
        return calls

    def _method_stats(self, calls: _CallStats, method: str) -> _MethodStats:
        if self._series < self._max_series:
            self._series += 1
            stats = calls.methods[method] = _MethodStats()
            return stats
        # Not counted against the cap: at most one "other" series per (direction, service).
        other = calls.methods.get(OTHER)
        if other is None:
            other = calls.methods[OTHER] = _MethodStats()
        return other

    # -- everything else: rare events, clarity over speed --------------------------------------

    def set_endpoints(self, service: str, *, ready: int, ejected: int) -> None:
        """The balancer's current view of `service`: endpoints in use and endpoints ejected."""
        self._services.admit(service)
        self._endpoints[service] = (ready, ejected)

    def forget_service(self, service: str) -> None:
        """`service` left the catalog: its endpoints gauge disappears.

        Its counters stay: Prometheus counters are monotonic for the life of the process, and the
        service cap bounds how many there can be.
        """
        self._endpoints.pop(service, None)

    def retry(self, service: str, reason: str) -> None:
        key = (self._services.admit(service), self._retry_reasons.admit(reason))
        self._retries[key] = self._retries.get(key, 0) + 1

    def ejection(self, service: str) -> None:
        _increment(self._ejections, self._services.admit(service))

    def authz_denied(self, service: str) -> None:
        _increment(self._authz_denied, self._services.admit(service))

    def tls_handshake_failure(self, reason: str) -> None:
        _increment(self._tls_failures, self._tls_reasons.admit(reason))

    def set_cert_expiry(self, timestamp: float) -> None:
        """notAfter of the current workload certificate, in seconds since the epoch."""
        self._cert_expiry = timestamp

    def discovery_update(self, service: str) -> None:
        _increment(self._discovery_updates, self._services.admit(service))

    def watch_restart(self, service: str) -> None:
        _increment(self._watch_restarts, self._services.admit(service))

    def discovery_age(self, age: Callable[[], float]) -> None:
        """Where kuberpc_discovery_last_update_age_seconds is read at scrape time: seconds since the source last
        knew its endpoints current (0 while its stream is up; grows while no control plane answers)."""
        self._discovery_age = age

    # -- the Collector protocol, called by the registry at scrape time -------------------------

    def describe(self) -> list[Metric]:
        """The families without samples: lets the registry refuse a second collector of the same names."""
        return list(_new_families())

    def collect(self) -> list[Metric]:
        f = _new_families()
        for (direction, service), calls in sorted(self._calls.items()):
            call_labels = [direction, service]
            f.inflight.add_metric(call_labels, calls.inflight)
            f.request_bytes.add_metric(call_labels, calls.request_bytes)
            f.response_bytes.add_metric(call_labels, calls.response_bytes)
            for method, stats in sorted(calls.methods.items()):
                for code, count in sorted(stats.codes.items()):
                    f.requests.add_metric([direction, service, method, code], count)
                for code, count in sorted(stats.plain_codes.items()):
                    # DESIGN §3: plaintext calls carry tls="false"; the label is absent from mTLS calls'
                    # series, so existing queries keep their meaning and {tls="false"} selects these.
                    labels = {"direction": direction, "service": service, "method": method, "grpc_code": code}
                    f.requests.samples.append(Sample("kuberpc_requests_total", {**labels, "tls": "false"}, count))
                cumulative = map(float, accumulate(stats.buckets))
                f.duration.add_metric(
                    [direction, service, method],
                    buckets=list(zip(_BUCKET_LABELS, cumulative, strict=True)),
                    sum_value=stats.sum,
                )
        by_label: dict[str, tuple[int, int]] = {}
        for service, (ready, ejected) in self._endpoints.items():
            label = self._services.label(service)
            seen_ready, seen_ejected = by_label.get(label, (0, 0))
            by_label[label] = (seen_ready + ready, seen_ejected + ejected)
        for service, (ready, ejected) in sorted(by_label.items()):
            f.endpoints.add_metric([service, "ready"], ready)
            f.endpoints.add_metric([service, "ejected"], ejected)
        balanced = dict.fromkeys(by_label, 0)
        served = {service: 0 for direction, service in self._calls if direction == "inbound"}
        retries = {(s, r): 0 for s in balanced for r in self._known_retry_reasons} | self._retries
        for (service, reason), count in sorted(retries.items()):
            f.retries.add_metric([service, reason], count)
        for family, counts in (
            (f.ejections, balanced | self._ejections),
            (f.authz_denied, served | self._authz_denied),
            (f.tls_failures, dict.fromkeys(self._known_tls_reasons, 0) | self._tls_failures),
            (f.discovery_updates, balanced | self._discovery_updates),
            (f.watch_restarts, balanced | self._watch_restarts),
        ):
            for label, count in sorted(counts.items()):
                family.add_metric([label], count)
        if self._cert_expiry is not None:
            f.cert_expiry.add_metric([], self._cert_expiry)
        if self._discovery_age is not None:
            f.discovery_age.add_metric([], self._discovery_age())
        return list(f)


class _Families(NamedTuple):
    """One scrape's metric families, in DESIGN §5 order."""

    requests: CounterMetricFamily
    duration: HistogramMetricFamily
    request_bytes: CounterMetricFamily
    response_bytes: CounterMetricFamily
    inflight: GaugeMetricFamily
    endpoints: GaugeMetricFamily
    retries: CounterMetricFamily
    ejections: CounterMetricFamily
    authz_denied: CounterMetricFamily
    tls_failures: CounterMetricFamily
    cert_expiry: GaugeMetricFamily
    discovery_updates: CounterMetricFamily
    watch_restarts: CounterMetricFamily
    discovery_age: GaugeMetricFamily


def _new_families() -> _Families:
    return _Families(
        requests=CounterMetricFamily(
            "kuberpc_requests_total", "gRPC calls completed by the proxy.",
            labels=(*_METHOD_LABELS, "grpc_code"),
        ),
        duration=HistogramMetricFamily(
            "kuberpc_request_duration_seconds", "Duration of gRPC calls through the proxy.",
            labels=_METHOD_LABELS,
        ),
        request_bytes=CounterMetricFamily(
            "kuberpc_request_bytes_total", "gRPC message bytes sent by callers.", labels=_CALL_LABELS
        ),
        response_bytes=CounterMetricFamily(
            "kuberpc_response_bytes_total", "gRPC message bytes returned to callers.", labels=_CALL_LABELS
        ),
        inflight=GaugeMetricFamily(
            "kuberpc_inflight_requests", "gRPC calls in progress through the proxy.", labels=_CALL_LABELS
        ),
        endpoints=GaugeMetricFamily(
            "kuberpc_endpoints", "Endpoints of a Service known to the balancer, by state.",
            labels=("service", "state"),
        ),
        retries=CounterMetricFamily(
            "kuberpc_retries_total", "gRPC calls retried by the proxy.", labels=("service", "reason")
        ),
        ejections=CounterMetricFamily(
            "kuberpc_ejections_total", "Endpoints ejected from balancing as unhealthy.", labels=("service",)
        ),
        authz_denied=CounterMetricFamily(
            "kuberpc_authz_denied_total", "Inbound calls refused by the Service's allow policy.",
            labels=("service",),
        ),
        tls_failures=CounterMetricFamily(
            "kuberpc_tls_handshake_failures_total", "Failed mTLS handshakes.", labels=("reason",)
        ),
        cert_expiry=GaugeMetricFamily(
            "kuberpc_cert_expiry_timestamp_seconds",
            "Expiry of the current workload certificate, in seconds since the epoch.",
            labels=(),
        ),
        discovery_updates=CounterMetricFamily(
            "kuberpc_discovery_updates_total", "Endpoint set updates received per Service.",
            labels=("service",),
        ),
        watch_restarts=CounterMetricFamily(
            "kuberpc_discovery_watch_restarts_total", "Discovery watches restarted per Service.",
            labels=("service",),
        ),
        discovery_age=GaugeMetricFamily(
            "kuberpc_discovery_last_update_age_seconds",
            "Seconds since discovery last knew its endpoints current (0 while the control plane stream is up; "
            "the last known endpoints serve meanwhile).",
            labels=(),
        ),
    )


def _increment(counts: dict[str, int], label: str) -> None:
    counts[label] = counts.get(label, 0) + 1
