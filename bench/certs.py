"""The mesh certificates of a run: a CA and one SPIFFE identity per side, shared by kuberpc and Envoy.

Produces files only; it must not configure any proxy (configs.py does).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.configs import NAMESPACE, TRUST_DOMAIN, Identity, spiffe_id
from sidecar import pki
from sidecar.spiffe import SpiffeId


def _identity(directory: Path) -> Identity:
    return Identity(cert=str(directory / "cert.pem"), key=str(directory / "key.pem"), ca=str(directory / "ca.pem"))


def _sidecar_certs_available(python: str, cwd: str) -> bool:
    probe = subprocess.run(
        [python, "-m", "sidecar", "certs", "--help"], cwd=cwd, capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def issue(directory: Path, service_accounts: list[str], *, python: str = sys.executable, cwd: str = ".") -> dict[str, Identity]:
    """A CA in `directory` and an identity per service account in `directory/<sa>/` (cert.pem chain, key.pem, ca.pem).

    Uses `python -m sidecar certs` (the files users get); the in-process issuer below stands in only where the
    proxy's CLI has no `certs` command, so the Envoy and nginx paths can be measured on any tree.
    """
    if _sidecar_certs_available(python, cwd):
        subprocess.run([python, "-m", "sidecar", "certs", "ca", "--dir", str(directory)], cwd=cwd, check=True, timeout=60, capture_output=True)
        for sa in service_accounts:
            subprocess.run(
                [python, "-m", "sidecar", "certs", "issue", "--ca-dir", str(directory), "--namespace", NAMESPACE,
                 "--service-account", sa, "--out", str(directory / sa)],
                cwd=cwd, check=True, timeout=60, capture_output=True,
            )
    else:
        _issue_in_process(directory, service_accounts)
    return {sa: _identity(directory / sa) for sa in service_accounts}


def _issue_in_process(directory: Path, service_accounts: list[str]) -> None:
    # The same builders as `sidecar certs`, in this process: the other tree's CLI is what is missing.
    ca = pki.create_ca(trust_domain=TRUST_DOMAIN, common_name="kuberpc bench CA")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    for sa in service_accounts:
        issued = pki.issue_workload(ca, identity=SpiffeId.parse(spiffe_id(sa)))
        out = directory / sa
        out.mkdir(parents=True, exist_ok=True)
        (out / "cert.pem").write_bytes(issued.cert_pem)
        (out / "key.pem").write_bytes(issued.key_pem)
        (out / "ca.pem").write_bytes(ca.cert_pem)
