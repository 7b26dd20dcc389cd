"""Mesh identity: SPIFFE IDs, the mesh CA and workload certificates, mTLS contexts, peer identity checks.

Builds certificates and ssl contexts and reads peer certificates; it must not open sockets, log or expose key material.
"""

from __future__ import annotations

import datetime
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_TRUST_DOMAIN = "cluster.local"
CA_LIFETIME = datetime.timedelta(days=365)
WORKLOAD_LIFETIME = datetime.timedelta(hours=24)
ALPN_PROTOCOLS = ["h2"]

# Certificates start a little in the past so a peer whose clock lags ours still accepts a fresh one.
_CLOCK_SKEW = datetime.timedelta(minutes=1)

# Every pattern below is used with fullmatch: `$` would also match before a trailing newline.
# SPIFFE ID spec §2.1: a trust domain is lowercase letters, digits, '.', '-', '_' (no port, no userinfo).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
# Kubernetes names: a namespace is an RFC 1123 label, a service account an RFC 1123 subdomain.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_SERVICE_ACCOUNT = re.compile(rf"{_SUBDOMAIN_LABEL}(\.{_SUBDOMAIN_LABEL})*")
_WORKLOAD_URI = re.compile(r"spiffe://(?P<td>[^/]*)/ns/(?P<ns>[^/]*)/sa/(?P<sa>[^/]*)")
_TRUST_DOMAIN_URI = re.compile(r"spiffe://(?P<td>[^/]+)/?")


class IdentityError(Exception):
    """An identity, certificate or TLS file that cannot be used; the message names the offending value."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A workload identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise IdentityError(
                f"{self.trust_domain!r} is not a SPIFFE trust domain (lowercase a-z 0-9 . - _)"
            )
        if not _NAMESPACE.fullmatch(self.namespace):
            raise IdentityError(f"{self.namespace!r} is not a Kubernetes namespace name")
        if len(self.service_account) > 253 or not _SERVICE_ACCOUNT.fullmatch(self.service_account):
            raise IdentityError(f"{self.service_account!r} is not a Kubernetes service account name")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """The inverse of str(); anything else (query, port, extra segments, other scheme) is an IdentityError."""
        m = _WORKLOAD_URI.fullmatch(uri)
        if m is None:
            raise IdentityError(
                f"{uri!r} is not a SPIFFE workload ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>)"
            )
        try:
            return cls(m.group("td"), m.group("ns"), m.group("sa"))
        except IdentityError as e:
            raise IdentityError(f"{uri!r} is not a SPIFFE workload ID: {e}") from e


def _utcnow(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise IdentityError("now must be timezone-aware")
    return now


def _require_positive(lifetime: datetime.timedelta) -> None:
    if lifetime <= datetime.timedelta(0):
        raise IdentityError(f"certificate lifetime must be positive, got {lifetime}")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _trust_domain_of_ca(cert: x509.Certificate) -> str | None:
    """The trust domain named by a CA's `spiffe://<td>` URI SAN, if it has one (foreign CAs may not)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if m := _TRUST_DOMAIN_URI.fullmatch(uri):
            return m.group("td")
    return None


def create_ca(
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    lifetime: datetime.timedelta = CA_LIFETIME,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 mesh root CA: (key PEM, cert PEM)."""
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise IdentityError(f"{trust_domain!r} is not a SPIFFE trust domain (lowercase a-z 0-9 . - _)")
    _require_positive(lifetime)
    start = _utcnow(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kuberpc"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"kuberpc root CA {trust_domain}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        # The trust-domain SPIFFE ID (X509-SVID spec §4.1) lets issuers refuse identities of other domains.
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as e:
        raise IdentityError(f"CA certificate is not a PEM certificate: {e}") from e
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # The message of these errors never contains key bytes, only what was wrong with them.
        raise IdentityError(f"CA key is not an unencrypted PEM private key: {e}") from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"CA key is {type(ca_key).__name__}, not an ECDSA key")
    if ca_key.public_key() != ca_cert.public_key():
        raise IdentityError(f"CA key does not belong to CA certificate {ca_cert.subject.rfc4514_string()!r}")
    return ca_key, ca_cert


def issue_workload(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    *,
    identity: SpiffeId,
    lifetime: datetime.timedelta = WORKLOAD_LIFETIME,
    dns_names: Sequence[str] = (),
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and an X509-SVID for `identity`: (key PEM, chain PEM: leaf then CA).

    The leaf never outlives its CA: not-after is clamped to the CA's.
    """
    _require_positive(lifetime)
    start = _utcnow(now)
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    ca_domain = _trust_domain_of_ca(ca_cert)
    if ca_domain is not None and ca_domain != identity.trust_domain:
        raise IdentityError(f"CA is for trust domain {ca_domain!r}; cannot issue {str(identity)!r}")
    if not ca_cert.not_valid_before_utc <= start < ca_cert.not_valid_after_utc:
        raise IdentityError(
            f"CA certificate is not valid at {start.isoformat()} "
            f"(valid {ca_cert.not_valid_before_utc.isoformat()} to {ca_cert.not_valid_after_utc.isoformat()})"
        )
    try:
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
        sans += [x509.DNSName(n) for n in dns_names]
    except ValueError as e:
        raise IdentityError(f"invalid DNS name in {list(dns_names)!r}: {e}") from e
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = _subject_key_identifier(ca_cert)
    # Link to the CA by its own key identifier when it has one: a foreign CA may not derive it the usual way.
    aki = (
        x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
        if ca_ski is not None
        else x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    )
    cert = (
        x509.CertificateBuilder()
        # X509-SVID: the identity is the URI SAN; with an empty subject the SAN must be critical (RFC 5280).
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - _CLOCK_SKEW)
        .not_valid_after(min(start + lifetime, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    return _key_pem(key), chain


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
    return WorkloadRequest(identity, _key_pem(key), csr.public_bytes(serialization.Encoding.DER))


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
    at = _utcnow(now)
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


def _subject_key_identifier(cert: x509.Certificate) -> x509.SubjectKeyIdentifier | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None


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
