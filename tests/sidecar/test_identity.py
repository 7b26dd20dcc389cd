"""Specification of mesh identity: SPIFFE IDs, certificates, and mTLS handshakes on loopback."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.verification import PolicyBuilder, Store

from sidecar.identity import (
    IdentityError,
    SpiffeId,
    cert_expiry_timestamp,
    client_context,
    peer_identity,
    require_mesh_identity,
    server_context,
)
from sidecar.pki import KeyPair, create_ca, issue_workload

NOW = datetime.datetime(2025, 3, 1, 12, 0, tzinfo=datetime.UTC)
SERVER_ID = SpiffeId("cluster.local", "default", "arith")
CLIENT_ID = SpiffeId("cluster.local", "shop", "frontend")
DEADLINE = 5.0


# --- SPIFFE IDs -------------------------------------------------------------------------------------


def test_spiffe_id_str_is_the_uri() -> None:
    assert str(SpiffeId("cluster.local", "shop", "frontend")) == "spiffe://cluster.local/ns/shop/sa/frontend"


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://cluster.local/ns/default/sa/default",
        "spiffe://example.org/ns/kube-system/sa/coredns",
        "spiffe://prod_eu-1.example/ns/a/sa/build.robot-2",
    ],
)
def test_spiffe_id_parse_round_trips(uri: str) -> None:
    assert str(SpiffeId.parse(uri)) == uri


def test_spiffe_id_parse_splits_the_fields() -> None:
    assert SpiffeId.parse("spiffe://td.example/ns/shop/sa/frontend") == SpiffeId(
        "td.example", "shop", "frontend"
    )


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "https://cluster.local/ns/default/sa/default",
        "SPIFFE://cluster.local/ns/default/sa/default",
        "spiffe://Cluster.local/ns/default/sa/default",
        "spiffe://cluster.local:8443/ns/default/sa/default",
        "spiffe://user@cluster.local/ns/default/sa/default",
        "spiffe:///ns/default/sa/default",
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/default",
        "spiffe://cluster.local/ns//sa/default",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/sa/default/ns/default",
        "spiffe://cluster.local/ns/default/sa/default/",
        "spiffe://cluster.local/ns/default/sa/default/extra",
        "spiffe://cluster.local/ns/default/sa/default?x=1",
        "spiffe://cluster.local/ns/default/sa/default#frag",
        "spiffe://cluster.local/ns/Default/sa/default",
        "spiffe://cluster.local/ns/default/sa/de%66ault",
        "spiffe://cluster.local/ns/-bad/sa/default",
        "spiffe://cluster.local/ns/default/sa/.dot",
        # `$` also matches before a trailing newline: the exact form is checked with fullmatch.
        "spiffe://cluster.local/ns/default/sa/default\n",
        "spiffe://cluster.local/ns/default\n/sa/default",
        "spiffe://cluster.local\n/ns/default/sa/default",
    ],
)
def test_spiffe_id_parse_rejects_anything_but_a_workload_id_and_names_it(uri: str) -> None:
    with pytest.raises(IdentityError) as e:
        SpiffeId.parse(uri)
    assert repr(uri) in str(e.value)


@pytest.mark.parametrize(
    ("trust_domain", "namespace", "service_account"),
    [
        ("Cluster.local", "default", "sa"),
        ("cluster.local", "a/b", "sa"),
        ("cluster.local", "ns", "x" * 254),
        ("cluster.local\n", "ns", "sa"),
        ("cluster.local", "ns\n", "sa"),
        ("cluster.local", "ns", "sa\n"),
    ],
)
def test_spiffe_id_refuses_invalid_fields_at_construction(
    trust_domain: str, namespace: str, service_account: str
) -> None:
    with pytest.raises(IdentityError):
        SpiffeId(trust_domain, namespace, service_account)


# --- certificates -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return create_ca(now=NOW)


def _certs(chain_pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(chain_pem)


def test_ca_is_a_self_signed_p256_ca_naming_its_trust_domain(ca: KeyPair) -> None:
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.public_key().curve, ec.SECP256R1)  # type: ignore[union-attr]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]


def test_workload_key_is_ecdsa_p256(ca: KeyPair) -> None:
    issued = issue_workload(ca, identity=SERVER_ID, now=NOW)
    key_pem, chain_pem = issued.key_pem, issued.cert_pem
    key = load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert _certs(chain_pem)[0].public_key() == key.public_key()


def test_workload_cert_expires_24_hours_after_issue(ca: KeyPair) -> None:
    chain_pem = issue_workload(ca, identity=SERVER_ID, now=NOW).cert_pem
    leaf = _certs(chain_pem)[0]
    assert leaf.not_valid_after_utc == NOW + datetime.timedelta(hours=24)
    # Backdated a little for peers whose clocks lag, never more than a few minutes.
    assert NOW - datetime.timedelta(minutes=5) <= leaf.not_valid_before_utc <= NOW


def test_workload_cert_carries_the_spiffe_id_as_its_only_uri_san(ca: KeyPair) -> None:
    chain_pem = issue_workload(ca, identity=SERVER_ID, dns_names=["arith.default.svc"], now=NOW).cert_pem
    ext = _certs(chain_pem)[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ext.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(SERVER_ID)]
    assert ext.value.get_values_for_type(x509.DNSName) == ["arith.default.svc"]


def test_workload_chain_is_leaf_then_ca_and_verifies_against_the_ca(ca: KeyPair) -> None:
    chain_pem = issue_workload(ca, identity=SERVER_ID, now=NOW).cert_pem
    leaf, issuer = _certs(chain_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert issuer == ca_cert
    # cryptography's RFC 5280 path builder is strict: it also checks key usages and extensions.
    verifier = PolicyBuilder().store(Store([ca_cert])).time(NOW).build_client_verifier()
    verified = verifier.verify(leaf, [])
    assert x509.UniformResourceIdentifier(str(SERVER_ID)) in (verified.subjects or [])


def test_workload_cert_cannot_act_as_a_ca(ca: KeyPair) -> None:
    chain_pem = issue_workload(ca, identity=SERVER_ID, now=NOW).cert_pem
    leaf = _certs(chain_pem)[0]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_workload_cert_never_outlives_its_ca() -> None:
    ca = create_ca(lifetime=datetime.timedelta(hours=2), now=NOW)
    chain_pem = issue_workload(ca, identity=SERVER_ID, now=NOW).cert_pem
    assert _certs(chain_pem)[0].not_valid_after_utc == NOW + datetime.timedelta(hours=2)


def test_issue_refuses_an_expired_ca(ca: KeyPair) -> None:
    with pytest.raises(IdentityError, match="not valid at"):
        issue_workload(ca, identity=SERVER_ID, now=NOW + datetime.timedelta(days=400))


def test_issue_refuses_an_identity_from_another_trust_domain(ca: KeyPair) -> None:
    with pytest.raises(IdentityError, match=r"spiffe://example\.org/ns/default/sa/arith"):
        issue_workload(ca, identity=SpiffeId("example.org", "default", "arith"), now=NOW)


def test_issue_refuses_a_ca_key_that_does_not_match_the_ca_cert(ca: KeyPair) -> None:
    other = create_ca(now=NOW)
    with pytest.raises(IdentityError, match="does not belong"):
        issue_workload(KeyPair(ca.cert_pem, other.key_pem), identity=SERVER_ID, now=NOW)


def test_issue_refuses_a_naive_clock(ca: KeyPair) -> None:
    with pytest.raises(IdentityError, match="timezone"):
        issue_workload(ca, identity=SERVER_ID, now=datetime.datetime(2025, 3, 1, 12, 0))


def test_cert_expiry_timestamp_is_the_leaf_not_after(ca: KeyPair) -> None:
    chain_pem = issue_workload(ca, identity=SERVER_ID, lifetime=datetime.timedelta(hours=3), now=NOW).cert_pem
    assert cert_expiry_timestamp(chain_pem) == (NOW + datetime.timedelta(hours=3)).timestamp()


def test_cert_expiry_timestamp_rejects_what_is_not_a_certificate() -> None:
    with pytest.raises(IdentityError):
        cert_expiry_timestamp(b"not a certificate")


# --- ssl contexts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    cert: str
    key: str
    anchors: str


def _write_workload(directory: Path, ca: KeyPair, identity: SpiffeId, anchors: bytes) -> Files:
    directory.mkdir()
    issued = issue_workload(ca, identity=identity)
    key_pem, chain_pem = issued.key_pem, issued.cert_pem
    (directory / "key.pem").write_bytes(key_pem)
    (directory / "cert.pem").write_bytes(chain_pem)
    (directory / "ca.pem").write_bytes(anchors)
    return Files(str(directory / "cert.pem"), str(directory / "key.pem"), str(directory / "ca.pem"))


@dataclass(frozen=True)
class Pki:
    server: Files
    client: Files
    # From another CA nobody in the mesh trusts; each trusts ours, so only its own certificate is at fault.
    foreign_client: Files
    foreign_server: Files
    other_domain_client: Files  # from a CA of another trust domain that the server also trusts
    anchors_with_other_domain: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    mesh = create_ca()
    foreign = create_ca()
    other_domain = create_ca(trust_domain="example.org")
    both = root / "both.pem"
    both.write_bytes(mesh.cert_pem + other_domain.cert_pem)
    return Pki(
        server=_write_workload(root / "server", mesh, SERVER_ID, mesh.cert_pem),
        client=_write_workload(root / "client", mesh, CLIENT_ID, mesh.cert_pem),
        foreign_client=_write_workload(root / "foreign-client", foreign, CLIENT_ID, mesh.cert_pem),
        foreign_server=_write_workload(root / "foreign-server", foreign, SERVER_ID, mesh.cert_pem),
        other_domain_client=_write_workload(
            root / "other-domain", other_domain, SpiffeId("example.org", "shop", "frontend"), mesh.cert_pem
        ),
        anchors_with_other_domain=str(both),
    )


def _server_ctx(f: Files, anchors: str | None = None) -> ssl.SSLContext:
    return server_context(f.cert, f.key, anchors or f.anchors)


def _client_ctx(f: Files) -> ssl.SSLContext:
    return client_context(f.cert, f.key, f.anchors)


def test_contexts_allow_tls13_only(pki: Pki) -> None:
    for ctx in (_server_ctx(pki.server), _client_ctx(pki.client)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_context_names_a_missing_file(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(IdentityError, match="nope.pem"):
        server_context(missing, pki.server.key, pki.server.anchors)
    with pytest.raises(IdentityError, match="nope.pem"):
        client_context(pki.client.cert, pki.client.key, missing)


def test_context_refuses_a_key_that_does_not_match_the_certificate(pki: Pki) -> None:
    with pytest.raises(IdentityError, match="cannot load certificate"):
        server_context(pki.server.cert, pki.client.key, pki.server.anchors)


# --- handshakes on loopback -------------------------------------------------------------------------


@dataclass
class Accepted:
    peer: SpiffeId | None
    alpn: str | None
    mesh_identity: SpiffeId | IdentityError  # require_mesh_identity(trust_domain="cluster.local")


@asynccontextmanager
async def mtls_server(ctx: ssl.SSLContext) -> AsyncIterator[tuple[int, asyncio.Future[Accepted]]]:
    """A server that upgrades each connection with `ctx` itself, so a failed handshake is seen server-side.

    (asyncio.start_server(ssl=...) drops handshake errors before any handler runs.) The future holds the
    first connection's outcome: what the server learned of the peer, or the handshake error.
    """
    outcome: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(ctx)
            obj = writer.get_extra_info("ssl_object")
            mesh_identity: SpiffeId | IdentityError
            try:
                mesh_identity = require_mesh_identity(obj, trust_domain="cluster.local")
            except IdentityError as e:
                mesh_identity = e
            if not outcome.done():
                outcome.set_result(Accepted(peer_identity(obj), obj.selected_alpn_protocol(), mesh_identity))
            writer.write(b"ok")
            await writer.drain()
        except (ssl.SSLError, ConnectionError) as e:
            if not outcome.done():
                outcome.set_exception(e)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], outcome
    finally:
        server.close()
        await server.wait_closed()


async def test_mesh_client_is_accepted_and_the_server_reads_its_identity(pki: Pki) -> None:
    async with asyncio.timeout(DEADLINE):
        server = await asyncio.start_server(_echo_identity, "127.0.0.1", 0, ssl=_server_ctx(pki.server))
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(pki.client))
            assert await reader.read() == str(CLIENT_ID).encode()
            assert peer_identity(writer.get_extra_info("ssl_object")) == SERVER_ID
            writer.close()


async def _echo_identity(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with the caller's SPIFFE ID as the server saw it, then closes."""
    identity = require_mesh_identity(writer.get_extra_info("ssl_object"), trust_domain="cluster.local")
    writer.write(str(identity).encode())
    await writer.drain()
    writer.close()


