"""Specification of manifests/monitoring/: alerts that load and fire, dashboard queries that parse,
scrape configuration that finds the proxies and the webhook, all on the metric names of DESIGN §5."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests" / "monitoring"
RULES = MONITORING / "alerts.rules.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
OPERATOR_RULE_TESTS = MONITORING / "operator-alerts.test.yml"
DASHBOARDS = sorted((MONITORING / "dashboards").glob("*.json"))

# DESIGN.md §5, the metrics every proxy and the webhook export (checked against DESIGN.md below).
DESIGN_METRICS = {
    "kuberpc_requests_total",
    "kuberpc_request_duration_seconds",
    "kuberpc_request_bytes_total",
    "kuberpc_response_bytes_total",
    "kuberpc_inflight_requests",
    "kuberpc_endpoints",
    "kuberpc_retries_total",
    "kuberpc_ejections_total",
    "kuberpc_authz_denied_total",
    "kuberpc_tls_handshake_failures_total",
    "kuberpc_cert_expiry_timestamp_seconds",
    "kuberpc_discovery_updates_total",
    "kuberpc_discovery_watch_restarts_total",
    "kuberpc_webhook_admissions_total",
}
HISTOGRAMS = {"kuberpc_request_duration_seconds"}
ALLOWED_NAMES = DESIGN_METRICS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
METRIC = re.compile(r"kuberpc_[a-z_]+")


def _rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return loaded


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in DASHBOARDS]


def _alerts() -> list[dict[str, Any]]:
    return [r for g in _rules()["groups"] for r in g["rules"] if "alert" in r]


def _panels(dashboard: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    boards = _dashboards() if dashboard is None else [dashboard]
    return [p for d in boards for p in d["panels"] if p["type"] != "row"]


def _exprs() -> list[str]:
    return [t["expr"] for p in _panels() for t in p["targets"]]


# ---------------------------------------------------------------------------------------------
# promtool


def test_rules_file_passes_promtool_check(require_tool: Callable[[str, str], str]) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_the_promtool_unit_tests(require_tool: Callable[[str, str], str]) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_cover_every_alert_firing_and_staying_quiet() -> None:
    cases = [
        c
        for path in (RULE_TESTS, OPERATOR_RULE_TESTS)
        for t in yaml.safe_load(path.read_text())["tests"]
        for c in t["alert_rule_test"]
    ]
    for alert in (a["alert"] for a in _alerts()):
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no test where it stays quiet"


def test_dashboard_queries_parse_as_promql(require_tool: Callable[[str, str], str], tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    # promtool parses expressions inside rule files: wrap each query as a recording rule, with
    # Grafana's variables replaced by what Grafana would send.
    substitutions = {"$__rate_interval": "5m", "$namespace": ".*", "$service": ".*", "$method": ".*"}
    rules = []
    for i, expr in enumerate(_exprs()):
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"undeclared variable in {expr}"
        rules.append({"record": f"kuberpc:dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Metric names


def test_design_lists_exactly_the_metrics_these_tests_allow() -> None:
    design = next(
        (p for p in (REPO.parent / "shared" / "DESIGN.md", REPO / "DESIGN.md") if p.is_file()), None
    )
    if design is None:
        pytest.skip("DESIGN.md is not beside the repository")
    section = design.read_text().split("## 5.", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(kuberpc_[a-z_]+)`", section)) == DESIGN_METRICS


def test_alerts_use_only_design_metric_names() -> None:
    used = {m for a in _alerts() for m in METRIC.findall(a["expr"])}
    assert used - ALLOWED_NAMES == set()


def test_dashboard_uses_only_design_metric_names() -> None:
    used = {m for e in _exprs() for m in METRIC.findall(e)}
    assert used - ALLOWED_NAMES == set()


def test_the_regex_catches_a_misspelt_metric() -> None:
    assert METRIC.findall('rate(kuberpc_request_total{grpc_code="0"}[5m])') == ["kuberpc_request_total"]
    assert "kuberpc_request_total" not in ALLOWED_NAMES


def test_prometheusrule_carries_exactly_the_rules_file() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == _rules()["groups"]


# ---------------------------------------------------------------------------------------------
# Alerts


def test_the_contracted_alerts_exist_with_a_severity_and_a_summary() -> None:
    alerts = {a["alert"]: a for a in _alerts()}
    assert {
        "KuberpcHighErrorRate",
        "KuberpcHighLatencyP99",
        "KuberpcNoReadyEndpoints",
        "KuberpcCertExpiringSoon",
        "KuberpcWebhookErrors",
        "KuberpcWebhookDenialsSpike",
        "KuberpcTLSHandshakeFailures",
        "KuberpcProxyDown",
        "KuberpcEndpointEjections",
        "KuberpcRetryBudgetExhausted",
    } <= alerts.keys()
    for a in alerts.values():
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]


def test_error_rate_counts_every_non_ok_numeric_code() -> None:
    (alert,) = [a for a in _alerts() if a["alert"] == "KuberpcHighErrorRate"]
    assert 'grpc_code!="0"' in alert["expr"]


def test_certificate_alert_threshold_is_six_hours() -> None:
    (alert,) = [a for a in _alerts() if a["alert"] == "KuberpcCertExpiringSoon"]
    assert "kuberpc_cert_expiry_timestamp_seconds - time() < 6 * 3600" in alert["expr"]


# ---------------------------------------------------------------------------------------------
# Dashboard


def test_dashboard_shows_every_part_of_the_mesh() -> None:
    exprs = "\n".join(_exprs())
    for metric in (
        "kuberpc_requests_total",
        "kuberpc_request_duration_seconds_bucket",
        "kuberpc_inflight_requests",
        "kuberpc_endpoints",
        "kuberpc_retries_total",
        "kuberpc_ejections_total",
        "kuberpc_authz_denied_total",
        "kuberpc_tls_handshake_failures_total",
        "kuberpc_cert_expiry_timestamp_seconds",
        "kuberpc_webhook_admissions_total",
    ):
        assert metric in exprs, metric
    assert 'grpc_code="0"' in exprs, "success rate"
    assert "sum by (grpc_code)" in exprs, "calls by status code"
    assert "histogram_quantile(0.50," in exprs and "histogram_quantile(0.99," in exprs


@pytest.mark.parametrize("dashboard", _dashboards(), ids=lambda d: d["uid"])
def test_dashboard_panels_have_unique_ids_and_queries(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for p in _panels(dashboard):
        assert p["targets"], p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]


@pytest.mark.parametrize("dashboard", _dashboards(), ids=lambda d: d["uid"])
def test_dashboard_panels_do_not_overlap_on_the_grid(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("dashboard", _dashboards(), ids=lambda d: d["uid"])
def test_dashboard_queries_a_selectable_prometheus_data_source(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = _panels(dashboard)
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\$([a-z_]+)", e)} - {"__rate_interval"}
    assert used <= variables.keys()


# ---------------------------------------------------------------------------------------------
# Scrape configuration: what Prometheus' relabelling makes of real pods


def _relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (keep, drop, replace) as documented: source labels joined with ';',
    the regex anchored at both ends, `$1` references, defaults regex `(.*)` and replacement `$1`."""
    out = dict(labels)
    for c in configs:
        value = c.get("separator", ";").join(out.get(s, "") for s in c.get("source_labels", []))
        match = re.fullmatch(c.get("regex", "(.*)"), value)
        action = c.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$(\d+)", r"\\g<\1>", str(c.get("replacement", "$1")))
            out[c["target_label"]] = match.expand(replacement)
    return out


