"""The patch, specified by the Pod it produces: build it, apply it with jsonpatch, look at the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import jsonpatch
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar import config as proxy_config
from sidecar.policy import UpstreamsError, parse_upstreams
from webhook import annotations as a
from webhook.config import InjectorConfig
from webhook.patch import PROXY_VOLUME_NAMES, Outcome, mutate, proxy_volumes, unknown_annotations

Review = Callable[[str], dict[str, Any]]
Apply = Callable[[dict[str, Any], Outcome], dict[str, Any]]
FIXTURES = ("deployment-pod-review", "job-pod-review", "bare-pod-review")
OPT_IN_NS = {a.NAMESPACE_INJECT_LABEL: a.INJECT_ENABLED}


def admit(r: dict[str, Any], cfg: InjectorConfig, ns_labels: dict[str, str] | None = None) -> Outcome:
    req = r["request"]
    return mutate(req["object"], OPT_IN_NS if ns_labels is None else ns_labels, cfg, namespace=req["namespace"])


def injected(review: Review, apply: Apply, name: str, cfg: InjectorConfig, **annotations: str) -> dict[str, Any]:
    r = review(name)
    pod = r["request"]["object"]
    pod["metadata"].setdefault("annotations", {}).update({a.PREFIX + k.replace("_", "-"): v for k, v in annotations.items()})
    outcome = admit(r, cfg)
    assert outcome.result == "injected", outcome
    return apply(pod, outcome)


def proxy_of(pod: dict[str, Any]) -> dict[str, Any]:
    for key in ("initContainers", "containers"):
        for c in pod["spec"].get(key, []):
            if c["name"] == a.PROXY_CONTAINER:
                return c  # type: ignore[no-any-return]
    raise AssertionError("no proxy container")


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- where the proxy goes ---


def test_native_mode_puts_the_proxy_first_in_init_containers_with_restart_always(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "deployment-pod-review", native_cfg)
    proxy = pod["spec"]["initContainers"][0]
    assert proxy["name"] == a.PROXY_CONTAINER
    assert proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15090, "scheme": "HTTP"}
    assert [c["name"] for c in pod["spec"]["containers"]] == ["server"]
    assert "lifecycle" not in proxy


def test_native_proxy_goes_before_the_pods_own_init_containers(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "job-pod-review", native_cfg)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [a.PROXY_CONTAINER, "fetch"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["report", "uploader"]


def test_older_cluster_gets_a_regular_first_container_holding_the_app_until_ready(review: Review, apply: Apply, legacy_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "deployment-pod-review", legacy_cfg)
    proxy = pod["spec"]["containers"][0]
    assert proxy["name"] == a.PROXY_CONTAINER
    assert "restartPolicy" not in proxy
    assert proxy["lifecycle"]["postStart"]["exec"]["command"] == ["python", "-m", "sidecar", "wait-ready", "--timeout", "120"]
    assert [c["name"] for c in pod["spec"]["containers"]] == [a.PROXY_CONTAINER, "server"]
    assert "initContainers" not in pod["spec"]


def test_native_sidecar_false_annotation_forces_a_regular_container(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "deployment-pod-review", native_cfg, native_sidecar="false")
    assert pod["spec"]["containers"][0]["name"] == a.PROXY_CONTAINER
    assert "initContainers" not in pod["spec"]


def test_native_sidecar_true_annotation_forces_native_when_the_version_is_unknown(review: Review, apply: Apply) -> None:
    cfg = InjectorConfig(kubernetes_version=None)
    assert not cfg.native_by_default
    pod = injected(review, apply, "deployment-pod-review", cfg, native_sidecar="true")
    assert pod["spec"]["initContainers"][0]["restartPolicy"] == "Always"


def test_config_native_sidecar_false_wins_over_a_new_cluster(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "deployment-pod-review", replace(native_cfg, native_sidecar="false"))
    assert pod["spec"]["containers"][0]["name"] == a.PROXY_CONTAINER


def test_startup_hold_off_leaves_out_the_post_start_hook(review: Review, apply: Apply, legacy_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "deployment-pod-review", replace(legacy_cfg, startup_hold=False))
    assert "lifecycle" not in pod["spec"]["containers"][0]


# --- the container ---


def test_the_proxy_accepts_the_injected_environment(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    proxy = proxy_of(injected(review, apply, "job-pod-review", native_cfg))
    names = [e["name"] for e in proxy["env"]]
    assert set(names) <= set(proxy_config.ENV_DOC)
    downward = {"metadata.name": "report-28891234-abcde", "metadata.namespace": "batch", "status.podIP": "10.1.2.3", "spec.serviceAccountName": "default"}
    environ = {e["name"]: e.get("value") or downward[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in proxy["env"]}
    cfg = proxy_config.load(environ)
    assert cfg.inbound is None  # the first app container ("report") declares no port
    assert [(str(u.service), u.port, u.local_port) for u in cfg.upstreams] == [("arith.shop", 50051, 9001), ("ledger.batch", 7000, 9002)]
    assert cfg.namespace == "batch" and cfg.service_account == "default"


def test_env_carries_identity_paths_config_and_downward_api(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg)))
    assert env["KUBERPC_APP_PORT"] == "50051"
    assert env["KUBERPC_DISCOVERY"] == "control-plane:kuberpc-webhook.kuberpc-system.svc:8082"
    assert env["KUBERPC_TLS_CERT"] == "/var/run/kuberpc/identity/cert.pem"
    assert env["KUBERPC_TLS_KEY"] == "/var/run/kuberpc/identity/key.pem"
    assert env["KUBERPC_TRUST_ANCHORS"] == "/var/run/kuberpc/trust-anchors/ca.pem"
    assert env["KUBERPC_IDENTITY_ADDR"] == "kuberpc-webhook.kuberpc-system.svc:8081"
    assert env["KUBERPC_IDENTITY_TOKEN"] == "/var/run/secrets/kuberpc.io/tokens/kuberpc-identity"
    assert env["KUBERPC_TRUST_DOMAIN"] == "cluster.local"
    assert env["KUBERPC_LOG_LEVEL"] == "info"
    assert env["KUBERPC_DRAIN_SECONDS"] == "25"
    assert {k: env[k]["fieldRef"]["fieldPath"] for k in ("POD_NAME", "POD_NAMESPACE", "POD_IP", "SERVICE_ACCOUNT")} == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "POD_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
    }
    assert "KUBERPC_UPSTREAMS" not in env


def test_image_args_and_named_ports(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    proxy = proxy_of(injected(review, apply, "deployment-pod-review", native_cfg))
    assert proxy["image"] == "ghcr.io/kuberpc/proxy:0.1.0"
    assert proxy["args"] == ["run"]
    assert {p["name"]: p["containerPort"] for p in proxy["ports"]} == {
        "proxy-outbound": 15001,
        "proxy-inbound": 15443,
        "proxy-admin": 15090,
    }


def test_proxy_image_annotation_overrides_the_config(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    proxy = proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, proxy_image="registry.local/proxy:dev"))
    assert proxy["image"] == "registry.local/proxy:dev"


def test_probes_watch_ready_and_live_on_the_admin_port(review: Review, apply: Apply, legacy_cfg: InjectorConfig) -> None:
    proxy = proxy_of(injected(review, apply, "deployment-pod-review", legacy_cfg))
    assert proxy["startupProbe"]["httpGet"]["path"] == "/ready"
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert proxy["livenessProbe"]["httpGet"]["path"] == "/live"
    assert {proxy[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")} == {15090}


def test_security_context_is_locked_down(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    sc = proxy_of(injected(review, apply, "deployment-pod-review", native_cfg))["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 65532
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_default_resources_are_modest(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    res = proxy_of(injected(review, apply, "deployment-pod-review", native_cfg))["resources"]
    assert res == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}


def test_proxy_cpu_and_memory_set_requests_and_raise_limits_when_needed(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    res = proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, proxy_cpu="2", proxy_memory="128Mi"))["resources"]
    assert res == {"requests": {"cpu": "2", "memory": "128Mi"}, "limits": {"cpu": "2", "memory": "256Mi"}}


# --- volumes ---


def test_adds_token_trust_anchor_and_in_memory_identity_volumes(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "job-pod-review", native_cfg)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert list(volumes)[:2] == ["work", "kube-api-access-q9d8w"]
    token = volumes["kuberpc-identity-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "kuberpc-identity" and token["path"] == "kuberpc-identity"
    assert volumes["kuberpc-trust-anchors"]["configMap"]["name"] == "kuberpc-trust-anchors"
    assert volumes["kuberpc-identity"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m for m in proxy_of(pod)["volumeMounts"]}
    assert mounts["kuberpc-identity-token"]["mountPath"] == "/var/run/secrets/kuberpc.io/tokens"
    assert mounts["kuberpc-trust-anchors"]["readOnly"] is True
    assert mounts["kuberpc-identity"]["mountPath"] == "/var/run/kuberpc/identity"


@pytest.mark.parametrize("automount", [None, False])
def test_with_control_plane_discovery_the_pod_gets_no_api_token_only_the_identity_token(
    review: Review, apply: Apply, native_cfg: InjectorConfig, automount: bool | None
) -> None:
    """The default: discovery streams from the control plane, so nothing the webhook adds can reach the Kubernetes
    API. The one token injected has the identity service's audience, which the API server refuses."""
    r = review("deployment-pod-review")
    pod = r["request"]["object"]
    if automount is not None:
        pod["spec"]["automountServiceAccountToken"] = automount
    volumes_before = [v["name"] for v in pod["spec"].get("volumes", [])]
    apps_before = [dict(c) for c in pod["spec"]["containers"]]
    patched = apply(pod, admit(r, native_cfg))
    added = [v for v in patched["spec"]["volumes"] if v["name"] not in volumes_before]
    tokens = [
        src["serviceAccountToken"]
        for v in added
        for src in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in src
    ]
    assert tokens == [{"audience": "kuberpc-identity", "expirationSeconds": 3600, "path": "kuberpc-identity"}]
    assert "kuberpc-api-access" not in {v["name"] for v in added}
    mounts = {m["mountPath"] for m in proxy_of(patched)["volumeMounts"]}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" not in mounts
    assert env_of(proxy_of(patched))["KUBERPC_DISCOVERY"] == "control-plane:kuberpc-webhook.kuberpc-system.svc:8082"
    assert patched["spec"]["containers"] == apps_before
    assert patched["spec"].get("automountServiceAccountToken") == automount


