"""`kuberpc check`: is the mesh healthy? One line per fact, ✔ or ✘, and for each ✘ the fix.

The checks are pure functions of what the cluster adapter read (kube.py), so each can be shown to fail
for the right reason with made-up facts as well as on a real cluster.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature

# discovery.k8s.io/v1 EndpointSlices, which the proxies and the control plane watch, are GA since 1.21.
MIN_KUBERNETES = (1, 21)
# Trust anchors sign every workload certificate: warn a month ahead, as rotating them takes a rollout.
ANCHOR_MARGIN = dt.timedelta(days=30)


@dataclass(frozen=True)
class Result:
    ok: bool
    title: str
    fix: str = ""


def api_version(version: tuple[int, int]) -> Result:
    shown = f"{version[0]}.{version[1]}"
    if version >= MIN_KUBERNETES:
        return Result(True, f"the API server answers (Kubernetes {shown})")
    need = f"{MIN_KUBERNETES[0]}.{MIN_KUBERNETES[1]}"
    return Result(
        False, f"Kubernetes {shown} is too old", f"kuberpc needs {need} or later (EndpointSlice v1)"
    )


def control_plane(namespace: str, pods: list[tuple[str, bool]]) -> Result:
    ready = [name for name, ok in pods if ok]
    if ready:
        return Result(
            True, f"the control plane is ready ({len(ready)}/{len(pods)} kuberpc-webhook pods in {namespace})"
        )
    if not pods:
        return Result(
            False,
            f"no kuberpc-webhook pod in {namespace}",
            "install the control plane: python -m webhook install, then kubectl apply -k manifests",
        )
    return Result(
        False,
        f"no kuberpc-webhook pod is ready in {namespace}",
        f"kubectl -n {namespace} describe pods -l app.kubernetes.io/name=kuberpc-webhook",
    )


def trust_anchors(namespace: str, pem: str | None, now: dt.datetime) -> Result:
    where = f"{namespace}/kuberpc-trust-anchors"
    if pem is None:
        return Result(
            False,
            f"{where} is missing",
            "the control plane publishes it in every namespace with meshed pods: check its logs",
        )
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        return Result(False, f"{where} holds no readable certificate", "reinstall the trust anchors")
    expiry = min(c.not_valid_after_utc for c in certs)
    if expiry <= now:
        return Result(False, f"{where}: a trust anchor expired on {expiry:%Y-%m-%d}", "rotate the mesh CA")
    if expiry - now < ANCHOR_MARGIN:
        return Result(
            False, f"{where}: a trust anchor expires on {expiry:%Y-%m-%d}", "rotate the mesh CA now"
        )
    return Result(True, f"{where}: {len(certs)} trust anchor(s), valid until {expiry:%Y-%m-%d}")


def injection(asking: list[tuple[str, str, bool, str]]) -> list[Result]:
    """`asking`: (namespace, pod, injected, why it asks: the pod's annotation or its namespace's label)."""
    missing = [(f"{ns}/{name}", why) for ns, name, injected, why in asking if not injected]
    if not missing:
        return [Result(True, f"every pod asking for a proxy has one ({len(asking)})")]
    return [
        Result(
            False,
            f"{pod} asks for a proxy ({why}) but has none",
            "it was created before it asked or while the injector did not answer (or in a namespace the "
            "injector never sees: kube-system, kuberpc-system): recreate it, e.g. kubectl rollout restart its workload",
        )
        for pod, why in missing
    ]


# What `python -m webhook install | kubectl apply -f -` creates, as the API server's authorizer names it.
# tests/webhook/test_cli_check.py fails when install renders a kind missing here.
INSTALL_RESOURCES: dict[str, tuple[str, str, bool]] = {  # kind -> (API group, resource, namespaced)
    "Namespace": ("", "namespaces", False),
    "ServiceAccount": ("", "serviceaccounts", True),
    "Secret": ("", "secrets", True),
    "ConfigMap": ("", "configmaps", True),
    "Service": ("", "services", True),
    "Deployment": ("apps", "deployments", True),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets", True),
    "ClusterRole": ("rbac.authorization.k8s.io", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io", "clusterrolebindings", False),
    "Role": ("rbac.authorization.k8s.io", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io", "rolebindings", True),
    "MutatingWebhookConfiguration": ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", False),
}


def install_rights(allowed: dict[str, bool]) -> Result:
    """`allowed`: for each resource (as "resource.group") install creates, whether the caller may create it."""
    denied = sorted(r for r, ok in allowed.items() if not ok)
    if not denied:
        return Result(True, f"you may create everything kuberpc install creates ({len(allowed)} kinds)")
    return Result(
        False,
        f"you may not create {', '.join(denied)}",
        "install as a cluster administrator (kubectl auth can-i create <resource> says who may)",
    )


def webhook_serving(
    pod: str, service_dns: str, ca_bundle_pem: bytes, served_der: bytes | None, error: str, now: dt.datetime
) -> Result:
    """Would the API server trust what pod `pod` serves? It dials `service_dns` and verifies the serving
    certificate against the caBundle of the MutatingWebhookConfiguration, as this reproduces."""
    reinstall = "python -m webhook install | kubectl apply -f - (it makes the CA, the certificate and the bundle together)"
    if served_der is None:
        return Result(
            False,
            f"the webhook in {pod} does not answer ({error})",
            f"kubectl -n {pod.split('/')[0]} logs {pod.split('/')[1]} -c webhook",
        )
    if not ca_bundle_pem.strip():
        return Result(False, f"the MutatingWebhookConfiguration has no caBundle: the API server cannot call {pod}", reinstall)
    try:
        anchors = x509.load_pem_x509_certificates(ca_bundle_pem)
    except ValueError:
        return Result(False, "the MutatingWebhookConfiguration's caBundle holds no readable certificate", reinstall)
    served = x509.load_der_x509_certificate(served_der)
    signed = False
    for ca in anchors:
        try:
            served.verify_directly_issued_by(ca)
            signed = True
        except (ValueError, TypeError, InvalidSignature):
            continue
    if not signed:
        return Result(
            False,
            f"the webhook in {pod} serves a certificate its caBundle does not trust "
            f"(issued by {served.issuer.rfc4514_string()})",
            reinstall,
        )
    if served.not_valid_after_utc <= now:
        return Result(False, f"the webhook in {pod} serves a certificate that expired on {served.not_valid_after_utc:%Y-%m-%d}", reinstall)
    try:
        names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if service_dns not in names:
        return Result(False, f"the webhook in {pod} serves a certificate not valid for {service_dns}", reinstall)
    return Result(True, f"the webhook in {pod} answers with a certificate its caBundle trusts, valid until {served.not_valid_after_utc:%Y-%m-%d}")


def identity_service(pod: str, code: str, detail: str) -> Result:
    """`code`: the gRPC status the identity service gave a deliberately empty Certify request."""
    if code in ("INVALID_ARGUMENT", "UNAUTHENTICATED"):
        return Result(True, f"the identity service in {pod} answers (an empty request: {code})")
    return Result(
        False,
        f"the identity service in {pod} does not answer as it should ({code}: {detail})",
        f"kubectl -n {pod.split('/')[0]} logs {pod.split('/')[1]} -c webhook",
    )


def discovery_service(pod: str, state: str, detail: str) -> Result:
    """`state`: what a TLS connection without a client certificate found at the discovery port (cli/probe.py)."""
    logs = f"kubectl -n {pod.split('/')[0]} logs {pod.split('/')[1]} -c webhook"
    if state == "MTLS":
        return Result(True, f"the discovery service in {pod} answers with the mesh's certificate and requires one")
    if state == "NO_CLIENT_AUTH":
        return Result(False, f"the discovery service in {pod} serves clients without a mesh certificate", logs)
    if state == "UNTRUSTED":
        return Result(
            False,
            f"the discovery service in {pod} serves a certificate the trust anchors do not vouch for ({detail})",
            "check the identity CA Secret and the kuberpc-trust-anchors ConfigMap (kuberpc install)",
        )
    return Result(False, f"the discovery service in {pod} does not answer ({detail})", logs)


def proxy(namespace: str, name: str, ready: bool, cert_expiry: float | None, now: dt.datetime) -> Result:
    where = f"{namespace}/{name}"
    if cert_expiry is not None and cert_expiry <= now.timestamp():
        when = dt.datetime.fromtimestamp(cert_expiry, dt.UTC)
        return Result(
            False,
            f"the proxy of {where} has an expired certificate (since {when:%Y-%m-%d %H:%M} UTC)",
            "it cannot renew it: check the identity service (kuberpc-webhook logs) and the proxy's logs",
        )
    if not ready:
        return Result(
            False,
            f"the proxy of {where} is not ready",
            f"kubectl -n {namespace} logs {name} -c kuberpc-proxy",
        )
    if cert_expiry is None:
        return Result(
            False,
            f"the proxy of {where} reports no certificate",
            f"kubectl -n {namespace} logs {name} -c kuberpc-proxy",
        )
    return Result(True, f"the proxy of {where} is ready with a valid certificate")
