"""`python -m webhook install`: manifests with generated certificates, ready for `kubectl apply -f -`."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from webhook.__main__ import main
from webhook.config import InjectorConfig
from webhook.install import InstallError, load_kustomization
from webhook.metrics import WebhookMetrics
from webhook.server import CertReloader, create_app, serving

MANIFESTS = Path(__file__).parents[2] / "manifests"


@pytest.fixture(scope="module")
def output() -> tuple[str, str, list[dict[str, Any]]]:
    """One run of the installer: (stdout, stderr, documents)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["install", "--namespaces", "default, shop"]) == 0
    return out.getvalue(), err.getvalue(), [d for d in yaml.safe_load_all(out.getvalue()) if d is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    for d in docs:
        meta = d.get("metadata", {})
        if d["kind"] == kind and meta.get("name") == name and (namespace is None or meta.get("namespace") == namespace):
            return d
    raise AssertionError(f"no {kind} {name} {namespace}")


def test_every_listed_manifest_comes_first_then_the_generated_objects(output: tuple[str, str, list[dict[str, Any]]]) -> None:
    docs = output[2]
    listed = load_kustomization(MANIFESTS)
    assert [(d["kind"], d["metadata"]["name"]) for d in docs[: len(listed)]] == [(d["kind"], d["metadata"]["name"]) for d in listed]
    assert [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in docs[len(listed) :]] == [
        ("Secret", "kuberpc-webhook-tls", "kuberpc-system"),
        ("Secret", "kuberpc-identity-ca", "kuberpc-system"),
        ("ConfigMap", "kuberpc-trust-anchors", "kuberpc-system"),
        ("ConfigMap", "kuberpc-trust-anchors", "default"),
        ("ConfigMap", "kuberpc-trust-anchors", "shop"),
    ]


def test_every_document_validates_against_the_kubernetes_schema(output: tuple[str, str, list[dict[str, Any]]]) -> None:
    for doc in output[2]:
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_the_ca_bundle_verifies_the_serving_certificate_for_the_service_name(output: tuple[str, str, list[dict[str, Any]]]) -> None:
    docs = output[2]
    webhook_config = find(docs, "MutatingWebhookConfiguration", "kuberpc-injector")
    bundles = {w["clientConfig"]["caBundle"] for w in webhook_config["webhooks"]}
    assert len(bundles) == 1
    ca = x509.load_pem_x509_certificate(base64.b64decode(bundles.pop()))
    secret = find(docs, "Secret", "kuberpc-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "kuberpc-webhook.kuberpc-system.svc" in sans
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)


async def test_the_generated_pair_serves_https_that_the_ca_bundle_trusts(output: tuple[str, str, list[dict[str, Any]]], tmp_path: Path) -> None:
    import ssl

    docs = output[2]
    secret = find(docs, "Secret", "kuberpc-webhook-tls")
    (tmp_path / "tls.crt").write_bytes(base64.b64decode(secret["data"]["tls.crt"]))
    (tmp_path / "tls.key").write_bytes(base64.b64decode(secret["data"]["tls.key"]))
    ca_pem = base64.b64decode(find(docs, "MutatingWebhookConfiguration", "kuberpc-injector")["webhooks"][0]["clientConfig"]["caBundle"])
    app = create_app(cfg=InjectorConfig(), metrics=WebhookMetrics(CollectorRegistry()), namespace_labels=lambda ns: None)  # type: ignore[arg-type, return-value]
    reloader = CertReloader(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))
    async with serving(app, host="127.0.0.1", port=0, ssl_context=reloader.context) as (host, port), aiohttp.ClientSession() as s:
        ctx = ssl.create_default_context(cadata=ca_pem.decode())
        async with s.get(f"https://{host}:{port}/healthz", ssl=ctx, server_hostname="kuberpc-webhook.kuberpc-system.svc") as resp:
            assert resp.status == 200


def test_the_identity_ca_is_a_p256_ca_whose_key_matches(output: tuple[str, str, list[dict[str, Any]]]) -> None:
    secret = find(output[2], "Secret", "kuberpc-identity-ca")
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.pem"]))
    key = serialization.load_pem_private_key(base64.b64decode(secret["data"]["ca-key.pem"]), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert cert.public_key() == key.public_key()
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True


def test_every_trust_anchor_configmap_carries_the_identity_ca(output: tuple[str, str, list[dict[str, Any]]]) -> None:
    docs = output[2]
    ca_pem = base64.b64decode(find(docs, "Secret", "kuberpc-identity-ca")["data"]["ca.pem"]).decode()
    for ns in ("kuberpc-system", "default", "shop"):
        assert find(docs, "ConfigMap", "kuberpc-trust-anchors", ns)["data"]["ca.pem"] == ca_pem


def test_the_identity_ca_key_appears_only_inside_its_secret(output: tuple[str, str, list[dict[str, Any]]]) -> None:
    stdout, stderr, docs = output
    key_b64 = find(docs, "Secret", "kuberpc-identity-ca")["data"]["ca-key.pem"]
    key_pem = base64.b64decode(key_b64).decode()
    body = "".join(key_pem.splitlines()[1:-1])
    assert stdout.count(key_b64) == 1
    assert body not in stdout.replace("\n", "") and body not in stderr
    assert stderr == ""


def test_two_runs_generate_different_keys(output: tuple[str, str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install"]) == 0
    second = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    key = find(second, "Secret", "kuberpc-identity-ca")["data"]["ca-key.pem"]
    assert key != find(output[2], "Secret", "kuberpc-identity-ca")["data"]["ca-key.pem"]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


WEBHOOK_CONFIG = """
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: kuberpc-injector}
webhooks:
  - name: inject.kuberpc.io
    admissionReviewVersions: [v1]
    sideEffects: None
    clientConfig: {service: {name: kuberpc-webhook, namespace: kuberpc-system}}
"""


def test_nested_kustomizations_are_followed_in_order(tmp_path: Path) -> None:
    write(tmp_path / "kustomization.yaml", "resources: [ns.yaml, hooks]\n")
    write(tmp_path / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n")
    write(tmp_path / "hooks" / "kustomization.yaml", "resources: [hook.yaml]\n")
    write(tmp_path / "hooks" / "hook.yaml", WEBHOOK_CONFIG)
    assert [d["kind"] for d in load_kustomization(tmp_path)] == ["Namespace", "MutatingWebhookConfiguration"]


def test_kustomize_transformations_are_refused_not_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "kustomization.yaml", "namespace: other\nresources: [hook.yaml]\n")
    write(tmp_path / "hook.yaml", WEBHOOK_CONFIG)
    assert main(["install", "--manifests", str(tmp_path)]) == 1
    assert "unsupported kustomization keys namespace" in capsys.readouterr().err


def test_manifests_without_the_webhook_configuration_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "kustomization.yaml", "resources: [ns.yaml]\n")
    write(tmp_path / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    assert main(["install", "--manifests", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "no MutatingWebhookConfiguration kuberpc-injector" in captured.err and captured.out == ""


def test_a_missing_resource_names_the_file(tmp_path: Path) -> None:
    write(tmp_path / "kustomization.yaml", "resources: [nope.yaml]\n")
    with pytest.raises(InstallError, match="'nope.yaml' is not a local file"):
        load_kustomization(tmp_path)


def test_bad_namespace_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install", "--namespaces", "ok,Not_OK"]) == 2
    assert "Not_OK" in capsys.readouterr().err
