"""The mesh CA of the control plane: decides whether a proxy's request may be signed, and signs it for one identity.

Pure decisions on the values it is given (CSR bytes, a TokenReview's outcome, the time); no network, no logging.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from webhook import annotations as a
from webhook.install import KeyPair, issue_serving_cert

WORKLOAD_LIFETIME = dt.timedelta(hours=24)
# Certificates start a little in the past, so a peer whose clock lags ours still accepts a fresh one.
CLOCK_SKEW = dt.timedelta(minutes=1)
# A P-256 CSR is ~300 bytes; anything far larger is not one, and is refused before parsing.
MAX_CSR_BYTES = 16 * 1024

# SPIFFE ID spec §2.1 (trust domain); Kubernetes names: a namespace is an RFC 1123 label, a service
# account an RFC 1123 subdomain.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_SERVICE_ACCOUNT = re.compile(rf"{_LABEL}(\.{_LABEL})*")
_WORKLOAD_URI = re.compile(r"spiffe://(?P<td>[^/]*)/ns/(?P<ns>[^/]*)/sa/(?P<sa>[^/]*)")
_TRUST_DOMAIN_URI = re.compile(r"spiffe://(?P<td>[^/]+)/?")
_SERVICE_ACCOUNT_USER = "system:serviceaccount:"


class IdentityError(Exception):
    """Base of the identity service's errors; the message never holds a token or key material."""


class CAError(IdentityError):
    """The CA certificate or key cannot be used; the message names the file and what is wrong with it."""


class CertifyError(IdentityError):
    """A Certify call answered without a certificate (each subclass is one status of proto/identity.proto)."""


class InvalidRequest(CertifyError):
    """The CSR or the identity is malformed, or names an identity this CA never issues."""


class Unauthenticated(CertifyError):
    """The TokenReview API rejected the token, or accepted it for another audience."""


class PermissionDenied(CertifyError):
    """The token is valid but belongs to another service account than the identity asked for."""


class Unavailable(CertifyError):
    """The request could not be decided now (TokenReview unreachable, CA outside its validity); retry later."""


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def username(self) -> str:
        """The user a TokenReview reports for this service account's tokens."""
        return f"{_SERVICE_ACCOUNT_USER}{self.namespace}:{self.service_account}"


@dataclass(frozen=True, slots=True)
class TokenReview:
    """The outcome of a TokenReview, as the API server returned it."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """A well-formed request: an identity of our trust domain and the P-256 key the CSR proved it holds."""

    identity: WorkloadIdentity
    public_key: ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class Issued:
    leaf_der: bytes
    serial: int
    not_after: dt.datetime

    @property
    def valid_until(self) -> int:
        """The leaf's notAfter in seconds since the Unix epoch (CertifyResponse.valid_until)."""
        return int(self.not_after.timestamp())


