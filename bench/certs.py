"""The mesh certificates of a run: a CA and one SPIFFE identity per side, shared by kuberpc and Envoy.

Produces files only; it must not configure any proxy (configs.py does).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bench.configs import NAMESPACE, Identity, spiffe_id


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


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _issue_in_process(directory: Path, service_accounts: list[str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kuberpc bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(_pem(ca))
    for sa in service_accounts:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=24))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id(sa))]), critical=True
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        out = directory / sa
        out.mkdir(parents=True, exist_ok=True)
        (out / "cert.pem").write_bytes(_pem(cert) + _pem(ca))
        (out / "key.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (out / "ca.pem").write_bytes(_pem(ca))
