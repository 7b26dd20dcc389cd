"""`python -m webhook install`: fresh webhook and identity CAs, and manifests/ filled in with them for kubectl.

Writes only to the stream it is given; never logs or prints private keys outside the Secrets it emits.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

import yaml

from sidecar import pki
from sidecar.pki import KeyPair
from webhook import annotations as a

Document = dict[str, object]
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Keys of a Kustomization this reader understands; anything that would transform documents is refused
# rather than silently ignored (use `kubectl kustomize` and a real kustomize for those).
KUSTOMIZATION_KEYS = frozenset({"apiVersion", "kind", "metadata", "resources"})
CA_LIFETIME = dt.timedelta(days=3650)


class InstallError(RuntimeError):
    """The manifests cannot be read or completed; the message says which file and why."""


def service_dns_names(service: str = a.WEBHOOK_NAME, namespace: str = a.DEFAULT_CONTROL_PLANE_NAMESPACE) -> list[str]:
    """The names the API server may use for the webhook Service; `<svc>.<ns>.svc` first (it is the one checked)."""
    return [f"{service}.{namespace}.svc", service, f"{service}.{namespace}", f"{service}.{namespace}.svc.cluster.local"]


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise InstallError(f"{directory}: no kustomization.yaml")


def load_kustomization(directory: Path, *, _seen: frozenset[Path] = frozenset()) -> list[Document]:
    """Every document listed under `resources:`, in order, following nested kustomization directories."""
    directory = directory.resolve()
    if directory in _seen:
        raise InstallError(f"{directory}: kustomization includes itself")
    path = _kustomization_file(directory)
    try:
        kust = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise InstallError(f"{path}: {e}") from e
    if not isinstance(kust, dict):
        raise InstallError(f"{path}: not a mapping")
    unsupported = sorted(set(kust) - KUSTOMIZATION_KEYS)
    if unsupported:
        raise InstallError(f"{path}: unsupported kustomization keys {', '.join(unsupported)} (only resources: is read)")
    resources = kust.get("resources") or []
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise InstallError(f"{path}: resources must be a list of paths")
    docs: list[Document] = []
    for entry in resources:
        target = (directory / entry).resolve()
        if "://" in entry or not target.exists():
            raise InstallError(f"{path}: resource {entry!r} is not a local file or directory")
        if target.is_dir():
            docs += load_kustomization(target, _seen=_seen | {directory})
            continue
        try:
            loaded = list(yaml.safe_load_all(target.read_text()))
        except (OSError, yaml.YAMLError) as e:
            raise InstallError(f"{target}: {e}") from e
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc:
                raise InstallError(f"{target}: a document is not a Kubernetes object")
            docs.append(doc)
    return docs


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": a.WEBHOOK_NAME, "app.kubernetes.io/part-of": "kuberpc"}


def set_ca_bundle(docs: Iterable[Document], ca_pem: bytes) -> None:
    """Fill `webhooks[*].clientConfig.caBundle` of the MutatingWebhookConfiguration `kuberpc-injector`."""
    for doc in docs:
        meta = doc.get("metadata")
        if doc.get("kind") != "MutatingWebhookConfiguration" or not isinstance(meta, dict):
            continue
        if meta.get("name") != a.WEBHOOK_CONFIGURATION:
            continue
        webhooks = doc.get("webhooks")
        if not isinstance(webhooks, list) or not webhooks:
            raise InstallError(f"MutatingWebhookConfiguration {a.WEBHOOK_CONFIGURATION} has no webhooks")
        for hook in webhooks:
            if not isinstance(hook, dict) or not isinstance(hook.get("clientConfig"), dict):
                raise InstallError(f"MutatingWebhookConfiguration {a.WEBHOOK_CONFIGURATION}: a webhook has no clientConfig")
            hook["clientConfig"]["caBundle"] = _b64(ca_pem)
        return
    raise InstallError(f"manifests contain no MutatingWebhookConfiguration {a.WEBHOOK_CONFIGURATION}")


def generated_documents(
    *, serving: KeyPair, identity_ca: KeyPair, namespaces: Sequence[str], control_plane: str = a.DEFAULT_CONTROL_PLANE_NAMESPACE
) -> list[Document]:
    """The two Secrets and one trust-anchor ConfigMap per namespace (the control plane's first)."""
    docs: list[Document] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": a.WEBHOOK_TLS_SECRET, "namespace": control_plane, "labels": _labels()},
            "data": {"tls.crt": _b64(serving.cert_pem), "tls.key": _b64(serving.key_pem)},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": a.IDENTITY_CA_SECRET, "namespace": control_plane, "labels": _labels()},
            "data": {"ca.pem": _b64(identity_ca.cert_pem), "ca-key.pem": _b64(identity_ca.key_pem)},
        },
    ]
    for ns in dict.fromkeys([control_plane, *namespaces]):  # ordered, without duplicates
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": a.TRUST_ANCHORS_CONFIGMAP, "namespace": ns, "labels": _labels()},
                "data": {a.TRUST_ANCHORS_KEY: identity_ca.cert_pem.decode("ascii")},
            }
        )
    return docs


def render(
    manifests: Path,
    *,
    namespaces: Sequence[str],
    now: dt.datetime,
    trust_domain: str = a.DEFAULT_TRUST_DOMAIN,
) -> list[Document]:
    """Everything `kubectl apply -f -` needs, with freshly generated certificates and keys."""
    docs = load_kustomization(manifests)
    webhook_ca = pki.create_ca(trust_domain=None, common_name="kuberpc webhook CA", lifetime=CA_LIFETIME, now=now)
    serving = pki.issue_serving(webhook_ca, service_dns_names(), now=now)
    identity_ca = pki.create_ca(
        trust_domain=trust_domain, common_name="kuberpc identity CA", lifetime=CA_LIFETIME, now=now
    )
    set_ca_bundle(docs, webhook_ca.cert_pem)
    return docs + generated_documents(serving=serving, identity_ca=identity_ca, namespaces=namespaces)


def write_yaml(docs: Sequence[Document], out: TextIO) -> None:
    yaml.safe_dump_all(docs, out, sort_keys=False, explicit_start=True)


def default_manifests_dir() -> Path:
    """manifests/ next to the package in a source checkout, else ./manifests."""
    beside = Path(__file__).resolve().parent.parent / "manifests"
    return beside if beside.is_dir() else Path("manifests")