def _pod_targets(
    pod_labels: dict[str, str],
    annotations: dict[str, str],
    ports: list[tuple[str, int]],
    *,
    ip: str = "10.1.2.3",
    namespace: str = "default",
    name: str = "pod-1",
) -> list[dict[str, str]]:
    """The discovery labels Prometheus' kubernetes_sd (role: pod) gives each declared container port."""

    def clean(k: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", k)

    base = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": "Running",
        "__scheme__": "http",
        "__metrics_path__": "/metrics",
        **{f"__meta_kubernetes_pod_label_{clean(k)}": v for k, v in pod_labels.items()},
        **{f"__meta_kubernetes_pod_annotation_{clean(k)}": v for k, v in annotations.items()},
    }
    return [
        {**base, "__address__": f"{ip}:{port}", "__meta_kubernetes_pod_container_port_name": pname}
        for pname, port in ports
    ]


def _scrape(job: str) -> dict[str, Any]:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    return next(j for j in config["scrape_configs"] if j["job_name"] == job)


def _kept(job: dict[str, Any], targets: list[dict[str, str]]) -> list[dict[str, str]]:
    kept = [_relabel(t, job["relabel_configs"]) for t in targets]
    # After relabelling Prometheus drops the __meta_* labels, then keeps one of several targets
    # that end up identical.
    final = [{k: v for k, v in t.items() if not k.startswith("__meta_")} for t in kept if t is not None]
    unique = {json.dumps(t, sort_keys=True): t for t in final}
    return list(unique.values())