async def test_alpn_negotiates_h2_on_both_sides(pki: Pki) -> None:
    async with asyncio.timeout(DEADLINE), mtls_server(_server_ctx(pki.server)) as (port, outcome):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(pki.client))
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        assert (await outcome).alpn == "h2"
        writer.close()


async def test_client_without_a_certificate_is_refused(pki: Pki) -> None:
    no_cert = ssl.create_default_context(cafile=pki.client.anchors)
    no_cert.check_hostname = False
    async with asyncio.timeout(DEADLINE), mtls_server(_server_ctx(pki.server)) as (port, outcome):
        # TLS 1.3: the client finishes its side of the handshake before the server judges its certificate,
        # so the client only sees the connection close (asyncio drops the server's alert) on its first read.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=no_cert)
        with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE"):
            await outcome
        assert await reader.read() == b""  # never the server's greeting
        writer.close()


async def test_client_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    async with asyncio.timeout(DEADLINE), mtls_server(_server_ctx(pki.server)) as (port, outcome):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(pki.foreign_client))
        with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
            await outcome
        assert await reader.read() == b""  # never the server's greeting
        writer.close()


async def test_client_refuses_a_server_certificate_from_another_ca(pki: Pki) -> None:
    async with asyncio.timeout(DEADLINE), mtls_server(_server_ctx(pki.foreign_server)) as (port, outcome):
        with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(pki.client))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await outcome


