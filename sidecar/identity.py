"""The proxy's side of mesh identity: its CSR, accepting what the issuer returned, mTLS contexts, peer identity checks.

Builds CSRs and ssl contexts and reads peer certificates; it must not open sockets, log or expose key material
(identity values live in sidecar/spiffe.py, certificate building in sidecar/pki.py).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.pki import key_pem, utcnow

# Re-exported: the proxy's modules take identity values from here, the control plane from sidecar.spiffe.
from sidecar.spiffe import IdentityError as IdentityError
from sidecar.spiffe import SpiffeId as SpiffeId

ALPN_PROTOCOLS = ["h2"]


# DESIGN.md §4: renewed at 2/3 of its life, which leaves a third (8 h of 24) to retry a failing renewal.
RENEW_FRACTION = 2 / 3


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """A fresh workload key and the CSR (DER) asking for `identity` with it. repr never shows the key."""

    identity: SpiffeId
    key_pem: bytes = field(repr=False)
    csr_der: bytes


@dataclass(frozen=True, slots=True)
class WorkloadCertificate:
    """A workload certificate chain (PEM, leaf first) and the leaf's serial and validity (unix seconds)."""

    chain_pem: bytes = field(repr=False)
    serial: int
    not_before: float
    not_after: float


def create_csr(identity: SpiffeId) -> WorkloadRequest:
    """A new ECDSA P-256 key and a PKCS#10 request for `identity`: empty subject, the SPIFFE ID as URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        # As in the X509-SVID it asks for: the identity is the URI SAN, critical because the subject is empty.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return WorkloadRequest(identity, key_pem(key), csr.public_bytes(serialization.Encoding.DER))


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _describe(leaf: x509.Certificate, chain_pem: bytes) -> WorkloadCertificate:
    return WorkloadCertificate(
        chain_pem=chain_pem,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def accept_issued(
    request: WorkloadRequest,
    leaf_der: bytes,
    intermediates_der: Sequence[bytes] = (),
    *,
    now: datetime.datetime | None = None,
) -> WorkloadCertificate:
    """The certificate an issuer returned for `request`, once shown to be ours, as a PEM chain.

    IdentityError unless the leaf holds the request's public key, names exactly the requested identity and
    has not expired at `now`. Its chain to the trust anchors is left to peers, which check it at every handshake.
    """
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        intermediates = [x509.load_der_x509_certificate(der) for der in intermediates_der]
    except ValueError as e:
        raise IdentityError(f"issued certificate is not a DER certificate: {e}") from e
    key = serialization.load_pem_private_key(request.key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or leaf.public_key() != key.public_key():
        raise IdentityError("issued certificate does not hold the requested public key")
    wanted = str(request.identity)
    if (uris := _uri_sans(leaf)) != [wanted]:
        raise IdentityError(f"issued certificate names {uris!r}, not exactly [{wanted!r}]")
    at = utcnow(now)
    if leaf.not_valid_after_utc <= at:
        raise IdentityError(
            f"issued certificate expired at {leaf.not_valid_after_utc.isoformat()} (now {at.isoformat()})"
        )
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, *intermediates))
    return _describe(leaf, chain)


def read_chain(chain_pem: bytes) -> WorkloadCertificate:
    """A PEM chain (leaf first) as loaded from a file, with the leaf's serial and validity."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as e:
        raise IdentityError(f"not a PEM certificate chain: {e}") from e
    return _describe(chain[0], chain_pem)


def renewal_time(cert: WorkloadCertificate, *, received_at: float) -> float:
    """When to ask for the next certificate: RENEW_FRACTION into its life (unix seconds).

    Its life is counted from when it arrived if that is after its notBefore: issuers backdate notBefore to
    absorb clock skew, which must not bring the renewal forward (a short-lived certificate would renew at once).
    """
    start = min(max(cert.not_before, received_at), cert.not_after)
    return start + (cert.not_after - start) * RENEW_FRACTION


def load_certificate(ctx: ssl.SSLContext, cert_file: str, key_file: str) -> None:
    """Make `ctx` present this certificate chain and key in its next handshakes; open connections keep theirs."""
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except OSError as e:  # ssl.SSLError included: unreadable PEM, key not matching the certificate
        raise IdentityError(
            f"cannot load certificate {cert_file!r} with key {key_file!r}: {e.strerror or e}"
        ) from e


def _configure(
    ctx: ssl.SSLContext, cert_file: str | None, key_file: str | None, trust_anchors_file: str
) -> ssl.SSLContext:
    # Every proxy runs this code, so there is no older peer to accommodate: TLS 1.3 only.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    if cert_file is not None and key_file is not None:
        load_certificate(ctx, cert_file, key_file)
    try:
        ctx.load_verify_locations(cafile=trust_anchors_file)
    except OSError as e:
        raise IdentityError(f"cannot load trust anchors {trust_anchors_file!r}: {e.strerror or e}") from e
    return ctx


def server_context(cert_file: str | None, key_file: str | None, trust_anchors_file: str) -> ssl.SSLContext:
    """The inbound (:15443) context: TLS 1.3, ALPN h2, client certificate required and chained to the anchors.

    Build it once per process; `load_certificate` on the same context swaps in a renewed certificate.
    Without cert_file and key_file it has none yet (the identity service will issue one).
    """
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert_file, key_file, trust_anchors_file)
    # Our clients connect through asyncio, which cannot offer a saved session, so tickets would only cost
    # an encryption and a write per handshake; connections to peers are long-lived and pooled instead.
    ctx.num_tickets = 0
    return ctx


def client_context(cert_file: str | None, key_file: str | None, trust_anchors_file: str) -> ssl.SSLContext:
    """The context for calls to peer proxies: TLS 1.3, ALPN h2, presents our certificate, verifies the peer's chain.

    Peers are dialled by pod IP, so there is no hostname to check: authorise by the peer's SPIFFE ID instead.
    """
    ctx = _configure(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_file, key_file, trust_anchors_file)
    ctx.check_hostname = False
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId | None:
    """The SPIFFE ID in the verified peer certificate's URI SAN.

    None when there is no verified certificate, no URI SAN, more than one (X509-SVID allows exactly one),
    or it is not a workload ID.
    """
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    san = cert.get("subjectAltName", ())
    uris = [
        entry[1]
        for entry in (san if isinstance(san, tuple) else ())
        if len(entry) == 2 and entry[0] == "URI" and isinstance(entry[1], str)
    ]
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except IdentityError:
        return None


def require_mesh_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, *, trust_domain: str) -> SpiffeId:
    """The peer's SPIFFE ID; IdentityError when it has none or it belongs to another trust domain."""
    identity = peer_identity(ssl_object)
    if identity is None:
        raise IdentityError("peer presented no SPIFFE workload identity")
    if identity.trust_domain != trust_domain:
        raise IdentityError(f"peer identity {str(identity)!r} is not in trust domain {trust_domain!r}")
    return identity


def cert_expiry_timestamp(cert_chain_pem: bytes) -> float:
    """The leaf's (first certificate's) notAfter as a unix timestamp."""
    try:
        chain = x509.load_pem_x509_certificates(cert_chain_pem)
    except ValueError as e:
        raise IdentityError(f"not a PEM certificate chain: {e}") from e
    return chain[0].not_valid_after_utc.timestamp()


def write_atomically(path: str | Path, data: bytes, mode: int) -> None:
    """Write via a temporary file and rename, so a reader (a proxy reloading its files) never sees half a file.

    mkstemp creates the file 0600 from the start, so a key is never readable by others, not even briefly.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