MESHED_POD_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": "15090",
    "prometheus.io/path": "/metrics",
}
MESHED_POD_PORTS = [
    ("grpc", 50051),
    ("proxy-outbound", 15001),
    ("proxy-inbound", 15443),
    ("proxy-admin", 15090),
]


def test_scrape_config_scrapes_a_meshed_pod_once_on_the_admin_port() -> None:
    targets = _pod_targets({"app.kubernetes.io/name": "arith"}, MESHED_POD_ANNOTATIONS, MESHED_POD_PORTS)
    (target,) = _kept(_scrape("kubernetes-pods"), targets)
    assert target["__address__"] == "10.1.2.3:15090"
    assert target["__metrics_path__"] == "/metrics"
    assert (target["namespace"], target["pod"], target["app"]) == ("default", "pod-1", "arith")


def test_scrape_config_ignores_pods_without_the_scrape_annotation() -> None:
    targets = _pod_targets({"app": "web"}, {}, [("http", 8080)])
    assert _kept(_scrape("kubernetes-pods"), targets) == []


def test_scrape_config_ignores_finished_job_pods() -> None:
    targets = _pod_targets({}, MESHED_POD_ANNOTATIONS, MESHED_POD_PORTS)
    for t in targets:
        t["__meta_kubernetes_pod_phase"] = "Succeeded"
    assert _kept(_scrape("kubernetes-pods"), targets) == []


def _webhook_pod() -> tuple[dict[str, str], list[tuple[str, int]]]:
    dep = yaml.safe_load((REPO / "manifests" / "deployment.yaml").read_text())
    template = dep["spec"]["template"]
    ports = [(p["name"], p["containerPort"]) for c in template["spec"]["containers"] for p in c["ports"]]
    return template["metadata"]["labels"], ports


def test_scrape_config_scrapes_the_webhook_over_https_under_the_job_the_alert_watches() -> None:
    labels, ports = _webhook_pod()
    job = _scrape("kuberpc-webhook")
    (target,) = _kept(job, _pod_targets(labels, {}, ports, namespace="kuberpc-system"))
    assert target["__address__"].endswith(":8443")
    assert job["scheme"] == "https"
    (down,) = [a for a in _alerts() if a["alert"] == "KuberpcWebhookDown"]
    assert f'job="{job["job_name"]}"' in down["expr"]


def test_webhook_is_not_scraped_twice_by_the_annotation_job() -> None:
    labels, ports = _webhook_pod()
    assert (
        _kept(_scrape("kubernetes-pods"), _pod_targets(labels, {}, ports, namespace="kuberpc-system")) == []
    )


def test_podmonitors_select_meshed_pods_and_name_the_webhook_job_as_the_alert_expects() -> None:
    docs = {
        d["metadata"]["name"]: d for d in yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())
    }
    proxies = docs["kuberpc-proxies"]["spec"]
    assert proxies["selector"]["matchLabels"] == {"kuberpc.io/injected": "true"}
    assert proxies["namespaceSelector"] == {"any": True}
    assert [e["port"] for e in proxies["podMetricsEndpoints"]] == ["proxy-admin"]
    webhook = docs["kuberpc-webhook"]["spec"]
    labels, _ = _webhook_pod()
    # The Operator sets job to the value of the pod label named by jobLabel.
    assert labels[webhook["jobLabel"]] == "kuberpc-webhook"
    assert webhook["podMetricsEndpoints"][0]["scheme"] == "https"


# ---------------------------------------------------------------------------------------------
# Operator alerts (group kuberpc-operator) and the three dashboards (issue 12)

OPERATOR_GROUP = "kuberpc-operator"
# Metrics counting calls or call latency: each query on them must say which proxy reports the call.
CALL_METRICS = re.compile(
    r"kuberpc_(requests_total|request_duration_seconds_bucket|request_bytes_total|response_bytes_total"
    r"|inflight_requests)\{([^}]*)\}"
)