async def test_tls12_client_is_refused(pki: Pki) -> None:
    tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls12.check_hostname = False
    tls12.load_verify_locations(pki.client.anchors)
    tls12.load_cert_chain(pki.client.cert, pki.client.key)
    async with asyncio.timeout(DEADLINE), mtls_server(_server_ctx(pki.server)) as (port, outcome):
        # The client sees a protocol_version alert or, when asyncio closes before flushing it, a reset.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=tls12)
        with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL"):
            await outcome


async def test_require_mesh_identity_refuses_a_trusted_peer_of_another_trust_domain(pki: Pki) -> None:
    ctx = _server_ctx(pki.server, anchors=pki.anchors_with_other_domain)
    async with asyncio.timeout(DEADLINE), mtls_server(ctx) as (port, outcome):
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client_ctx(pki.other_domain_client))
        accepted = await outcome
        assert accepted.peer == SpiffeId("example.org", "shop", "frontend")
        assert isinstance(accepted.mesh_identity, IdentityError)
        assert "not in trust domain 'cluster.local'" in str(accepted.mesh_identity)
        writer.close()


# --- peer identity from a peer certificate ----------------------------------------------------------


class _SSLObjectWith:
    """Stands in for ssl.SSLObject: only getpeercert() is consulted, returning the given decoded cert."""

    def __init__(self, cert: dict[str, object]) -> None:
        self._cert = cert

    def getpeercert(self) -> dict[str, object]:
        return self._cert


def test_peer_identity_is_none_without_a_verified_certificate() -> None:
    assert peer_identity(_SSLObjectWith({})) is None  # type: ignore[arg-type]


def test_peer_identity_is_none_without_a_uri_san() -> None:
    cert = {"subjectAltName": (("DNS", "arith.default.svc"),)}
    assert peer_identity(_SSLObjectWith(cert)) is None  # type: ignore[arg-type]


def test_peer_identity_is_none_with_two_uri_sans() -> None:
    cert = {"subjectAltName": (("URI", str(SERVER_ID)), ("URI", str(CLIENT_ID)))}
    assert peer_identity(_SSLObjectWith(cert)) is None  # type: ignore[arg-type]


def test_peer_identity_is_none_for_a_uri_that_is_not_a_workload_id() -> None:
    cert = {"subjectAltName": (("URI", "spiffe://cluster.local/some/thing"),)}
    assert peer_identity(_SSLObjectWith(cert)) is None  # type: ignore[arg-type]


def test_require_mesh_identity_refuses_a_peer_without_one() -> None:
    with pytest.raises(IdentityError, match="no SPIFFE"):
        require_mesh_identity(_SSLObjectWith({}), trust_domain="cluster.local")  # type: ignore[arg-type]
