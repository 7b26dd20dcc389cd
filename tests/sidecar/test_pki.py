"""sidecar/pki.py: the one CA generator and leaf builder of the mesh, used by `sidecar certs`, the webhook's
install command and its identity CA. Offline; the certificates are checked with cryptography's RFC 5280 verifier."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given
from hypothesis import strategies as st

from sidecar import pki
from sidecar.spiffe import IdentityError, SpiffeId, is_dns_label, is_service_account, is_trust_domain

NOW = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
ARITH = SpiffeId("cluster.local", "default", "arith")


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificates(pem)[0]


def test_a_ca_signs_leaves_only() -> None:
    ca = cert(pki.create_ca(now=NOW).cert_pem)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0


def test_a_ca_without_trust_domain_names_none_and_issues_tls_server_certificates() -> None:
    ca = pki.create_ca(trust_domain=None, common_name="kuberpc webhook CA", now=NOW)
    assert pki.trust_domain_of(cert(ca.cert_pem)) is None
    served = pki.issue_serving(ca, ["kuberpc-webhook.kuberpc-system.svc", "kuberpc-webhook"], now=NOW)
    verifier = PolicyBuilder().store(Store([cert(ca.cert_pem)])).time(NOW).build_server_verifier(
        x509.DNSName("kuberpc-webhook.kuberpc-system.svc")
    )
    verifier.verify(cert(served.cert_pem), [])
    eku = cert(served.cert_pem).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_a_serving_certificate_needs_a_name() -> None:
    with pytest.raises(IdentityError, match="at least one DNS name"):
        pki.issue_serving(pki.create_ca(now=NOW), [], now=NOW)


def test_a_leaf_starts_no_earlier_than_its_ca_and_ends_no_later() -> None:
    ca = pki.Issuer.load(pki.create_ca(lifetime=datetime.timedelta(hours=2), now=NOW))
    start = ca.cert.not_valid_before_utc
    assert ca.window(start, datetime.timedelta(hours=24)) == (start, ca.cert.not_valid_after_utc)
    # Whole seconds, backdated by the clock skew allowance when the CA allows it.
    later = NOW + datetime.timedelta(minutes=10, microseconds=500)
    assert ca.window(later, datetime.timedelta(minutes=5)) == (
        NOW + datetime.timedelta(minutes=9),
        NOW + datetime.timedelta(minutes=15),
    )


@pytest.mark.parametrize("offset", [datetime.timedelta(minutes=-2), datetime.timedelta(hours=2)])
def test_nothing_is_issued_outside_the_cas_life(offset: datetime.timedelta) -> None:
    ca = pki.create_ca(lifetime=datetime.timedelta(hours=2), now=NOW)
    with pytest.raises(IdentityError, match="not valid at"):
        pki.issue_workload(ca, identity=ARITH, now=NOW + offset)
    with pytest.raises(IdentityError, match="not valid at"):
        pki.issue_serving(ca, ["a.b.svc"], now=NOW + offset)


def test_a_key_pairs_repr_never_shows_the_key() -> None:
    pair = pki.create_ca(now=NOW)
    assert b"PRIVATE" in pair.key_pem and "PRIVATE" not in repr(pair)


@pytest.mark.parametrize(
    ("pair", "says"),
    [
        (pki.KeyPair(b"junk", b"junk"), "CA certificate: not a PEM certificate"),
        (pki.KeyPair(pki.create_ca(now=NOW).cert_pem, b"junk"), "CA key: not an unencrypted PEM private key"),
        (pki.KeyPair(pki.create_ca(now=NOW).cert_pem, pki.create_ca(now=NOW).key_pem), "does not belong"),
    ],
)
def test_a_ca_pair_that_cannot_sign_says_which_half_is_wrong(pair: pki.KeyPair, says: str) -> None:
    with pytest.raises(IdentityError, match=says):
        pki.Issuer.load(pair)


LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


@given(ns=LABEL, sa=st.lists(LABEL, min_size=1, max_size=4).map(".".join))
def test_every_kubernetes_name_pair_is_a_workload_identity_that_parses_back(ns: str, sa: str) -> None:
    if len(sa) > 253:
        assert not is_service_account(sa)
        return
    identity = SpiffeId("cluster.local", ns, sa)
    assert SpiffeId.parse(str(identity)) == identity
    assert identity.username == f"system:serviceaccount:{ns}:{sa}"


@given(text=st.text(max_size=70))
def test_names_with_anything_but_lowercase_rfc1123_characters_are_refused(text: str) -> None:
    if is_dns_label(text):
        assert len(text) <= 63 and text[0].isalnum() and text[-1].isalnum()
        assert set(text) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    if is_trust_domain(text):
        assert set(text) <= set("abcdefghijklmnopqrstuvwxyz0123456789.-_") and text