def test_operator_alerts_fire_and_stay_quiet_in_their_promtool_unit_tests(
    require_tool: Callable[[str, str], str],
) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "test", "rules", OPERATOR_RULE_TESTS.name],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_operators_are_alerted_on_proxy_down_budget_burn_certificates_discovery_and_the_webhook() -> None:
    alerts = {a["alert"] for a in _alerts()}
    operator = {r["alert"] for g in _rules()["groups"] if g["name"] == OPERATOR_GROUP for r in g["rules"]}
    assert operator == {
        "KuberpcErrorBudgetBurnFast",
        "KuberpcErrorBudgetBurnSlow",
        "KuberpcDiscoveryStale",
        "KuberpcWebhookFailingOpen",
    }
    # A proxy down, certificate expiry and the injector's own errors are alerted on by the kuberpc-mesh and
    # kuberpc-injector groups.
    assert {"KuberpcProxyDown", "KuberpcCertExpiringSoon", "KuberpcWebhookErrors", "KuberpcWebhookDown"} <= alerts


def test_the_error_budget_counts_the_client_view_once_and_only_failures_a_service_answers_for() -> None:
    for name in ("KuberpcErrorBudgetBurnFast", "KuberpcErrorBudgetBurnSlow"):
        (alert,) = [a for a in _alerts() if a["alert"] == name]
        selectors = re.findall(r"kuberpc_requests_total\{([^}]*)\}", alert["expr"])
        assert selectors and all('direction="outbound"' in s for s in selectors), name
        assert all('grpc_code=~"2|4|13|14|15"' in s for s in selectors[0::2]), name


def test_one_proxy_down_alert_watches_scrape_targets_known_to_be_proxies() -> None:
    # Proxies are the targets that export a certificate expiry: an app's own port that is down is no proxy.
    (alert,) = [a for a in _alerts() if a["alert"] == "KuberpcProxyDown"]
    assert "up == 0" in alert["expr"] and "kuberpc_cert_expiry_timestamp_seconds" in alert["expr"]


def test_there_is_a_mesh_overview_a_per_service_and_a_control_plane_dashboard() -> None:
    assert {d["uid"] for d in _dashboards()} == {"kuberpc-mesh", "kuberpc-service", "kuberpc-control-plane"}


def test_kustomize_ships_every_dashboard_to_grafana() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert sorted(generator["files"]) == sorted(f"dashboards/{p.name}" for p in DASHBOARDS)


def test_every_call_counting_query_names_the_one_side_that_reports_the_call() -> None:
    """Both proxies report every call: a query over both directions counts it twice."""
    for p in _panels():
        sides = set()
        for target in p["targets"]:
            for _, labels in CALL_METRICS.findall(target["expr"]):
                (side,) = re.findall(r'direction="(outbound|inbound)"', labels) or [None]
                assert side is not None, f"{p['title']}: {target['expr']}"
                sides.add(side)
        if sides:
            assert len(sides) == 1, p["title"]
            view = {"outbound": "client", "inbound": "server"}[sides.pop()]
            assert view in p["title"].lower(), f"{p['title']} must say it shows the {view} view"


def test_client_and_server_latency_are_separate_panels() -> None:
    titles = {p["title"] for p in _panels(next(d for d in _dashboards() if d["uid"] == "kuberpc-mesh"))}
    assert {"Client latency p50 / p95 / p99", "Server latency p50 / p95 / p99"} <= titles


def test_the_service_dashboard_has_a_per_method_table_for_each_view() -> None:
    service = next(d for d in _dashboards() if d["uid"] == "kuberpc-service")
    tables = [p for p in _panels(service) if p["type"] == "table"]
    assert sorted(p["title"] for p in tables) == ["Routes (client view)", "Routes (server view)"]
    for table in tables:
        assert all(t.get("instant") and "by (method" in t["expr"] for t in table["targets"]), table["title"]


def test_a_success_rate_is_zero_not_missing_when_every_call_fails() -> None:
    for p in _panels():
        for target in p["targets"]:
            if 'grpc_code="0"' in target["expr"]:
                assert "\nor\n" in target["expr"] and "* 0" in target["expr"], p["title"]
