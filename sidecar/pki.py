"""The mesh's X.509 building: one CA generator, one leaf builder (workload X509-SVIDs and TLS server certificates)
and the checks on a CA key pair, shared by the proxy's `certs` tool and the control plane's identity CA.

Pure: only `cryptography` on the bytes and times it is given (reads no file, opens nothing, logs nothing).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.spiffe import DEFAULT_TRUST_DOMAIN, IdentityError, SpiffeId, is_trust_domain, trust_domain_of_uri

CA_LIFETIME = datetime.timedelta(days=365)
WORKLOAD_LIFETIME = datetime.timedelta(hours=24)
SERVING_LIFETIME = datetime.timedelta(days=730)
# Certificates start a little in the past so a peer whose clock lags ours still accepts a fresh one.
CLOCK_SKEW = datetime.timedelta(minutes=1)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate (or chain, leaf first) and its private key, both PEM. repr never shows the key."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def utcnow(now: datetime.datetime | None) -> datetime.datetime:
    """`now`, or the current time when None; a naive time is refused (certificates are in UTC)."""
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise IdentityError("now must be timezone-aware")
    return now


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(
    *,
    trust_domain: str | None = DEFAULT_TRUST_DOMAIN,
    common_name: str | None = None,
    lifetime: datetime.timedelta = CA_LIFETIME,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A self-signed ECDSA P-256 root CA that signs leaf certificates only (path length 0).

    With a trust domain it names it as its `spiffe://<td>` URI SAN (X509-SVID spec §4.1), so issuers refuse
    identities of other domains; None makes a CA for plain TLS (the webhook's serving certificate).
    """
    if trust_domain is not None and not is_trust_domain(trust_domain):
        raise IdentityError(f"{trust_domain!r} is not a SPIFFE trust domain (lowercase a-z 0-9 . - _)")
    if lifetime <= datetime.timedelta(0):
        raise IdentityError(f"certificate lifetime must be positive, got {lifetime}")
    start = utcnow(now)
    key = ec.generate_private_key(ec.SECP256R1())
    cn = common_name or f"kuberpc root CA {trust_domain or ''}".strip()
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kuberpc"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    if trust_domain is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
    cert = builder.sign(key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), key_pem(key))


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise IdentityError("not a PEM certificate") from e


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # Named by type only: nothing derived from the key's bytes reaches a message.
        raise IdentityError(f"not an unencrypted PEM private key ({type(e).__name__})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"the key is {type(key).__name__}, not an ECDSA key")
    return key


def is_ca(cert: x509.Certificate) -> bool:
    """Whether basicConstraints says CA:TRUE."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def trust_domain_of(cert: x509.Certificate) -> str | None:
    """The trust domain a CA names with a `spiffe://<td>` URI SAN, if it has one (a foreign CA may not)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if (td := trust_domain_of_uri(uri)) is not None:
            return td
    return None


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA certificate and the key that belongs to it: what signs every leaf of the mesh."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        if self.key.public_key() != self.cert.public_key():
            raise IdentityError(f"the key does not belong to certificate {self.cert.subject.rfc4514_string()!r}")

    @classmethod
    def load(cls, pair: KeyPair) -> Issuer:
        """The CA of a PEM pair; IdentityError says whether the certificate or the key is at fault."""
        try:
            cert = load_certificate(pair.cert_pem)
        except IdentityError as e:
            raise IdentityError(f"CA certificate: {e}") from e
        try:
            key = load_private_key(pair.key_pem)
        except IdentityError as e:
            raise IdentityError(f"CA key: {e}") from e
        return cls(cert, key)

    @property
    def pair(self) -> KeyPair:
        return KeyPair(self.cert.public_bytes(serialization.Encoding.PEM), key_pem(self.key))

    def window(self, now: datetime.datetime, lifetime: datetime.timedelta) -> tuple[datetime.datetime, datetime.datetime]:
        """(notBefore, notAfter) of a leaf issued at `now`: backdated by CLOCK_SKEW, never outside the CA's life."""
        if lifetime <= datetime.timedelta(0):
            raise IdentityError(f"certificate lifetime must be positive, got {lifetime}")
        start, end = self.cert.not_valid_before_utc, self.cert.not_valid_after_utc
        if not start <= now < end:
            raise IdentityError(
                f"the CA certificate is not valid at {now.isoformat()} (valid {start.isoformat()} to {end.isoformat()})"
            )
        now = now.replace(microsecond=0)  # X.509 times have whole seconds
        return max(now - CLOCK_SKEW, start), min(now + lifetime, end)

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        # Link to the CA by its own key identifier when it has one: a foreign CA may not derive it the usual way.
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def sign_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        subject: x509.Name,
        sans: Sequence[x509.GeneralName],
        usages: Sequence[x509.ObjectIdentifier],
        window: tuple[datetime.datetime, datetime.datetime],
    ) -> x509.Certificate:
        """The one leaf builder: an end-entity certificate (never a CA) for `public_key`."""
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(window[0])
            .not_valid_after(window[1])
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._authority_key_identifier(), critical=False)
            # With an empty subject (an X509-SVID) the SAN must be critical (RFC 5280 §4.2.1.6).
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=len(subject) == 0)
        )
        return builder.sign(self.key, hashes.SHA256())

    def sign_workload(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: SpiffeId,
        *,
        window: tuple[datetime.datetime, datetime.datetime],
        dns_names: Sequence[str] = (),
    ) -> x509.Certificate:
        """An X509-SVID: empty subject, `identity` as its only URI SAN, client and server auth."""
        ca_domain = trust_domain_of(self.cert)
        if ca_domain is not None and ca_domain != identity.trust_domain:
            raise IdentityError(f"CA is for trust domain {ca_domain!r}; cannot issue {str(identity)!r}")
        try:
            sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(identity))]
            sans += [x509.DNSName(n) for n in dns_names]
        except ValueError as e:
            raise IdentityError(f"invalid DNS name in {list(dns_names)!r}: {e}") from e
        return self.sign_leaf(
            public_key,
            subject=x509.Name([]),
            sans=sans,
            usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
            window=window,
        )


