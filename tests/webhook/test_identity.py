"""The mesh CA's decisions, offline: which requests it refuses (and as what), and what it signs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given
from hypothesis import strategies as st

from sidecar import pki
from sidecar.pki import KeyPair
from sidecar.spiffe import SpiffeId
from webhook.identity import (
    CLOCK_SKEW,
    WORKLOAD_LIFETIME,
    CAError,
    CertificateAuthority,
    InvalidRequest,
    PermissionDenied,
    TokenReview,
    Unauthenticated,
    Unavailable,
    authorize,
    check_request,
    parse_csr,
    parse_identity,
)

NOW = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
TD = "cluster.local"
SHOP = "spiffe://cluster.local/ns/shop/sa/cart"
SHOP_USER = "system:serviceaccount:shop:cart"
AUDIENCE = "kuberpc-identity"


def write_ca(tmp: Path, pair: KeyPair) -> tuple[Path, Path]:
    cert, key = tmp / "ca.pem", tmp / "ca-key.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return cert, key


def mesh_ca(tmp: Path, *, now: dt.datetime = NOW, days: int = 3650) -> tuple[CertificateAuthority, KeyPair]:
    pair = pki.create_ca(trust_domain=TD, common_name="kuberpc identity CA", lifetime=dt.timedelta(days=days), now=now)
    cert, key = write_ca(tmp, pair)
    return CertificateAuthority.load(cert, key, trust_domain=TD), pair


def csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, *, asks_for_more: bool = False) -> bytes:
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")] if asks_for_more else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if asks_for_more:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("evil.example"),
                    x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
                ]
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def vouched(user: str = SHOP_USER) -> TokenReview:
    return TokenReview(authenticated=True, username=user, audiences=(AUDIENCE,))


def issue(ca: CertificateAuthority, key: ec.EllipticCurvePrivateKey, *, now: dt.datetime = NOW) -> x509.Certificate:
    request = check_request(SHOP, csr(key, asks_for_more=True), trust_domain=TD)
    return x509.load_der_x509_certificate(ca.certify(request, vouched(), now=now).leaf_der)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return mesh_ca(tmp_path)[0]


# --- what is signed ---------------------------------------------------------------------------------


def test_the_certificate_verifies_against_the_mesh_ca_as_a_client_certificate_of_the_identity(
    ca: CertificateAuthority,
) -> None:
    leaf = issue(ca, p256())
    verified = PolicyBuilder().store(Store([ca.cert])).time(NOW).build_client_verifier().verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(SHOP)]


def test_the_certificate_carries_the_uri_san_only_whatever_the_csr_asked_for(ca: CertificateAuthority) -> None:
    leaf = issue(ca, p256())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert list(san.value) == [x509.UniformResourceIdentifier(SHOP)]
    assert san.critical  # the subject is empty (RFC 5280 §4.2.1.6)
    assert leaf.subject == x509.Name([])


def test_the_certificate_certifies_the_csrs_p256_key(ca: CertificateAuthority) -> None:
    key = p256()
    leaf = issue(ca, key)
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1)
    assert public == key.public_key()


def test_the_certificate_lives_24_hours_from_a_minute_ago(ca: CertificateAuthority) -> None:
    leaf = issue(ca, p256())
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + WORKLOAD_LIFETIME
    assert WORKLOAD_LIFETIME == dt.timedelta(hours=24)


def test_the_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    # A 1-day CA made 14 hours ago expires in 10 hours.
    ca, _ = mesh_ca(tmp_path, now=NOW - dt.timedelta(hours=14), days=1)
    leaf = issue(ca, p256())
    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc == NOW + dt.timedelta(hours=10)


def test_the_certificate_is_a_leaf_for_client_and_server_authentication(ca: CertificateAuthority) -> None:
    leaf = issue(ca, p256())
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign


def test_valid_until_is_the_leafs_not_after(ca: CertificateAuthority) -> None:
    request = check_request(SHOP, csr(p256()), trust_domain=TD)
    issued = ca.certify(request, vouched(), now=NOW)
    leaf = x509.load_der_x509_certificate(issued.leaf_der)
    assert issued.valid_until == int(leaf.not_valid_after_utc.timestamp())
    assert issued.serial == leaf.serial_number


@pytest.mark.parametrize("offset", [dt.timedelta(days=-1), dt.timedelta(days=3651)], ids=["not-yet-valid", "expired"])
def test_a_ca_outside_its_validity_issues_nothing_and_says_retry_later(
    ca: CertificateAuthority, offset: dt.timedelta
) -> None:
    request = check_request(SHOP, csr(p256()), trust_domain=TD)
    with pytest.raises(Unavailable, match="not valid at"):
        ca.certify(request, vouched(), now=NOW + offset)


def test_the_serving_certificate_names_the_services_dns_names_and_chains_to_the_ca(ca: CertificateAuthority) -> None:
    names = ["kuberpc-webhook.kuberpc-system.svc", "kuberpc-webhook.kuberpc-system.svc.cluster.local"]
    pair, not_after = ca.serving_pair(names, now=NOW)
    leaf = x509.load_pem_x509_certificate(pair.cert_pem)
    verifier = PolicyBuilder().store(Store([ca.cert])).time(NOW)
    for name in names:
        verifier.build_server_verifier(x509.DNSName(name)).verify(leaf, [])
    assert not_after == leaf.not_valid_after_utc
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    assert key.public_key() == leaf.public_key()


# --- malformed requests: INVALID_ARGUMENT -----------------------------------------------------------


def test_bytes_that_are_not_a_der_csr_are_invalid() -> None:
    with pytest.raises(InvalidRequest, match="not a DER PKCS#10"):
        parse_csr(b"-----BEGIN CERTIFICATE REQUEST-----")


def test_an_oversized_csr_is_invalid_before_parsing() -> None:
    with pytest.raises(InvalidRequest, match="bytes"):
        parse_csr(b"\x30" * 20_000)


def test_a_csr_whose_signature_does_not_verify_is_invalid() -> None:
    der = bytearray(csr(p256()))
    der[-1] ^= 0x01  # the last byte is inside the ECDSA signature
    with pytest.raises(InvalidRequest, match="signature"):
        parse_csr(bytes(der))


def test_a_csr_signed_by_another_key_than_the_one_it_carries_is_invalid() -> None:
    # The body of one CSR with the signature of another: proves nothing about the key it names.
    one, other = x509.load_der_x509_csr(csr(p256())), x509.load_der_x509_csr(csr(p256()))
    forged = one.tbs_certrequest_bytes
    body = other.public_bytes(serialization.Encoding.DER)
    assert other.tbs_certrequest_bytes in body
    with pytest.raises(InvalidRequest, match="signature"):
        parse_csr(body.replace(other.tbs_certrequest_bytes, forged))


@pytest.mark.parametrize(
    ("key", "named"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSAPublicKey"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "secp384r1"),
    ],
    ids=["rsa", "p384"],
)
def test_a_key_other_than_ecdsa_p256_is_invalid(
    key: Callable[[], ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey], named: str
) -> None:
    with pytest.raises(InvalidRequest, match=f"{named}, not ECDSA P-256"):
        parse_csr(csr(key()))


@pytest.mark.parametrize(
    "identity",
    [
        "https://cluster.local/ns/shop/sa/cart",
        "spiffe://cluster.local/shop/cart",
        "spiffe://cluster.local/ns/shop/sa/cart/extra",
        "spiffe://cluster.local/ns/Shop/sa/cart",
        "spiffe://cluster.local/ns/shop/sa/",
        "spiffe://cluster.local/ns/shop/sa/cart?x=1",
        "spiffe://cluster.local/ns/shop/sa/cart\n",  # `$` matched before a trailing newline
        "spiffe://cluster.local\n/ns/shop/sa/cart",
        "shop/cart",
        "",
    ],
)
def test_an_identity_that_is_not_a_workload_spiffe_id_is_invalid(identity: str) -> None:
    with pytest.raises(InvalidRequest, match="identity"):
        parse_identity(identity, trust_domain=TD)


def test_an_identity_of_another_trust_domain_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="not in trust domain 'cluster.local'"):
        parse_identity("spiffe://other.example/ns/shop/sa/cart", trust_domain=TD)


def test_the_request_is_checked_as_a_whole_before_any_token_review() -> None:
    request = check_request(SHOP, csr(p256()), trust_domain=TD)
    assert request.identity == SpiffeId(TD, "shop", "cart")
    with pytest.raises(InvalidRequest):
        check_request(SHOP, b"not a csr", trust_domain=TD)


_name = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")


@given(ns=_name, sa=st.lists(_name, min_size=1, max_size=3).map(".".join))
def test_every_workload_identity_parses_back_from_its_uri(ns: str, sa: str) -> None:
    identity = SpiffeId(TD, ns, sa)
    assert parse_identity(str(identity), trust_domain=TD) == identity
    assert identity.username == f"system:serviceaccount:{ns}:{sa}"


# --- the token's verdict: UNAUTHENTICATED / PERMISSION_DENIED -------------------------------------------

SHOP_ID = SpiffeId(TD, "shop", "cart")


def test_a_token_the_api_rejects_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="token has expired"):
        authorize(SHOP_ID, TokenReview(authenticated=False, error="token has expired"))


def test_a_token_for_another_audience_is_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="audience 'kuberpc-identity'"):
        authorize(
            SHOP_ID,
            TokenReview(authenticated=True, username=SHOP_USER, audiences=("https://kubernetes.default.svc",)),
        )


@pytest.mark.parametrize(
    "user",
    ["system:serviceaccount:other:cart", "system:serviceaccount:shop:admin", "kubernetes-admin", ""],
    ids=["other-namespace", "other-service-account", "not-a-service-account", "anonymous"],
)
def test_a_token_of_anyone_else_is_denied(user: str) -> None:
    with pytest.raises(PermissionDenied, match="may not be certified as"):
        authorize(SHOP_ID, vouched(user))


def test_the_token_of_the_identitys_own_service_account_is_authorized() -> None:
    authorize(SHOP_ID, vouched())  # no exception: certify goes on to sign


def test_certify_signs_nothing_for_a_denied_token(ca: CertificateAuthority) -> None:
    request = check_request(SHOP, csr(p256()), trust_domain=TD)
    with pytest.raises(PermissionDenied):
        ca.certify(request, vouched("system:serviceaccount:shop:admin"), now=NOW)


# --- loading the CA ------------------------------------------------------------------------------------


def test_a_missing_ca_file_is_named(tmp_path: Path) -> None:
    _, pair = mesh_ca(tmp_path)
    with pytest.raises(CAError, match=f"{tmp_path / 'absent.pem'}: cannot read the identity CA certificate"):
        CertificateAuthority.load(tmp_path / "absent.pem", tmp_path / "ca-key.pem", trust_domain=TD)


def test_a_certificate_file_that_is_not_pem_is_named(tmp_path: Path) -> None:
    mesh_ca(tmp_path)
    (tmp_path / "ca.pem").write_text("hello")
    with pytest.raises(CAError, match="ca.pem: not a PEM certificate"):
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca-key.pem", trust_domain=TD)


def test_a_key_file_that_is_not_a_key_is_named_without_its_content(tmp_path: Path) -> None:
    mesh_ca(tmp_path)
    garbage = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"
    (tmp_path / "ca-key.pem").write_text(garbage)
    with pytest.raises(CAError, match="ca-key.pem: not an unencrypted PEM private key") as e:
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca-key.pem", trust_domain=TD)
    assert "c2VjcmV0" not in str(e.value)


def test_a_key_that_does_not_belong_to_the_certificate_is_named(tmp_path: Path) -> None:
    mesh_ca(tmp_path)
    other = pki.create_ca(trust_domain=None, common_name="other", now=NOW)
    (tmp_path / "ca-key.pem").write_bytes(other.key_pem)
    with pytest.raises(CAError, match="ca-key.pem: not the key of the certificate"):
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca-key.pem", trust_domain=TD)


def test_a_non_ecdsa_ca_key_is_refused(tmp_path: Path) -> None:
    mesh_ca(tmp_path)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "ca-key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(CAError, match="not an ECDSA key"):
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca-key.pem", trust_domain=TD)


def test_a_leaf_certificate_is_not_a_ca(tmp_path: Path) -> None:
    root = pki.create_ca(trust_domain=None, common_name="root", now=NOW)
    leaf = pki.issue_serving(root, ["kuberpc-webhook.kuberpc-system.svc"], now=NOW)
    cert, key = write_ca(tmp_path, leaf)
    with pytest.raises(CAError, match="not a CA certificate"):
        CertificateAuthority.load(cert, key, trust_domain=TD)


def test_a_ca_of_another_trust_domain_than_configured_is_refused(tmp_path: Path) -> None:
    mesh_ca(tmp_path)
    with pytest.raises(CAError, match="trust domain 'cluster.local', the configuration says 'prod.example'"):
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca-key.pem", trust_domain="prod.example")
