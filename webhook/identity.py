"""The mesh CA of the control plane: decides whether a proxy's request may be signed, and signs it for one identity.

Pure decisions on the values it is given (CSR bytes, a TokenReview's outcome, the time); no network, no logging.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar import pki
from sidecar.pki import CLOCK_SKEW as CLOCK_SKEW
from sidecar.pki import WORKLOAD_LIFETIME as WORKLOAD_LIFETIME
from sidecar.spiffe import IdentityError as SpiffeError
from sidecar.spiffe import SpiffeId, is_trust_domain
from webhook import annotations as a

# A P-256 CSR is ~300 bytes; anything far larger is not one, and is refused before parsing.
MAX_CSR_BYTES = 16 * 1024


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
class TokenReview:
    """The outcome of a TokenReview, as the API server returned it."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True, slots=True)
class SigningRequest:
    """A well-formed request: an identity of our trust domain and the P-256 key the CSR proved it holds."""

    identity: SpiffeId
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


def parse_identity(uri: str, *, trust_domain: str) -> SpiffeId:
    """The workload identity `uri` names; InvalidRequest unless it is one of `trust_domain`'s."""
    shown = repr(uri[:300])  # the caller's text goes into messages and logs: bounded
    try:
        identity = SpiffeId.parse(uri)
    except SpiffeError:
        # Not SpiffeId's message: it quotes the caller's text unbounded.
        raise InvalidRequest(
            f"identity {shown} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> "
            "with a Kubernetes namespace and service account name"
        ) from None
    if identity.trust_domain != trust_domain:
        raise InvalidRequest(f"identity {shown} is not in trust domain {trust_domain!r}")
    return identity


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


def authorize(identity: SpiffeId, review: TokenReview, *, audience: str = a.TOKEN_AUDIENCE) -> None:
    """The token must be authenticated for `audience` and be `identity`'s own service account token."""
    if not review.authenticated:
        raise Unauthenticated(f"token rejected by the TokenReview API: {review.error or 'not authenticated'}")
    if audience not in review.audiences:
        raise Unauthenticated(f"token is not valid for audience {audience!r}")
    if review.username != identity.username:
        raise PermissionDenied(f"token of {review.username!r} may not be certified as {str(identity)!r}")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAError(f"{path}: cannot read the identity CA {what}: {e.strerror}") from e


class CertificateAuthority:
    """The mesh CA's certificate and key; issues workload certificates and the identity service's own."""

    def __init__(self, issuer: pki.Issuer, *, trust_domain: str) -> None:
        self._issuer = issuer
        self.cert = issuer.cert
        self.trust_domain = trust_domain

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, *, trust_domain: str) -> CertificateAuthority:
        """Read and check the pair written by `python -m webhook install`; CAError names the file at fault."""
        if not is_trust_domain(trust_domain):
            raise CAError(f"{trust_domain!r} is not a SPIFFE trust domain")
        try:
            cert = pki.load_certificate(_read(cert_path, "certificate"))
        except SpiffeError as e:
            raise CAError(f"{cert_path}: {e}") from e
        try:
            key = pki.load_private_key(_read(key_path, "key"))
        except SpiffeError as e:
            raise CAError(f"{key_path}: {e}") from e
        try:
            issuer = pki.Issuer(cert, key)
        except SpiffeError as e:
            raise CAError(f"{key_path}: not the key of the certificate in {cert_path}") from e
        if not pki.is_ca(cert):
            raise CAError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE is missing)")
        named = pki.trust_domain_of(cert)
        if named is not None and named != trust_domain:
            raise CAError(f"{cert_path}: the CA is for trust domain {named!r}, the configuration says {trust_domain!r}")
        return cls(issuer, trust_domain=trust_domain)

    def certify(self, request: SigningRequest, review: TokenReview, *, now: dt.datetime) -> Issued:
        """The certificate for a checked request whose token `review` vouches for, or the reason why not."""
        authorize(request.identity, review)
        return self.issue(request, now=now)

    def _window(self, now: dt.datetime, lifetime: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
        try:
            return self._issuer.window(now, lifetime)
        except SpiffeError as e:  # outside the CA's validity: a later call, or a renewed CA, may succeed
            raise Unavailable(f"the identity CA: {e}") from e

    def issue(
        self, request: SigningRequest, *, now: dt.datetime, lifetime: dt.timedelta = WORKLOAD_LIFETIME
    ) -> Issued:
        """An X509-SVID for the request's identity alone: its URI SAN, client and server auth, ≤ `lifetime`."""
        window = self._window(now, lifetime)
        try:
            cert = self._issuer.sign_workload(request.public_key, request.identity, window=window)
        except SpiffeError as e:  # parse_identity keeps other trust domains out: this is a CA of another one
            raise InvalidRequest(str(e)) from e
        return Issued(cert.public_bytes(serialization.Encoding.DER), cert.serial_number, window[1])

    def serving_pair(self, dns_names: Sequence[str], *, now: dt.datetime) -> tuple[pki.KeyPair, dt.datetime]:
        """A fresh key and a one-day TLS server certificate for `dns_names`, and its notAfter.

        Proxies verify the identity service against the trust anchors, i.e. against this CA.
        """
        try:
            pair = pki.issue_serving(self._issuer, dns_names, lifetime=dt.timedelta(days=1), now=now)
        except SpiffeError as e:
            raise Unavailable(f"the identity CA: {e}") from e
        return pair, x509.load_pem_x509_certificate(pair.cert_pem).not_valid_after_utc