def parse_identity(uri: str, *, trust_domain: str) -> WorkloadIdentity:
    """The workload identity `uri` names; InvalidRequest unless it is one of `trust_domain`'s."""
    shown = repr(uri[:300])  # the caller's text goes into messages and logs: bounded
    m = _WORKLOAD_URI.fullmatch(uri)
    if m is None:
        raise InvalidRequest(f"identity {shown} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
    td, ns, sa = m.group("td"), m.group("ns"), m.group("sa")
    if td != trust_domain:
        raise InvalidRequest(f"identity {shown} is not in trust domain {trust_domain!r}")
    if not _NAMESPACE.fullmatch(ns):
        raise InvalidRequest(f"identity {shown}: the namespace is not a Kubernetes namespace name")
    if len(sa) > 253 or not _SERVICE_ACCOUNT.fullmatch(sa):
        raise InvalidRequest(f"identity {shown}: the service account is not a Kubernetes service account name")
    return WorkloadIdentity(td, ns, sa)


def parse_csr(der: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of a PKCS#10 CSR (DER) whose signature proves possession of it; it must be ECDSA P-256.

    Everything else the CSR asks for (subject, SANs, extensions) is ignored: the identity comes from the token.
    """
    if len(der) > MAX_CSR_BYTES:
        raise InvalidRequest(f"certificate signing request is {len(der)} bytes (at most {MAX_CSR_BYTES})")
    try:
        csr = x509.load_der_x509_csr(der)
        key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InvalidRequest(f"certificate signing request is not a DER PKCS#10 request: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise InvalidRequest(f"certificate signing request key is {kind}, not ECDSA P-256 (secp256r1)")
    if not signed:
        raise InvalidRequest("certificate signing request signature does not verify with its own key")
    return key


def check_request(identity: str, csr_der: bytes, *, trust_domain: str) -> SigningRequest:
    """Everything decidable before asking the API about the token: a malformed request costs no TokenReview."""
    return SigningRequest(parse_identity(identity, trust_domain=trust_domain), parse_csr(csr_der))


def authorize(identity: WorkloadIdentity, review: TokenReview, *, audience: str = a.TOKEN_AUDIENCE) -> None:
    """The token must be authenticated for `audience` and be `identity`'s own service account token."""
    if not review.authenticated:
        raise Unauthenticated(f"token rejected by the TokenReview API: {review.error or 'not authenticated'}")
    if audience not in review.audiences:
        raise Unauthenticated(f"token is not valid for audience {audience!r}")
    if review.username != identity.username:
        raise PermissionDenied(f"token of {review.username!r} may not be certified as {identity.uri!r}")


def trust_domain_of(cert: x509.Certificate) -> str | None:
    """The trust domain a CA names with a `spiffe://<td>` URI SAN, if it has one (a foreign CA may not)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if m := _TRUST_DOMAIN_URI.fullmatch(uri):
            return m.group("td")
    return None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"{path}: cannot read the identity CA {what}: {e.strerror}") from e


class CertificateAuthority:
    """The mesh CA's certificate and key; issues workload certificates and the identity service's own."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, trust_domain: str) -> None:
        self.cert = cert
        self._key = key
        self.trust_domain = trust_domain
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, *, trust_domain: str) -> CertificateAuthority:
        """Read and check the pair written by `python -m webhook install`; CAError names the file at fault."""
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise CAError(f"{trust_domain!r} is not a SPIFFE trust domain")
        try:
            cert = x509.load_pem_x509_certificate(_read(cert_path, "certificate"))
        except ValueError as e:
            raise CAError(f"{cert_path}: not a PEM certificate") from e
        try:
            key = serialization.load_pem_private_key(_read(key_path, "key"), password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            # Named by type only: nothing derived from the key's bytes reaches a message.
            raise CAError(f"{key_path}: not an unencrypted PEM private key ({type(e).__name__})") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path}: the CA key is {type(key).__name__}, not an ECDSA key")
        if key.public_key() != cert.public_key():
            raise CAError(f"{key_path}: not the key of the certificate in {cert_path}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise CAError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE is missing)")
        named = trust_domain_of(cert)
        if named is not None and named != trust_domain:
            raise CAError(f"{cert_path}: the CA is for trust domain {named!r}, the configuration says {trust_domain!r}")
        return cls(cert, key, trust_domain=trust_domain)

    def certify(self, request: SigningRequest, review: TokenReview, *, now: dt.datetime) -> Issued:
        """The certificate for a checked request whose token `review` vouches for, or the reason why not."""
        authorize(request.identity, review)
        return self.issue(request, now=now)

    def _window(self, now: dt.datetime, lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
        """(notBefore, notAfter) for a leaf issued at `now`, inside the CA's own validity."""
        start, end = self.cert.not_valid_before_utc, self.cert.not_valid_after_utc
        if not start <= now < end:
            raise Unavailable(
                f"the identity CA is not valid at {now.isoformat()} (valid {start.isoformat()} to {end.isoformat()})"
            )
        now = now.replace(microsecond=0)  # X.509 times have whole seconds
        return max(now - CLOCK_SKEW, start), min(now + lifetime, end)

    def issue(
        self, request: SigningRequest, *, now: dt.datetime, lifetime: dt.timedelta = WORKLOAD_LIFETIME
    ) -> Issued:
        """An X509-SVID for the request's identity alone: its URI SAN, client and server auth, ≤ `lifetime`."""
        not_before, not_after = self._window(now, lifetime)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            # X509-SVID: the identity is the URI SAN; with an empty subject the SAN must be critical (RFC 5280).
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(request.public_key)
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False)
            .add_extension(self._aki, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(request.identity.uri)]), critical=True
            )
            .sign(self._key, hashes.SHA256())
        )
        return Issued(cert.public_bytes(serialization.Encoding.DER), serial, not_after)

    def serving_pair(self, dns_names: Sequence[str], *, now: dt.datetime) -> tuple[KeyPair, dt.datetime]:
        """A fresh key and a one-day TLS server certificate for `dns_names`, and its notAfter.

        Proxies verify the identity service against the trust anchors, i.e. against this CA.
        """
        ca_pair = KeyPair(
            self.cert.public_bytes(serialization.Encoding.PEM),
            self._key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        pair = issue_serving_cert(ca_pair, dns_names, now=now, days=1)
        return pair, x509.load_pem_x509_certificate(pair.cert_pem).not_valid_after_utc
