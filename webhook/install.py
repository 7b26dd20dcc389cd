"""`python -m webhook install`: fresh webhook and identity CAs, and manifests/ filled in with them for kubectl.

Writes only to the stream it is given; never logs or prints private keys outside the Secrets it emits.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from webhook import annotations as a

Document = dict[str, object]
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# Keys of a Kustomization this reader understands; anything that would transform documents is refused
# rather than silently ignored (use `kubectl kustomize` and a real kustomize for those).
KUSTOMIZATION_KEYS = frozenset({"apiVersion", "kind", "metadata", "resources"})
CA_DAYS = 3650
SERVING_DAYS = 730


class InstallError(RuntimeError):
    """The manifests cannot be read or completed; the message says which file and why."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert_pem: bytes
    key_pem: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def generate_ca(common_name: str, *, now: dt.datetime, days: int = CA_DAYS, uri: str | None = None) -> KeyPair:
    """A self-signed ECDSA P-256 CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kuberpc"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate clock skew between nodes
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_serving_cert(ca: KeyPair, dns_names: Sequence[str], *, now: dt.datetime, days: int = SERVING_DAYS) -> KeyPair:
    """A TLS server certificate for `dns_names` signed by `ca` (ECDSA P-256)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InstallError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


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
    webhook_ca = generate_ca("kuberpc webhook CA", now=now)
    serving = issue_serving_cert(webhook_ca, service_dns_names(), now=now)
    identity_ca = generate_ca("kuberpc identity CA", now=now, uri=f"spiffe://{trust_domain}")
    set_ca_bundle(docs, webhook_ca.cert_pem)
    return docs + generated_documents(serving=serving, identity_ca=identity_ca, namespaces=namespaces)


def write_yaml(docs: Sequence[Document], out: TextIO) -> None:
    yaml.safe_dump_all(docs, out, sort_keys=False, explicit_start=True)


def default_manifests_dir() -> Path:
    """manifests/ next to the package in a source checkout, else ./manifests."""
    beside = Path(__file__).resolve().parent.parent / "manifests"
    return beside if beside.is_dir() else Path("manifests")
