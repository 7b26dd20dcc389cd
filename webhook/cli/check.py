"""`kuberpc check`: is the mesh healthy? One line per fact, ✔ or ✘, and for each ✘ the fix.

The checks are pure functions of what the cluster adapter read (kube.py), so each can be shown to fail
for the right reason with made-up facts as well as on a real cluster.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509

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


def injection(asking: list[tuple[str, str, bool]]) -> list[Result]:
    missing = [f"{ns}/{name}" for ns, name, injected in asking if not injected]
    if not missing:
        return [Result(True, f"every pod asking for a proxy has one ({len(asking)})")]
    return [
        Result(
            False,
            f"{pod} asks for a proxy (kuberpc.io/inject: enabled) but has none",
            "it was created while the injector did not answer: restart its workload (kubectl rollout restart)",
        )
        for pod in missing
    ]


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