def _as_issuer(ca: KeyPair | Issuer) -> Issuer:
    return ca if isinstance(ca, Issuer) else Issuer.load(ca)


def issue_workload(
    ca: KeyPair | Issuer,
    *,
    identity: SpiffeId,
    lifetime: datetime.timedelta = WORKLOAD_LIFETIME,
    dns_names: Sequence[str] = (),
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A fresh ECDSA P-256 key and an X509-SVID for `identity`: the chain is the leaf then the CA."""
    issuer = _as_issuer(ca)
    window = issuer.window(utcnow(now), lifetime)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issuer.sign_workload(key.public_key(), identity, window=window, dns_names=dns_names)
    chain = leaf.public_bytes(serialization.Encoding.PEM) + issuer.cert.public_bytes(serialization.Encoding.PEM)
    return KeyPair(chain, key_pem(key))


def issue_serving(
    ca: KeyPair | Issuer,
    dns_names: Sequence[str],
    *,
    lifetime: datetime.timedelta = SERVING_LIFETIME,
    now: datetime.datetime | None = None,
) -> KeyPair:
    """A fresh ECDSA P-256 key and a TLS server certificate (leaf only) for `dns_names`, the first as its CN."""
    if not dns_names:
        raise IdentityError("a serving certificate needs at least one DNS name")
    issuer = _as_issuer(ca)
    window = issuer.window(utcnow(now), lifetime)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issuer.sign_leaf(
        key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]),
        sans=[x509.DNSName(n) for n in dns_names],
        usages=(ExtendedKeyUsageOID.SERVER_AUTH,),
        window=window,
    )
    return KeyPair(leaf.public_bytes(serialization.Encoding.PEM), key_pem(key))