def test_the_discovery_address_comes_from_the_injector_config(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    cfg = replace(native_cfg, discovery_addr="discovery.mesh.svc:9443")
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", cfg)))
    assert env["KUBERPC_DISCOVERY"] == "control-plane:discovery.mesh.svc:9443"


@pytest.mark.parametrize("automount", [None, False])
def test_direct_discovery_gives_the_proxy_its_own_api_credentials_where_in_cluster_clients_look(
    review: Review, apply: Apply, native_cfg: InjectorConfig, automount: bool | None
) -> None:
    """`kuberpc.io/discovery: direct`: the ServiceAccount plugin ran before the webhook and mounts nothing when
    automount is off; direct discovery needs the API either way, so the proxy's container gets a bound token,
    the cluster CA and the namespace."""
    r = review("deployment-pod-review")
    pod = r["request"]["object"]
    pod["metadata"].setdefault("annotations", {})["kuberpc.io/discovery"] = "direct"
    if automount is not None:
        pod["spec"]["automountServiceAccountToken"] = automount
    apps_before = [dict(c) for c in pod["spec"]["containers"]]
    patched = apply(pod, admit(r, native_cfg))
    sources = {k: v for s in {v["name"]: v for v in patched["spec"]["volumes"]}["kuberpc-api-access"]["projected"]["sources"] for k, v in s.items()}
    assert sources["serviceAccountToken"] == {"expirationSeconds": 3607, "path": "token"}  # the API server's audience
    assert sources["configMap"] == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert sources["downwardAPI"]["items"] == [
        {"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    ]
    assert env_of(proxy_of(patched))["KUBERPC_DISCOVERY"] == "kubernetes"
    mounts = {m["mountPath"]: m for m in proxy_of(patched)["volumeMounts"]}
    assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"] == {
        "name": "kuberpc-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True
    }
    # The app keeps exactly what it had: the pod's own choice about API credentials stands for the app.
    assert patched["spec"]["containers"] == apps_before
    assert patched["spec"].get("automountServiceAccountToken") == automount


def test_creates_the_volumes_list_when_the_pod_has_none(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("bare-pod-review")
    assert "volumes" not in r["request"]["object"]["spec"]
    pod = apply(r["request"]["object"], admit(r, native_cfg))
    assert {v["name"] for v in pod["spec"]["volumes"]} == {
        "kuberpc-identity", "kuberpc-trust-anchors", "kuberpc-identity-token"
    }


# --- metadata ---


def test_adds_scrape_annotations_and_injection_markers(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    meta = injected(review, apply, "deployment-pod-review", native_cfg)["metadata"]
    assert meta["annotations"]["prometheus.io/scrape"] == "true"
    assert meta["annotations"]["prometheus.io/port"] == "15090"
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    assert meta["annotations"]["kuberpc.io/injected"] == "0.1.0"
    assert meta["labels"]["kuberpc.io/injected"] == "true"
    assert meta["labels"]["app"] == "arith-server"
    assert meta["generateName"] == "arith-server-6d9f7c8b5d-" and "name" not in meta


def test_keys_containing_slashes_are_escaped_in_patch_paths(review: Review, native_cfg: InjectorConfig) -> None:
    paths = [op["path"] for op in admit(review("deployment-pod-review"), native_cfg).patch]
    assert "/metadata/annotations/prometheus.io~1scrape" in paths
    assert "/metadata/labels/kuberpc.io~1injected" in paths


def test_creates_annotation_and_label_maps_when_the_pod_has_none(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("bare-pod-review")
    assert "annotations" not in r["request"]["object"]["metadata"]
    pod = apply(r["request"]["object"], admit(r, native_cfg))
    assert pod["metadata"]["labels"] == {"kuberpc.io/injected": "true"}
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "debug"


def test_default_container_names_the_first_app_container(review: Review, apply: Apply, legacy_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "job-pod-review", legacy_cfg)
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "report"


def test_an_existing_default_container_annotation_is_kept(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("job-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = "uploader"
    pod = apply(r["request"]["object"], admit(r, native_cfg))
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "uploader"


def test_the_apps_own_scrape_annotations_are_kept_with_a_warning(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["prometheus.io/port"] = "9102"
    outcome = admit(r, native_cfg)
    pod = apply(r["request"]["object"], outcome)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9102"
    assert any("prometheus.io/port" in w for w in outcome.warnings)


# --- derived settings ---


def test_app_port_annotation_wins_over_the_first_container_port(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, app_port="50052")))
    assert env["KUBERPC_APP_PORT"] == "50052"


def test_a_pod_without_ports_gets_inbound_off(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("bare-pod-review")
    env = env_of(proxy_of(apply(r["request"]["object"], admit(r, native_cfg))))
    assert env["KUBERPC_INBOUND_ADDR"] == "off"
    assert "KUBERPC_APP_PORT" not in env


def test_upstreams_are_normalised_to_service_namespace_port(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "job-pod-review", native_cfg)))
    assert env["KUBERPC_UPSTREAMS"] == "arith.shop:50051=9001,ledger.batch:7000=9002"


@pytest.mark.parametrize(("grace", "drain"), [(30, "25"), (60, "55"), (3, "1"), (None, "25")])
def test_drain_seconds_default_to_grace_period_minus_five(review: Review, apply: Apply, native_cfg: InjectorConfig, grace: int | None, drain: str) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["spec"].pop("terminationGracePeriodSeconds")
    if grace is not None:
        r["request"]["object"]["spec"]["terminationGracePeriodSeconds"] = grace
    env = env_of(proxy_of(apply(r["request"]["object"], admit(r, native_cfg))))
    assert env["KUBERPC_DRAIN_SECONDS"] == drain


def test_drain_seconds_annotation_is_passed_to_the_proxy(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, drain_seconds="12.5")))
    assert env["KUBERPC_DRAIN_SECONDS"] == "12.5"


def test_proxy_log_level_annotation_is_passed_to_the_proxy(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, proxy_log_level="DEBUG")))
    assert env["KUBERPC_LOG_LEVEL"] == "debug"


# --- idempotence ---


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("mode", ["native", "legacy"])
def test_a_second_admission_of_the_patched_pod_yields_no_patch(
    review: Review, apply: Apply, native_cfg: InjectorConfig, legacy_cfg: InjectorConfig, name: str, mode: str
) -> None:
    cfg = native_cfg if mode == "native" else legacy_cfg
    r = review(name)
    first = admit(r, cfg)
    assert first.result == "injected"
    again = admit({"request": {**r["request"], "object": apply(r["request"]["object"], first)}}, cfg)
    assert again.result == "skipped" and again.patch == ()
    assert again.warnings == ("kuberpc: not injected: already injected",)


@pytest.mark.parametrize(
    "mark",
    [
        {"annotations": {a.INJECTED: "0.0.9"}},
        {"labels": {a.INJECTED: "true"}},
    ],
)
def test_either_marker_alone_means_already_injected(review: Review, native_cfg: InjectorConfig, mark: dict[str, dict[str, str]]) -> None:
    r = review("deployment-pod-review")
    for key, entries in mark.items():
        r["request"]["object"]["metadata"][key].update(entries)
    assert admit(r, native_cfg).result == "skipped"


def test_a_pod_already_carrying_a_proxy_container_is_not_injected_again(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["spec"]["containers"].append({"name": a.PROXY_CONTAINER, "image": "x"})
    outcome = mutate(r["request"]["object"], OPT_IN_NS, native_cfg, namespace="shop")
    assert (outcome.result, outcome.warnings) == ("skipped", ("kuberpc: not injected: already injected",))


# --- skips ---


def test_disabled_annotation_wins_over_an_opted_in_namespace(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.INJECT] = "disabled"
    outcome = admit(r, native_cfg, OPT_IN_NS)
    assert (outcome.result, outcome.patch) == ("skipped", ())
    assert outcome.warnings == ("kuberpc: not injected: kuberpc.io/inject is disabled",)


def test_enabled_annotation_wins_over_a_disabled_namespace(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    assert admit(r, native_cfg, {a.NAMESPACE_INJECT_LABEL: "disabled"}).result == "injected"


def test_pod_without_annotation_in_a_plain_namespace_is_not_opted_in(review: Review, native_cfg: InjectorConfig) -> None:
    outcome = admit(review("bare-pod-review"), native_cfg, {})
    assert outcome.result == "skipped" and outcome.patch == ()
    assert "not opted in" in outcome.warnings[0]


def test_namespace_label_opts_in_a_pod_without_annotation(review: Review, native_cfg: InjectorConfig) -> None:
    assert admit(review("bare-pod-review"), native_cfg, OPT_IN_NS).result == "injected"


def test_host_network_pods_are_skipped(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["spec"]["hostNetwork"] = True
    outcome = admit(r, native_cfg)
    assert outcome.result == "skipped" and "hostNetwork" in outcome.warnings[0]


def test_the_control_planes_own_namespace_is_skipped(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["namespace"] = "kuberpc-system"
    outcome = admit(r, native_cfg)
    assert outcome.result == "skipped" and "control plane" in outcome.warnings[0]


# --- denials: only for values that would break the pod ---


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("app-port", "grpc", "'grpc' is not a port"),
        ("app-port", "70000", "'70000' is not a port"),
        ("app-port", "15443", "15443 is one of the proxy's ports"),
        ("upstreams", "arith", "'arith' is not svc.ns:port=localport"),
        ("upstreams", "Arith.shop:50051=9001", "'Arith' is not a DNS label"),
        ("upstreams", "arith.shop:50051=15001", "local port 15001 is a proxy port"),
        ("upstreams", "arith:1=9001,ledger:2=9001", "local port 9001 is used twice"),
        ("upstreams", "arith:1=50051", "local port 50051 is a port of container 'server'"),
        ("proxy-cpu", "lots", "'lots' is not a Kubernetes quantity"),
        ("proxy-memory", "-1Gi", "'-1Gi' is not a Kubernetes quantity"),
        ("proxy-memory", "0", "'0' is not a Kubernetes quantity"),
        ("drain-seconds", "soon", "'soon' is not a number of seconds"),
        ("drain-seconds", "7200", "'7200' is not a number of seconds"),
        ("proxy-image", "not an image", "'not an image' is not an image reference"),
    ],
)
def test_values_that_would_break_the_pod_are_denied_naming_annotation_and_value(
    review: Review, native_cfg: InjectorConfig, key: str, value: str, says: str
) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.PREFIX + key] = value
    outcome = admit(r, native_cfg)
    assert outcome.result == "denied" and outcome.patch == ()
    assert f"kuberpc.io/{key}" in outcome.message and says in outcome.message


def test_an_app_container_port_on_a_proxy_port_is_denied(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["spec"]["containers"][0]["ports"].append({"containerPort": 15090})
    outcome = admit(r, native_cfg)
    assert outcome.result == "denied" and "'server' port 15090" in outcome.message


def test_a_denial_lists_every_bad_annotation(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"].update({a.APP_PORT: "x", a.PROXY_CPU: "y", a.DRAIN_SECONDS: "z"})
    message = admit(r, native_cfg).message
    assert all(k in message for k in (a.APP_PORT, a.PROXY_CPU, a.DRAIN_SECONDS))


# --- warnings: values the webhook corrects ---


@pytest.mark.parametrize(("value", "written"), [("20000", "10000"), ("-3", "0"), ("heavy", "100"), ("1.5", "100")])
def test_a_bad_weight_is_corrected_in_the_pod_with_a_warning(
    review: Review, apply: Apply, native_cfg: InjectorConfig, value: str, written: str
) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.WEIGHT] = value
    outcome = admit(r, native_cfg)
    assert outcome.result == "injected"
    assert apply(r["request"]["object"], outcome)["metadata"]["annotations"][a.WEIGHT] == written
    assert any(a.WEIGHT in w and repr(value) in w for w in outcome.warnings)


def test_a_valid_weight_is_left_alone(review: Review, native_cfg: InjectorConfig) -> None:
    outcome = admit(review("deployment-pod-review"), native_cfg)
    assert outcome.warnings == ()
    assert all("weight" not in op["path"] for op in outcome.patch)


def test_native_sidecar_neither_true_nor_false_warns_and_uses_the_default(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.NATIVE_SIDECAR] = "yes"
    outcome = admit(r, native_cfg)
    assert apply(r["request"]["object"], outcome)["spec"]["initContainers"][0]["name"] == a.PROXY_CONTAINER
    assert outcome.warnings == ("kuberpc: kuberpc.io/native-sidecar: 'yes' is not true/false; using true",)


def test_unknown_log_level_warns_and_uses_the_configured_level(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.PROXY_LOG_LEVEL] = "verbose"
    outcome = admit(r, native_cfg)
    assert env_of(proxy_of(apply(r["request"]["object"], outcome)))["KUBERPC_LOG_LEVEL"] == "info"
    assert outcome.warnings == ("kuberpc: kuberpc.io/proxy-log-level: 'verbose' is unknown; using info",)


def test_drain_longer_than_the_grace_period_warns(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.DRAIN_SECONDS] = "45"
    assert admit(r, native_cfg).warnings == ("kuberpc: kuberpc.io/drain-seconds: 45 exceeds terminationGracePeriodSeconds 30",)


def test_warnings_escape_control_characters_and_stay_short(native_cfg: InjectorConfig) -> None:
    pod = {"metadata": {"annotations": {a.INJECT: "enabled", a.WEIGHT: "\x1b[31m" + "9" * 200}}, "spec": {"containers": [{"name": "c"}]}}
    (warning,) = mutate(pod, {}, native_cfg, namespace="x").warnings
    assert "\x1b" not in warning and len(warning) < 120


# --- properties ---

ANNOTATION_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "0", "1", "15001", "65536", "true", "enabled", "1Gi", "100m", "a:1=2", "a.b:1=9001,c:2=9002"]),
)
POD_ANNOTATIONS = st.dictionaries(
    st.sampled_from([a.APP_PORT, a.UPSTREAMS, a.WEIGHT, a.PROXY_CPU, a.PROXY_MEMORY, a.PROXY_LOG_LEVEL, a.PROXY_IMAGE, a.NATIVE_SIDECAR, a.DRAIN_SECONDS, "prometheus.io/scrape", "x/y~z"]),
    ANNOTATION_VALUES,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(annotations=POD_ANNOTATIONS, native=st.booleans(), with_labels=st.booleans())
def test_any_annotations_give_a_clean_patch_or_a_denial_and_reinjection_is_a_no_op(
    review: Review, annotations: dict[str, str], native: bool, with_labels: bool
) -> None:
    cfg = InjectorConfig(kubernetes_version=(1, 30) if native else (1, 27))
    r = review("job-pod-review")
    pod = r["request"]["object"]
    pod["metadata"]["annotations"].update(annotations)
    if not with_labels:
        del pod["metadata"]["labels"]
    outcome = admit(r, cfg)
    assert outcome.result in ("injected", "denied")
    if outcome.result == "denied":
        assert outcome.message.startswith("kuberpc: ") and outcome.patch == ()
        return
    patched = jsonpatch.apply_patch(pod, list(outcome.patch))
    assert patched["metadata"]["labels"][a.INJECTED] == "true"
    assert mutate(patched, OPT_IN_NS, cfg, namespace="batch").patch == ()


UPSTREAM_ENTRIES = st.builds(
    "{}{}:{}={}".format,
    st.sampled_from(["arith", "ledger.batch", "arith.shop.svc", "a.b.svc.cluster.local", "Arith", "a.b.c", "", " x "]),
    st.sampled_from(["", " "]),
    st.sampled_from(["1", "50051", "000080", "+1", "0", "65536", "\u0665", " 7 "]),
    st.sampled_from(["9001", "9002", "8080", "15001", "15091", "0", "x", "\xb2", " 9003"]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(UPSTREAM_ENTRIES | st.text(max_size=12), max_size=4).map(",".join))
def test_the_proxy_reads_injected_upstreams_as_the_injector_accepted_them_and_both_refuse_the_same(
    review: Review, native_cfg: InjectorConfig, text: str
) -> None:
    # Before one parser served both, each side accepted values the other refused (tests/sidecar/test_upstreams.py).
    r = review("job-pod-review")  # namespace batch; container "uploader" listens on 8080
    r["request"]["object"]["metadata"]["annotations"][a.UPSTREAMS] = text
    outcome = admit(r, native_cfg)
    try:
        expected = parse_upstreams(text, "batch")
    except UpstreamsError:
        assert outcome.result == "denied" and a.UPSTREAMS in outcome.message
        return
    if any(u.local_port == 8080 for u in expected):
        assert outcome.result == "denied" and "local port 8080 is a port of container 'uploader'" in outcome.message
        return
    assert outcome.result == "injected", outcome
    pod = jsonpatch.apply_patch(r["request"]["object"], list(outcome.patch))
    env = {e["name"]: e.get("value") or "x" for e in proxy_of(pod)["env"]}
    if expected:
        assert proxy_config.load(env).upstreams == expected
    else:
        assert "KUBERPC_UPSTREAMS" not in env


@pytest.mark.parametrize(("value", "written"), [("+5", "5"), ("-0", "0"), ("20000", "10000"), ("heavy", "100")])
def test_a_weight_the_proxies_would_not_read_as_meant_is_rewritten(
    review: Review, apply: Apply, native_cfg: InjectorConfig, value: str, written: str
) -> None:
    # "+5" passed the injector unchanged, then every proxy refused it and used 100.
    pod = injected(review, apply, "deployment-pod-review", native_cfg, weight=value)
    assert pod["metadata"]["annotations"][a.WEIGHT] == written


def test_a_weight_the_proxies_read_is_left_as_written(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    pod = injected(review, apply, "deployment-pod-review", native_cfg, weight="007")
    assert pod["metadata"]["annotations"][a.WEIGHT] == "007"


def test_an_unrecognised_inject_value_is_named_in_the_skip_reason(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][a.INJECT] = "true"
    outcome = admit(r, native_cfg, {})
    assert outcome.warnings == ("kuberpc: not injected: kuberpc.io/inject is 'true', not enabled or disabled",)


def test_a_pod_volume_named_like_the_proxys_is_denied(review: Review, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["spec"]["volumes"].append({"name": "kuberpc-identity", "emptyDir": {}})
    outcome = admit(r, native_cfg)
    assert outcome.result == "denied" and "volume 'kuberpc-identity' already exists" in outcome.message


def test_the_volume_names_checked_for_clashes_are_those_of_the_injected_volumes() -> None:
    assert PROXY_VOLUME_NAMES == {v["name"] for v in proxy_volumes()}


# --- discovery scope ---


def test_namespace_discovery_scope_watches_the_pods_own_namespace(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/discovery"] = "direct"
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/discovery-scope"] = "namespace"
    env = env_of(proxy_of(apply(r["request"]["object"], admit(r, native_cfg))))
    # The downward API names the namespace, so one answer serves the same template in any namespace.
    assert env["KUBERPC_DISCOVERY_NAMESPACES"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_cluster_discovery_scope_is_the_default(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, discovery="direct")))
    assert env["KUBERPC_DISCOVERY"] == "kubernetes" and "KUBERPC_DISCOVERY_NAMESPACES" not in env


def test_an_unknown_discovery_scope_is_admitted_with_a_warning_naming_it(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/discovery"] = "direct"
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/discovery-scope"] = "galaxy"
    outcome = admit(r, native_cfg)
    env = env_of(proxy_of(apply(r["request"]["object"], outcome)))
    assert "KUBERPC_DISCOVERY_NAMESPACES" not in env
    assert any("kuberpc.io/discovery-scope" in w and "galaxy" in w and "using cluster" in w for w in outcome.warnings)
def test_a_discovery_scope_without_direct_discovery_is_ignored_with_a_warning(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/discovery-scope"] = "namespace"
    outcome = admit(r, native_cfg)
    env = env_of(proxy_of(apply(r["request"]["object"], outcome)))
    assert env["KUBERPC_DISCOVERY"].startswith("control-plane:") and "KUBERPC_DISCOVERY_NAMESPACES" not in env
    assert any("kuberpc.io/discovery-scope" in w and "direct only" in w for w in outcome.warnings)


def test_an_unknown_discovery_mode_is_admitted_with_a_warning_and_the_control_plane(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"]["kuberpc.io/discovery"] = "telepathy"
    outcome = admit(r, native_cfg)
    env = env_of(proxy_of(apply(r["request"]["object"], outcome)))
    assert env["KUBERPC_DISCOVERY"].startswith("control-plane:")
    assert any("kuberpc.io/discovery" in w and "telepathy" in w and "using control-plane" in w for w in outcome.warnings)


# --- warnings: kuberpc.io/ annotations the injector does not know ---


@pytest.mark.parametrize(
    ("key", "value", "warning"),
    [
        (
            "kuberpc.io/proxy-cpus",
            "200m",
            "kuberpc: 'kuberpc.io/proxy-cpus'='200m': unknown annotation, ignored; did you mean kuberpc.io/proxy-cpu?",
        ),
        ("kuberpc.io/metrics", "on", "kuberpc: 'kuberpc.io/metrics'='on': unknown annotation, ignored"),
        ("kuberpc.io/allow", "default/*", "kuberpc: kuberpc.io/allow='default/*': a Service annotation, it does nothing on a pod"),
    ],
)
def test_an_unknown_kuberpc_annotation_is_a_warning_naming_it_and_its_value(
    review: Review, native_cfg: InjectorConfig, key: str, value: str, warning: str
) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"]["annotations"][key] = value
    outcome = admit(r, native_cfg)
    assert outcome.result == "injected"
    assert outcome.warnings == (warning,)
    assert len(warning) < 120


def test_every_annotation_the_injector_reads_is_known_and_other_prefixes_are_not_its_business() -> None:
    known = {key: "x" for key in a.POD_ANNOTATIONS} | {"example.com/kuberpc.io-like": "1", "app": "arith"}
    assert unknown_annotations(known) == []


def test_a_pod_skipped_because_of_a_misspelt_inject_annotation_is_told_so(
    review: Review, native_cfg: InjectorConfig
) -> None:
    r = review("deployment-pod-review")
    annotations = r["request"]["object"]["metadata"]["annotations"]
    annotations["kuberpc.io/injct"] = "enabled"
    annotations.pop(a.INJECT, None)
    outcome = admit(r, native_cfg, ns_labels={})
    assert outcome.result == "skipped"
    assert outcome.warnings[-1] == (
        "kuberpc: 'kuberpc.io/injct'='enabled': unknown annotation, ignored; did you mean kuberpc.io/inject?"
    )
