"""`kuberpc inject -f FILE`: offline, the manifests with exactly the proxy the webhook would inject."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml

from webhook import annotations as a
from webhook.cli.main import main
from webhook.config import InjectorConfig
from webhook.patch import mutate

DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "arith", "namespace": "shop"},
    "spec": {
        "selector": {"matchLabels": {"app": "arith"}},
        "template": {
            "metadata": {"labels": {"app": "arith"}, "annotations": {a.UPSTREAMS: "ledger.batch:7000=9002"}},
            "spec": {
                "containers": [
                    {
                        "name": "server",
                        "image": "arith:1",
                        "ports": [{"name": "grpc", "containerPort": 50051}],
                    }
                ]
            },
        },
    },
}
REPO = Path(__file__).resolve().parents[2]
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "arith"},
    "spec": {"ports": [{"port": 50051}]},
}


def run(tmp_path: Path, *docs: dict[str, Any], args: tuple[str, ...] = ()) -> tuple[int, str, str]:
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out, err = io.StringIO(), io.StringIO()
    code = main(["inject", "-f", str(path), *args], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def containers(pod_spec: dict[str, Any]) -> list[str]:
    return [c["name"] for c in [*pod_spec.get("initContainers", []), *pod_spec["containers"]]]


def test_the_injected_template_is_what_the_webhook_makes_of_its_pods(tmp_path: Path) -> None:
    code, out, err = run(tmp_path, DEPLOYMENT)

    (result,) = yaml.safe_load_all(out)
    template = copy.deepcopy(DEPLOYMENT["spec"]["template"])
    template["metadata"]["annotations"][a.INJECT] = a.INJECT_ENABLED
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
    by_webhook = jsonpatch.apply_patch(pod, list(mutate(pod, {}, InjectorConfig(), namespace="shop").patch))
    assert code == 0 and err == "deployment/arith: injected\n"
    assert result["spec"]["template"]["spec"] == by_webhook["spec"]
    assert result["spec"]["template"]["metadata"] == by_webhook["metadata"]
    assert a.PROXY_CONTAINER in containers(result["spec"]["template"]["spec"])


def test_other_documents_pass_through_unchanged_in_order(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path, SERVICE, DEPLOYMENT)

    service, deployment = yaml.safe_load_all(out)
    assert code == 0
    assert service == SERVICE
    assert deployment["kind"] == "Deployment"


def test_a_workload_that_opts_out_is_left_alone_and_said_so(tmp_path: Path) -> None:
    opted_out = copy.deepcopy(DEPLOYMENT)
    opted_out["spec"]["template"]["metadata"]["annotations"][a.INJECT] = a.INJECT_DISABLED

    code, out, err = run(tmp_path, opted_out)

    assert code == 0
    assert list(yaml.safe_load_all(out)) == [opted_out]
    assert err == f"deployment/arith: {a.INJECT} is {a.INJECT_DISABLED}, left unchanged\n"


def test_a_pod_the_webhook_would_deny_fails_with_the_webhooks_reason(tmp_path: Path) -> None:
    bad = copy.deepcopy(DEPLOYMENT)
    bad["spec"]["template"]["metadata"]["annotations"][a.APP_PORT] = "15001"

    code, out, err = run(tmp_path, bad)

    assert code == 1
    assert "deployment/arith: denied: " in err and a.APP_PORT in err
    assert list(yaml.safe_load_all(out)) == [bad]


def test_a_warning_of_the_webhook_is_shown(tmp_path: Path) -> None:
    warned = copy.deepcopy(DEPLOYMENT)
    warned["spec"]["template"]["metadata"]["annotations"][a.WEIGHT] = "big"

    code, _, err = run(tmp_path, warned)

    assert code == 0 and f"deployment/arith: {a.WEIGHT}: 'big' is not an integer" in err


def test_injecting_the_output_again_changes_nothing(tmp_path: Path) -> None:
    _, once, _ = run(tmp_path, DEPLOYMENT)
    code, twice, err = run(tmp_path, *yaml.safe_load_all(once))

    assert code == 0 and list(yaml.safe_load_all(twice)) == list(yaml.safe_load_all(once))
    assert "already injected" in err


@pytest.mark.parametrize(("version", "native"), [(None, False), ("1.30", True), ("1.27", False)])
def test_the_cluster_version_decides_the_native_sidecar_as_in_the_webhook(
    tmp_path: Path, version: str | None, native: bool
) -> None:
    args = ("--kubernetes-version", version) if version else ()
    _, out, _ = run(tmp_path, DEPLOYMENT, args=args)

    spec = yaml.safe_load(out)["spec"]["template"]["spec"]
    assert (a.PROXY_CONTAINER in [c["name"] for c in spec.get("initContainers", [])]) is native


def test_the_injector_config_map_of_the_manifests_is_accepted_as_config(tmp_path: Path) -> None:
    code, out, _ = run(
        tmp_path, DEPLOYMENT, args=("--config", str(REPO / "manifests" / "injector-config.yaml"))
    )

    spec = yaml.safe_load(out)["spec"]["template"]["spec"]
    proxy = next(
        c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == a.PROXY_CONTAINER
    )
    assert code == 0 and proxy["image"] == "ghcr.io/kuberpc/proxy:0.1.0"


def test_json_output_is_one_object_for_one_document(tmp_path: Path) -> None:
    code, out, _ = run(tmp_path, DEPLOYMENT, args=("-o", "json"))

    assert code == 0 and json.loads(out)["kind"] == "Deployment"


def test_a_list_is_walked_and_pods_cronjobs_and_jobs_are_injected(tmp_path: Path) -> None:
    template = DEPLOYMENT["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", **template["metadata"]},
        "spec": template["spec"],
    }
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": copy.deepcopy(template)}}},
    }
    items = {"apiVersion": "v1", "kind": "List", "items": [pod, cron]}

    code, out, err = run(tmp_path, items)

    injected_pod, injected_cron = yaml.safe_load_all(out)
    assert code == 0 and err == "pod/p: injected\ncronjob/nightly: injected\n"
    assert a.PROXY_CONTAINER in containers(injected_pod["spec"])
    assert a.PROXY_CONTAINER in containers(injected_cron["spec"]["jobTemplate"]["spec"]["template"]["spec"])


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "reading"), ("a: [unclosed", "is not YAML")],
)
def test_an_unreadable_file_is_an_error_naming_it(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "in.yaml"
    if content is not None:
        path.write_text(content)
    err = io.StringIO()

    code = main(["inject", "-f", str(path)], stdout=io.StringIO(), stderr=err)

    assert code == 1
    assert err.getvalue().startswith("kuberpc inject: ") and message in err.getvalue()


def test_kuberpc_and_kubectl_kuberpc_are_installed_as_the_same_command() -> None:
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kuberpc"] == scripts["kubectl-kuberpc"] == "webhook.cli.main:main"


def test_a_usage_error_exits_2_with_the_usage_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inject"]) == 2
    assert "the following arguments are required: -f/--filename" in capsys.readouterr().err
