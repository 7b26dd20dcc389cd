"""Specification of the proxy's workload certificate: asked of the identity service with a CSR and the pod's
token, renewed at 2/3 of its life without dropping a call, served only once in hand; or read from files and
reloaded when they change. A fake identity service (grpc.aio, TLS on loopback, a test CA) stands in for the
control plane."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import itertools
import logging
import os
import random
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from proto import identity_pb2, identity_pb2_grpc
from sidecar import config as config_mod
from sidecar import grpc_client, identity, pki
from sidecar.config import Address, ConfigError, IdentityService
from sidecar.identity import IdentityError, SpiffeId
from sidecar.workload_cert import (
    RETRY_BASE,
    RETRY_CAP,
    CertifyError,
    FileIdentity,
    GrpcCertifier,
    Issued,
    IssuedIdentity,
    retry_delay,
)
from tests.ports import free_port
from tests.sidecar.harness import (
    GRPC_OPTIONS,
    Backend,
    MeshCerts,
    Pair,
    RunningProxy,
    Workload,
    endpoints_yaml,
    run_pair,
    run_proxy,
    wait_for,
)

REPO = Path(__file__).resolve().parents[2]
TRUST_DOMAIN = "cluster.local"
SERVER_ID = SpiffeId(TRUST_DOMAIN, "default", "arith")
CLIENT_ID = SpiffeId(TRUST_DOMAIN, "default", "client")
TOKEN = b"eyJhbGciOiJSUzI1NiJ9.test-token-for-the-fake-identity-service.c2lnbmF0dXJl"
# Real issuers backdate notBefore for clock skew (sidecar.identity does by a minute): so does the fake.
BACKDATE = datetime.timedelta(minutes=1)
DAY = 24 * 3600.0


# ---- a test CA and a fake identity service -----------------------------------------------------------


@dataclass(frozen=True)
class CA:
    key_pem: bytes
    cert_pem: bytes
    path: Path  # the trust anchors file

    def sign(
        self, public_key: ec.EllipticCurvePublicKey, uri: str, *, not_before: datetime.datetime, lifetime: float
    ) -> x509.Certificate:
        """An X509-SVID for `public_key`, as the control plane would issue it."""
        ca_key = serialization.load_pem_private_key(self.key_pem, password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.cert_pem)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before - BACKDATE)
            .not_valid_after(not_before + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(ca_key, hashes.SHA256())
        )


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    pair = pki.create_ca(trust_domain=TRUST_DOMAIN)
    key, cert = pair.key_pem, pair.cert_pem
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    path.write_bytes(cert)
    return CA(key, cert, path)


WEBHOOK_ID = SpiffeId(TRUST_DOMAIN, "kuberpc-system", "kuberpc-webhook")
LOOPBACK = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))


def serving_cert(ca: CA, *names: x509.GeneralName) -> tuple[bytes, bytes]:
    """A TLS server key and chain (PEM) from `ca`, as the identity port has; by default for 127.0.0.1 (an IP
    SAN: a DNS SAN spelling an address does not name it for a standard TLS client)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(list(names or (x509.UniformResourceIdentifier(str(WEBHOOK_ID)), LOOPBACK))),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem


@dataclass
class Seen:
    identity: str
    token: bytes
    csr: x509.CertificateSigningRequest
    at: float  # wall clock


@dataclass
class FakeIdentityService(identity_pb2_grpc.IdentityServicer):
    """Signs whatever it is asked, for `lifetime` seconds; refuses the first calls with `refusals`."""

    ca: CA
    lifetime: float = DAY
    refusals: list[tuple[grpc.StatusCode, str]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def Certify(
        self, request: identity_pb2.CertifyRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CertifyResponse:
        csr = x509.load_der_x509_csr(request.certificate_signing_request)
        self.seen.append(Seen(request.identity, request.token, csr, time.time()))
        if self.refusals:
            code, message = self.refusals.pop(0)
            await context.abort(code, message)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        now = datetime.datetime.now(datetime.UTC)
        leaf = self.ca.sign(public_key, request.identity, not_before=now, lifetime=self.lifetime)
        return identity_pb2.CertifyResponse(
            leaf_certificate=leaf.public_bytes(serialization.Encoding.DER),
            valid_until=int(leaf.not_valid_after_utc.timestamp()),
        )

    def requests_for(self, ident: SpiffeId) -> list[Seen]:
        return [s for s in self.seen if s.identity == str(ident)]


@contextlib.asynccontextmanager
async def identity_service(service: FakeIdentityService, port: int = 0) -> AsyncIterator[FakeIdentityService]:
    """Serves `service` over TLS on 127.0.0.1 with a certificate from the test CA naming 127.0.0.1."""
    key, chain = serving_cert(service.ca)
    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServicer_to_server(service, server)
    service.port = server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, chain)]))
    await server.start()
    try:
        yield service
    finally:
        await server.stop(0)


def identity_env(service_port: int, token_file: Path, ident: SpiffeId) -> dict[str, str]:
    return {
        "KUBERPC_IDENTITY_ADDR": f"127.0.0.1:{service_port}",
        "KUBERPC_IDENTITY_TOKEN": str(token_file),
        "KUBERPC_TRUST_DOMAIN": ident.trust_domain,
        "POD_NAMESPACE": ident.namespace,
        "SERVICE_ACCOUNT": ident.service_account,
    }


def output_workload(ca: CA, directory: Path, ident: SpiffeId) -> Workload:
    """Where a proxy writes what it is issued (files that do not exist yet) and the anchors it trusts."""
    directory.mkdir(parents=True, exist_ok=True)
    return Workload(str(directory / "cert.pem"), str(directory / "key.pem"), str(ca.path), str(ident))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_bytes(TOKEN)
    return path


async def presented_serial(port: int, client: Workload) -> int:
    """The serial of the certificate a fresh TLS handshake with 127.0.0.1:`port` is shown."""
    ctx = identity.client_context(client.cert, client.key, client.ca)
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 10)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def issue_files(ca: CA, directory: Path, ident: SpiffeId) -> Workload:
    directory.mkdir(parents=True, exist_ok=True)
    issued = pki.issue_workload(pki.KeyPair(ca.cert_pem, ca.key_pem), identity=ident)
    key, chain = issued.key_pem, issued.cert_pem
    (directory / "key.pem").write_bytes(key)
    (directory / "cert.pem").write_bytes(chain)
    return Workload(str(directory / "cert.pem"), str(directory / "key.pem"), str(ca.path), str(ident))


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def exists(path: str) -> bool:
    return os.path.exists(path)


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def expiry_metric(p: RunningProxy) -> float | None:
    return p.proxy.registry.get_sample_value("kuberpc_cert_expiry_timestamp_seconds")


# ---- the CSR and the answer to it (pure) --------------------------------------------------------------


def test_csr_asks_for_the_spiffe_id_with_a_fresh_p256_key() -> None:
    request = identity.create_csr(SERVER_ID)
    csr = x509.load_der_x509_csr(request.csr_der)
    assert csr.is_signature_valid
    public_key = csr.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name == "secp256r1"
    key = serialization.load_pem_private_key(request.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.public_key() == public_key
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(SERVER_ID)]
    assert identity.create_csr(SERVER_ID).key_pem != request.key_pem
    assert b"PRIVATE" not in repr(request).encode()


def test_an_issued_certificate_for_our_key_and_identity_is_accepted_as_a_pem_chain(ca: CA) -> None:
    request = identity.create_csr(SERVER_ID)
    public_key = x509.load_der_x509_csr(request.csr_der).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.sign(public_key, str(SERVER_ID), not_before=now, lifetime=DAY)
    intermediate = x509.load_pem_x509_certificate(ca.cert_pem)
    cert = identity.accept_issued(
        request, leaf.public_bytes(serialization.Encoding.DER), [intermediate.public_bytes(serialization.Encoding.DER)]
    )
    assert x509.load_pem_x509_certificates(cert.chain_pem) == [leaf, intermediate]
    assert cert.serial == leaf.serial_number
    assert cert.not_after == leaf.not_valid_after_utc.timestamp()
    assert cert.not_before == (now - BACKDATE).replace(microsecond=0).timestamp()


def _refusal(ca: CA, *, other_key: bool = False, uri: str = str(SERVER_ID), lifetime: float = DAY,
             issued_at: datetime.datetime | None = None) -> str:
    request = identity.create_csr(SERVER_ID)
    public_key = x509.load_der_x509_csr(request.csr_der).public_key()
    if other_key:
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    at = issued_at or datetime.datetime.now(datetime.UTC)
    leaf = ca.sign(public_key, uri, not_before=at, lifetime=lifetime)
    with pytest.raises(IdentityError) as e:
        identity.accept_issued(request, leaf.public_bytes(serialization.Encoding.DER))
    return str(e.value)


def test_an_issued_certificate_for_another_key_is_refused(ca: CA) -> None:
    assert "public key" in _refusal(ca, other_key=True)


def test_an_issued_certificate_for_another_identity_is_refused(ca: CA) -> None:
    assert "spiffe://cluster.local/ns/default/sa/admin" in _refusal(ca, uri="spiffe://cluster.local/ns/default/sa/admin")


def test_an_issued_certificate_that_already_expired_is_refused(ca: CA) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    assert "expired" in _refusal(ca, issued_at=past, lifetime=3600)


def test_an_issued_answer_that_is_not_der_is_refused() -> None:
    with pytest.raises(IdentityError, match="not a DER certificate"):
        identity.accept_issued(identity.create_csr(SERVER_ID), b"-----BEGIN CERTIFICATE-----")


def _cert(not_before: float, not_after: float) -> identity.WorkloadCertificate:
    return identity.WorkloadCertificate(b"", 1, not_before, not_after)


def test_renewal_is_due_at_two_thirds_of_the_life() -> None:
    assert identity.renewal_time(_cert(1000.0, 1000.0 + DAY), received_at=1000.0) == 1000.0 + 16 * 3600


def test_a_backdated_not_before_does_not_bring_renewal_forward() -> None:
    # Issued at 1060 with notBefore 1000 (a minute of skew allowance) and 3 s to live: due at 1062, not at once.
    assert identity.renewal_time(_cert(1000.0, 1063.0), received_at=1060.0) == pytest.approx(1062.0)


def test_a_certificate_arriving_late_in_its_life_is_renewed_before_it_expires() -> None:
    assert identity.renewal_time(_cert(0.0, 100.0), received_at=99.0) == pytest.approx(99.0 + 2 / 3)
    assert identity.renewal_time(_cert(0.0, 100.0), received_at=150.0) == 100.0


@given(failures=st.integers(min_value=1, max_value=10_000), seed=st.integers(0, 2**32))
def test_retry_delay_doubles_with_each_failure_up_to_the_cap_half_fixed_half_jitter(failures: int, seed: int) -> None:
    ceiling = min(RETRY_CAP, RETRY_BASE * 2 ** min(failures - 1, 64))
    delay = retry_delay(failures, random.Random(seed))
    assert ceiling / 2 <= delay <= ceiling


def test_retry_delays_are_jittered() -> None:
    rng = random.Random(7)
    assert len({round(retry_delay(5, rng), 6) for _ in range(20)}) > 10


# ---- configuration ----------------------------------------------------------------------------------------

BASE_ENV = {
    "KUBERPC_INBOUND_ADDR": "off",
    "KUBERPC_DISCOVERY": "file:/endpoints.yaml",
    "KUBERPC_TLS_CERT": "/var/run/kuberpc/identity/cert.pem",
    "KUBERPC_TLS_KEY": "/var/run/kuberpc/identity/key.pem",
    "KUBERPC_TRUST_ANCHORS": "/var/run/kuberpc/trust-anchors/ca.pem",
}


def test_config_with_an_identity_service_names_address_and_token_file() -> None:
    cfg = config_mod.load(
        {
            **BASE_ENV,
            "KUBERPC_IDENTITY_ADDR": "kuberpc-webhook.kuberpc-system.svc:8081",
            "KUBERPC_IDENTITY_TOKEN": "/var/run/secrets/kuberpc.io/tokens/kuberpc-identity",
            "POD_NAMESPACE": "shop",
            "SERVICE_ACCOUNT": "frontend",
        }
    )
    assert cfg.identity_service == IdentityService(
        Address("kuberpc-webhook.kuberpc-system.svc", 8081), "/var/run/secrets/kuberpc.io/tokens/kuberpc-identity"
    )
    assert (cfg.namespace, cfg.service_account) == ("shop", "frontend")


def test_config_without_an_identity_service_reads_certificate_files() -> None:
    assert config_mod.load(BASE_ENV).identity_service is None


def test_identity_service_without_token_service_account_or_namespace_is_refused_naming_each() -> None:
    with pytest.raises(ConfigError) as e:
        config_mod.load({**BASE_ENV, "KUBERPC_IDENTITY_ADDR": "kuberpc-webhook.kuberpc-system.svc:8081"})
    (problem,) = [p for p in e.value.problems if "KUBERPC_IDENTITY_ADDR" in p]
    for name in ("KUBERPC_IDENTITY_TOKEN", "SERVICE_ACCOUNT", "POD_NAMESPACE"):
        assert name in problem


@pytest.mark.parametrize(
    "address", ["kuberpc-webhook", ":8081", "kuberpc-webhook:0", "kuberpc-webhook:70000", "bad_host!:8081"]
)
def test_a_bad_identity_service_address_is_a_config_problem(address: str) -> None:
    env = {**BASE_ENV, "KUBERPC_IDENTITY_ADDR": address, "KUBERPC_IDENTITY_TOKEN": "/t", "POD_NAMESPACE": "a",
           "SERVICE_ACCOUNT": "b"}  # fmt: skip
    with pytest.raises(ConfigError) as e:
        config_mod.load(env)
    assert any(p.startswith("KUBERPC_IDENTITY_ADDR:") and address in p for p in e.value.problems)


def test_a_service_account_that_cannot_be_in_an_identity_is_a_config_problem() -> None:
    env = {**BASE_ENV, "KUBERPC_IDENTITY_ADDR": "h:1", "KUBERPC_IDENTITY_TOKEN": "/t", "POD_NAMESPACE": "a",
           "SERVICE_ACCOUNT": "Not/Valid"}  # fmt: skip
    with pytest.raises(ConfigError, match="SERVICE_ACCOUNT: 'Not/Valid'"):
        config_mod.load(env)


# ---- renewal, in fake time (no gRPC: a certifier function signs directly) -------------------------------


@dataclass
class FakeCertifier:
    ca: CA
    clock: Callable[[], float]
    lifetime: float = DAY
    failures: list[CertifyError] = field(default_factory=list)
    sign_as: SpiffeId | None = None  # a misbehaving issuer naming someone else
    calls: list[tuple[float, bytes]] = field(default_factory=list)  # (clock, token)
    called: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, ident: SpiffeId, token: bytes, csr_der: bytes) -> Issued:
        self.calls.append((self.clock(), token))
        self.called.set()
        if self.failures:
            raise self.failures.pop(0)
        public_key = x509.load_der_x509_csr(csr_der).public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        at = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        leaf = self.ca.sign(public_key, str(self.sign_as or ident), not_before=at, lifetime=self.lifetime)
        return Issued(leaf.public_bytes(serialization.Encoding.DER))

    async def until_calls(self, n: int) -> None:
        while len(self.calls) < n:
            self.called.clear()
            await self.called.wait()


@dataclass
class Rig:
    ident: IssuedIdentity
    certifier: FakeCertifier
    expiries: list[float]
    out: Workload
    token_file: Path


@pytest.fixture
def rig(ca: CA, tmp_path: Path, token_file: Path) -> Rig:
    start = time.time()

    def clock() -> float:  # wall time that moves with the (fake) loop time
        return start + asyncio.get_running_loop().time()

    certifier = FakeCertifier(ca, clock)
    out = output_workload(ca, tmp_path / "out", SERVER_ID)
    context = identity.server_context(None, None, str(ca.path))
    expiries: list[float] = []
    ident = IssuedIdentity(
        identity=SERVER_ID,
        files=config_mod.TLSFiles(out.cert, out.key, out.ca),
        token_file=str(token_file),
        certify=certifier,
        contexts=[context],
        on_certificate=lambda c: expiries.append(c.not_after),
        clock=clock,
        rng=random.Random(1),
    )
    return Rig(ident, certifier, expiries, out, token_file)


@pytest.mark.looptime
async def test_renewal_comes_at_two_thirds_of_the_certificate_life(rig: Rig) -> None:
    loop = asyncio.get_running_loop()
    assert await rig.ident.obtain(asyncio.Event())
    issued_at = loop.time()
    renewals = asyncio.create_task(rig.ident.run())
    try:
        await rig.certifier.until_calls(2)
        assert loop.time() - issued_at == pytest.approx(16 * 3600, abs=1)
        await wait_for(lambda: len(rig.expiries) == 2, "the renewed certificate to be loaded")
        await rig.certifier.until_calls(3)
        assert loop.time() - issued_at == pytest.approx(32 * 3600, abs=2)
    finally:
        renewals.cancel()
        await asyncio.gather(renewals, return_exceptions=True)


@pytest.mark.looptime
async def test_each_request_reads_the_token_file_afresh(rig: Rig) -> None:
    assert await rig.ident.obtain(asyncio.Event())
    rig.token_file.write_bytes(b"rotated-by-the-kubelet")
    renewals = asyncio.create_task(rig.ident.run())
    try:
        await rig.certifier.until_calls(2)
    finally:
        renewals.cancel()
        await asyncio.gather(renewals, return_exceptions=True)
    assert [token for _, token in rig.certifier.calls] == [TOKEN, b"rotated-by-the-kubelet"]


@pytest.mark.looptime
async def test_a_failing_renewal_keeps_the_current_certificate_and_retries_with_backoff(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.workload_cert")
    assert await rig.ident.obtain(asyncio.Event())
    first = rig.ident.current
    assert first is not None
    first_chain = read(rig.out.cert)
    refusal = CertifyError("UNAVAILABLE", "TokenReview unreachable")
    rig.certifier.failures = [refusal] * 5
    renewals = asyncio.create_task(rig.ident.run())
    try:
        await rig.certifier.until_calls(6)  # the first renewal attempt and 4 retries fail, all within the old life
        assert rig.ident.current is first
        assert read(rig.out.cert) == first_chain
        await rig.certifier.until_calls(7)
        await wait_for(lambda: rig.ident.current is not first, "the renewed certificate")
    finally:
        renewals.cancel()
        await asyncio.gather(renewals, return_exceptions=True)
    times = [t for t, _ in rig.certifier.calls[1:]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert [RETRY_BASE * 2**i / 2 <= gap <= RETRY_BASE * 2**i for i, gap in enumerate(gaps)] == [True] * 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "code=UNAVAILABLE" in warnings[0] and "TokenReview unreachable" in warnings[0]
    assert "has_certificate=True" in warnings[0]
    rotated = [r.getMessage() for r in caplog.records if "certificate rotated" in r.getMessage()]
    assert len(rotated) == 1 and "failed_attempts=5" in rotated[0]


@pytest.mark.looptime
async def test_obtaining_gives_up_when_the_proxy_is_stopped(rig: Rig) -> None:
    rig.certifier.failures = [CertifyError("UNAVAILABLE", "down")] * 1000
    stop = asyncio.Event()
    obtaining = asyncio.create_task(rig.ident.obtain(stop))
    await rig.certifier.until_calls(3)
    stop.set()
    assert await obtaining is False
    assert rig.ident.current is None and not exists(rig.out.key)


@pytest.mark.looptime
async def test_an_answer_for_another_identity_is_not_loaded_and_is_retried(rig: Rig) -> None:
    rig.certifier.sign_as = SpiffeId(TRUST_DOMAIN, "default", "admin")
    obtaining = asyncio.create_task(rig.ident.obtain(asyncio.Event()))
    await rig.certifier.until_calls(3)
    assert rig.ident.current is None and rig.ident.failures >= 2
    assert "BAD_CERTIFICATE" in str(rig.ident.debug()["last_failure"])
    obtaining.cancel()
    await asyncio.gather(obtaining, return_exceptions=True)


# ---- the Certify call: the proxy's own HTTP/2 client against grpcio and a strict scripted server ----------

CERTIFY_PATH = b"/kuberpc.identity.v1.Identity/Certify"


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


@dataclass
class ScriptedCall:
    """What the scripted server saw on one connection."""

    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    received: int = 0  # bytes read after the TLS handshake
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # the request's END_STREAM
    reset: int | None = None  # RST_STREAM code sent by the client
    goaway: bool = False
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # the client's connection ended
    error: str | None = None  # what `h2` found wrong in what the client sent

    def request(self) -> identity_pb2.CertifyRequest:
        assert self.body[:1] == b"\x00" and struct.unpack(">I", self.body[1:5])[0] == len(self.body) - 5
        return identity_pb2.CertifyRequest.FromString(self.body[5:])


# Queues the response to a request on the server's connection; True: close the connection right after.
Answer = Callable[[h2.connection.H2Connection, int, ScriptedCall], bool]


@dataclass
class Scripted:
    port: int
    calls: list[ScriptedCall]


@contextlib.asynccontextmanager
async def scripted_service(
    ca: CA, tmp_path: Path, answer: Answer, *, cert: tuple[bytes, bytes] | None = None, alpn: tuple[str, ...] = ("h2",)
) -> AsyncIterator[Scripted]:
    """A TLS server on 127.0.0.1 speaking HTTP/2 through `h2` (which raises on anything the client gets wrong)
    and answering each request as `answer` says; by default with a certificate from `ca` for 127.0.0.1."""
    key_pem, chain_pem = cert or serving_cert(ca)
    (tmp_path / "server.key").write_bytes(key_pem)
    (tmp_path / "server.pem").write_bytes(chain_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    calls: list[ScriptedCall] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        call = ScriptedCall()
        calls.append(call)
        writers.append(writer)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        writer.write(conn.data_to_send())  # before the client has said anything: it must keep these bytes
        try:
            while data := await reader.read(65536):
                call.received += len(data)
                close = False
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        call.headers = dict(ev.headers)
                    elif isinstance(ev, h2.events.DataReceived):
                        call.body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        call.ended.set()
                        close = answer(conn, ev.stream_id, call)
                    elif isinstance(ev, h2.events.StreamReset):
                        call.reset = ev.error_code
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        call.goaway = True
                writer.write(conn.data_to_send())
                if close:
                    await writer.drain()
                    break
        except h2.exceptions.ProtocolError as e:
            call.error = repr(e)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            call.closed.set()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield Scripted(server.sockets[0].getsockname()[1], calls)
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()  # connections the test left open end now, not with the event loop
        await asyncio.wait_for(asyncio.gather(*(c.closed.wait() for c in calls)), 5)
    assert [c.error for c in calls if c.error] == []


def answer_with(response: identity_pb2.CertifyResponse) -> Answer:
    def answer(conn: h2.connection.H2Connection, sid: int, call: ScriptedCall) -> bool:
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(sid, grpc_message(response.SerializeToString()))
        conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        return False

    return answer


def answer_status(status: int, message: bytes, *, trailers_only: bool) -> Answer:
    def answer(conn: h2.connection.H2Connection, sid: int, call: ScriptedCall) -> bool:
        head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        tail = [(b"grpc-status", b"%d" % status), (b"grpc-message", message)]
        if trailers_only:
            conn.send_headers(sid, head + tail, end_stream=True)
        else:
            conn.send_headers(sid, head)
            conn.send_headers(sid, tail, end_stream=True)
        return False

    return answer


def never_answer(conn: h2.connection.H2Connection, sid: int, call: ScriptedCall) -> bool:
    return False


def certifier(port: int, ca: CA, *, timeout: float = 10.0) -> GrpcCertifier:
    return GrpcCertifier(Address("127.0.0.1", port), str(ca.path), timeout=timeout)


async def certify(c: GrpcCertifier) -> tuple[identity.CertificateRequest, Issued]:
    request = identity.create_csr(CLIENT_ID)
    return request, await c(CLIENT_ID, TOKEN, request.csr_der)


async def refusal(c: GrpcCertifier) -> CertifyError:
    with pytest.raises(CertifyError) as e:
        await certify(c)
    return e.value


async def until_set(event: asyncio.Event, what: str) -> None:
    try:
        await asyncio.wait_for(event.wait(), 5)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_certify_sends_one_grpc_message_with_grpc_headers_and_returns_the_chain_then_closes_the_connection(
    ca: CA, tmp_path: Path
) -> None:
    leaf, intermediate = b"leaf certificate, DER", x509.load_pem_x509_certificate(ca.cert_pem)
    response = identity_pb2.CertifyResponse(
        leaf_certificate=leaf,
        intermediate_certificates=[intermediate.public_bytes(serialization.Encoding.DER)],
        valid_until=1,
    )
    async with scripted_service(ca, tmp_path, answer_with(response)) as server:
        request, issued = await certify(certifier(server.port, ca))
        (call,) = server.calls
        await until_set(call.closed, "the client to close the connection")
    assert issued == Issued(leaf, (intermediate.public_bytes(serialization.Encoding.DER),))
    headers = call.headers
    assert {k: headers[k] for k in (b":method", b":scheme", b":path", b":authority", b"content-type", b"te")} == {
        b":method": b"POST",
        b":scheme": b"https",
        b":path": CERTIFY_PATH,
        b":authority": f"127.0.0.1:{server.port}".encode(),
        b"content-type": b"application/grpc",
        b"te": b"trailers",
    }
    timeout = headers[b"grpc-timeout"]
    assert timeout.endswith(b"m") and 9_000 < int(timeout[:-1]) <= 10_000
    sent = call.request()
    assert (sent.identity, sent.token, sent.certificate_signing_request) == (str(CLIENT_ID), TOKEN, request.csr_der)
    assert call.goaway and call.reset is None


async def test_certify_with_a_grpcio_server_returns_a_certificate_for_the_csr_key(ca: CA) -> None:
    async with identity_service(FakeIdentityService(ca)) as service:
        request, issued = await certify(certifier(service.port, ca))
    (seen,) = service.seen
    assert (seen.identity, seen.token) == (str(CLIENT_ID), TOKEN)
    leaf = x509.load_der_x509_certificate(issued.leaf_der)
    assert leaf.public_key() == x509.load_der_x509_csr(request.csr_der).public_key()
    assert identity.accept_issued(request, issued.leaf_der, issued.intermediates_der).serial == leaf.serial_number


async def test_an_error_status_from_a_grpcio_server_keeps_its_code_and_its_message_percent_decoded(ca: CA) -> None:
    message = "CSR refusée: 100% invalide\n(identité inconnue)"
    service = FakeIdentityService(ca, refusals=[(grpc.StatusCode.INVALID_ARGUMENT, message)])
    async with identity_service(service):
        error = await refusal(certifier(service.port, ca))
    assert (error.code, error.message) == ("INVALID_ARGUMENT", message)


@pytest.mark.parametrize("trailers_only", [False, True], ids=["headers-then-trailers", "trailers-only"])
async def test_an_error_status_is_raised_with_its_name_and_percent_decoded_message(
    ca: CA, tmp_path: Path, trailers_only: bool
) -> None:
    # A malformed escape (%zz) is kept as received: the gRPC spec forbids failing on it.
    answer = answer_status(16, b"token rejected: identit%C3%A9 %25 %zz", trailers_only=trailers_only)
    async with scripted_service(ca, tmp_path, answer) as server:
        error = await refusal(certifier(server.port, ca))
    assert (error.code, error.message) == ("UNAUTHENTICATED", "token rejected: identité % %zz")


@pytest.mark.parametrize(("http_status", "code"), [(b"503", "UNAVAILABLE"), (b"404", "UNIMPLEMENTED"), (b"500", "UNKNOWN")])
async def test_an_http_error_without_grpc_status_maps_to_the_grpc_code(
    ca: CA, tmp_path: Path, http_status: bytes, code: str
) -> None:
    def answer(conn: h2.connection.H2Connection, sid: int, call: ScriptedCall) -> bool:
        conn.send_headers(sid, [(b":status", http_status), (b"content-type", b"text/plain")], end_stream=True)
        return False

    async with scripted_service(ca, tmp_path, answer) as server:
        error = await refusal(certifier(server.port, ca))
    assert error.code == code and http_status.decode() in error.message


async def test_a_server_that_never_answers_is_given_up_at_the_deadline_and_the_call_cancelled(
    ca: CA, tmp_path: Path
) -> None:
    async with scripted_service(ca, tmp_path, never_answer) as server:
        started = time.monotonic()
        error = await refusal(certifier(server.port, ca, timeout=0.3))
        elapsed = time.monotonic() - started
        (call,) = server.calls
        await until_set(call.closed, "the client to close the connection")
    assert error.code == "DEADLINE_EXCEEDED"
    assert 0.3 <= elapsed < 2.0
    timeout = call.headers[b"grpc-timeout"]  # what was left of the 300 ms once connected
    assert timeout.endswith(b"m") and 0 < int(timeout[:-1]) <= 300
    assert call.reset == h2.errors.ErrorCodes.CANCEL and call.goaway


async def test_a_server_that_stalls_the_tls_handshake_is_given_up_at_the_deadline(ca: CA) -> None:
    hung_up = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the ClientHello, then nothing until the client hangs up
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    async with server:
        error = await refusal(certifier(server.sockets[0].getsockname()[1], ca, timeout=0.3))
        await until_set(hung_up, "the client to hang up")
    assert error.code == "DEADLINE_EXCEEDED"


async def test_cancelling_the_caller_resets_the_call_and_closes_the_connection(ca: CA, tmp_path: Path) -> None:
    async with scripted_service(ca, tmp_path, never_answer) as server:
        task = asyncio.create_task(certify(certifier(server.port, ca)))
        await wait_for(lambda: len(server.calls) == 1, "the connection")
        (call,) = server.calls
        await until_set(call.ended, "the request")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_set(call.closed, "the client to close the connection")
    assert call.reset == h2.errors.ErrorCodes.CANCEL and call.goaway


async def test_a_server_closing_the_connection_mid_call_is_unavailable(ca: CA, tmp_path: Path) -> None:
    def hang_up(conn: h2.connection.H2Connection, sid: int, call: ScriptedCall) -> bool:
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        conn.send_data(sid, grpc_message(b"part of"))  # and neither the rest nor trailers
        return True

    async with scripted_service(ca, tmp_path, hang_up) as server:
        error = await refusal(certifier(server.port, ca))
    assert error.code == "UNAVAILABLE" and "lost" in error.message


async def test_a_response_over_the_size_limit_is_refused(ca: CA, tmp_path: Path) -> None:
    response = identity_pb2.CertifyResponse(leaf_certificate=b"x" * 4096)
    async with scripted_service(ca, tmp_path, answer_with(response)) as server:
        with pytest.raises(grpc_client.CallError) as e:
            await grpc_client.unary_call(
                Address("127.0.0.1", server.port), CERTIFY_PATH.decode(), b"", timeout=5,
                ssl_context=grpc_client.tls_context(ca.cert_pem), max_response=1024,
            )  # fmt: skip
    assert e.value.code == "RESOURCE_EXHAUSTED"


async def test_a_server_certificate_not_from_the_trust_anchors_is_refused_before_any_request(
    ca: CA, tmp_path: Path
) -> None:
    other = pki.create_ca(trust_domain=TRUST_DOMAIN)
    other_key, other_cert = other.key_pem, other.cert_pem
    impostor = serving_cert(CA(other_key, other_cert, tmp_path / "unused.pem"))
    async with scripted_service(ca, tmp_path, never_answer, cert=impostor) as server:
        error = await refusal(certifier(server.port, ca))
    assert error.code == "UNAVAILABLE" and "untrusted certificate" in error.message
    assert server.calls == []  # the handshake failed: no HTTP/2 connection, no token sent


async def test_a_server_certificate_for_another_name_is_refused_before_any_request(ca: CA, tmp_path: Path) -> None:
    other_name = serving_cert(ca, x509.DNSName("kuberpc-webhook.kuberpc-system.svc"))
    async with scripted_service(ca, tmp_path, never_answer, cert=other_name) as server:
        error = await refusal(certifier(server.port, ca))
    assert error.code == "UNAVAILABLE" and "mismatch" in error.message
    assert server.calls == []


@pytest.mark.parametrize("alpn", [("http/1.1",), ()], ids=["http1.1", "no-alpn"])
async def test_a_server_that_does_not_negotiate_h2_is_refused_before_anything_is_sent(
    ca: CA, tmp_path: Path, alpn: tuple[str, ...]
) -> None:
    async with scripted_service(ca, tmp_path, never_answer, alpn=alpn) as server:
        error = await refusal(certifier(server.port, ca))
        await wait_for(lambda: len(server.calls) == 1, "the connection")
        await until_set(server.calls[0].closed, "the client to hang up")
    assert error.code == "UNAVAILABLE" and "ALPN" in error.message
    assert server.calls[0].received == 0  # not even the HTTP/2 preface


def test_certify_works_on_uvloop_the_proxy_s_event_loop(ca: CA, tmp_path: Path) -> None:
    uvloop = pytest.importorskip("uvloop")
    response = identity_pb2.CertifyResponse(leaf_certificate=b"leaf")

    async def main() -> tuple[Issued, ScriptedCall]:
        async with scripted_service(ca, tmp_path, answer_with(response)) as server:
            _, issued = await certify(certifier(server.port, ca))
            await until_set(server.calls[0].closed, "the client to close the connection")
        return issued, server.calls[0]

    issued, call = uvloop.run(main())
    assert issued == Issued(b"leaf") and call.request().token == TOKEN and call.goaway


async def test_nothing_listening_is_unavailable(ca: CA) -> None:
    error = await refusal(certifier(free_port(), ca))
    assert error.code == "UNAVAILABLE" and "cannot connect" in error.message


async def test_unreadable_trust_anchors_are_reported_as_such(tmp_path: Path) -> None:
    error = await refusal(GrpcCertifier(Address("127.0.0.1", 1), str(tmp_path / "missing.pem")))
    assert error.code == "TRUST_ANCHORS" and "missing.pem" in error.message


# ---- real proxies and the fake identity service over gRPC/TLS ----------------------------------------


async def bidi_echo(call: grpc.aio.StreamStreamCall, payload: bytes) -> bytes:
    await call.write(payload)
    reply = await call.read()
    assert isinstance(reply, bytes)
    return reply


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[*GRPC_OPTIONS, ("grpc.default_authority", "echo.default:50051")])


@contextlib.asynccontextmanager
async def identity_pair(
    ca: CA, service: FakeIdentityService, backend: Backend, tmp_path: Path, token_file: Path, mesh_certs: MeshCerts
) -> AsyncIterator[Pair]:
    """Both proxies of run_pair(), each with its certificate from `service` instead of files."""
    env = {ident: identity_env(service.port, token_file, ident) for ident in (SERVER_ID, CLIENT_ID)}
    async with run_pair(
        mesh_certs,  # unused: both workloads are given
        backend.port,
        tmp_path,
        server_workload=output_workload(ca, tmp_path / "server", SERVER_ID),
        client_workload=output_workload(ca, tmp_path / "client", CLIENT_ID),
        server_env=env[SERVER_ID],
        client_env=env[CLIENT_ID],
    ) as pair:
        yield pair


async def test_a_proxy_gets_its_certificate_from_the_identity_service_and_serves_mtls_with_it(
    ca: CA, backend: Backend, mesh_certs: MeshCerts, tmp_path: Path, token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with (
        identity_service(FakeIdentityService(ca)) as service,
        identity_pair(ca, service, backend, tmp_path, token_file, mesh_certs) as pair,
        channel(pair.target) as ch,
    ):
        assert await ch.unary_unary("/test.Echo/Unary")(b"over mTLS", timeout=10) == b"over mTLS"
        for ident, side in ((SERVER_ID, pair.server_side), (CLIENT_ID, pair.client_side)):
            (request,) = service.requests_for(ident)
            assert request.token == TOKEN
            assert request.csr.is_signature_valid
            csr_key = request.csr.public_key()
            assert isinstance(csr_key, ec.EllipticCurvePublicKey) and csr_key.curve.name == "secp256r1"
            current = side.proxy.workload.current if side.proxy.workload else None
            assert current is not None and expiry_metric(side) == current.not_after
        server_out = output_workload(ca, tmp_path / "server", SERVER_ID)
        assert stat.S_IMODE(os.stat(server_out.key).st_mode) == 0o600
        leaf = x509.load_pem_x509_certificates(read(server_out.cert))[0]
        assert leaf.public_key() == service.requests_for(SERVER_ID)[0].csr.public_key()
        probe = issue_files(ca, tmp_path / "probe", CLIENT_ID)
        assert await presented_serial(pair.server_side.inbound_port, probe) == leaf.serial_number
        key_body = read(server_out.key).decode().splitlines()[1]
    logged = caplog.text
    assert "certificate issued identity=spiffe://cluster.local/ns/default/sa/arith" in logged
    assert TOKEN.decode() not in logged and key_body not in logged and "PRIVATE KEY" not in logged


async def test_calls_opened_before_a_rotation_finish_untouched_and_new_handshakes_present_the_new_certificate(
    ca: CA, backend: Backend, mesh_certs: MeshCerts, tmp_path: Path, token_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.workload_cert")
    lifetime = 3.0
    probe = issue_files(ca, tmp_path / "probe", CLIENT_ID)
    async with (
        identity_service(FakeIdentityService(ca, lifetime=lifetime)) as service,
        identity_pair(ca, service, backend, tmp_path, token_file, mesh_certs) as pair,
        channel(pair.target) as ch,
    ):
        server = pair.server_side.proxy.workload
        assert server is not None and server.current is not None
        first = server.current
        assert await presented_serial(pair.server_side.inbound_port, probe) == first.serial
        stream = ch.stream_stream("/test.Echo/Bidi")(timeout=30)
        assert await bidi_echo(stream, b"before") == b"before"

        await wait_for(lambda: server.current is not first, "the server side's certificate to rotate", timeout=lifetime * 2)
        renewed = server.current
        assert renewed is not None and renewed.not_after > first.not_after
        assert await presented_serial(pair.server_side.inbound_port, probe) == renewed.serial
        assert expiry_metric(pair.server_side) == renewed.not_after
        # Renewed at 2/3 of its life (counted from its arrival, to its notAfter, which X.509 keeps to the
        # second): not sooner, and before it ran out.
        first_request, second_request = service.requests_for(SERVER_ID)[:2]
        assert second_request.at >= first_request.at + (first.not_after - first_request.at) * 2 / 3 - 0.01
        assert second_request.at < first.not_after

        # The stream opened before the rotation carries on past the old certificate's expiry.
        await wait_for(lambda: time.time() > first.not_after, "the first certificate to expire", timeout=lifetime * 2)
        assert await bidi_echo(stream, b"after") == b"after"
        await stream.done_writing()
        assert await stream.code() == grpc.StatusCode.OK
        # And calls keep flowing (a pooled connection or a new one, with the client's renewed certificate).
        assert await ch.unary_unary("/test.Echo/Unary")(b"again", timeout=10) == b"again"
    rotations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("certificate rotated")]
    assert any("sa/arith" in line for line in rotations) and any("sa/client" in line for line in rotations)


async def test_a_refusal_is_retried_with_backoff_and_logged_once_with_its_message(
    ca: CA, tmp_path: Path, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # A careless server echoing the token: it must not reach our log either.
    message = f"identity {CLIENT_ID} is not the token's (token {TOKEN.decode()} is for default/other)"
    service = FakeIdentityService(ca, refusals=[(grpc.StatusCode.PERMISSION_DENIED, message)] * 3)
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    async with (
        identity_service(service),
        run_proxy(
            output_workload(ca, tmp_path / "out", CLIENT_ID), disc, **identity_env(service.port, token_file, CLIENT_ID)
        ) as p,
    ):
        assert p.proxy.ready
        times = [s.at for s in service.seen]
        assert len(times) == 4
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert [gap >= RETRY_BASE * 2**i / 2 for i, gap in enumerate(gaps)] == [True] * 3
    failures = [r for r in caplog.records if "certificate request failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.WARNING
    assert "code=PERMISSION_DENIED" in failures[0].getMessage()
    assert f"identity {CLIENT_ID} is not the token's (token <token> is for default/other)" in failures[0].getMessage()
    assert TOKEN.decode() not in caplog.text


# ---- the proxy process: not ready while the identity service is down ----------------------------------


def start_proxy_process(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "sidecar", "run"], cwd=REPO, env=env, stderr=log_file)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


async def test_the_proxy_is_not_ready_and_refuses_callers_until_the_identity_service_answers(
    ca: CA, tmp_path: Path, token_file: Path
) -> None:
    admin, outbound, service_port = free_port(), free_port(), free_port()
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    out = output_workload(ca, tmp_path / "out", CLIENT_ID)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "KUBERPC_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
        "KUBERPC_OUTBOUND_ADDR": f"127.0.0.1:{outbound}",
        "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_DISCOVERY": f"file:{disc}",
        "KUBERPC_TLS_CERT": out.cert,
        "KUBERPC_TLS_KEY": out.key,
        "KUBERPC_TRUST_ANCHORS": out.ca,
        "KUBERPC_DRAIN_SECONDS": "1",
        **identity_env(service_port, token_file, CLIENT_ID),
    }
    log_path = tmp_path / "proxy.log"
    proc = start_proxy_process(env, log_path)
    try:
        await wait_for(lambda: "certificate request failed" in log_path.read_text(), "a failed request", timeout=20)
        assert "code=UNAVAILABLE" in log_path.read_text()
        assert await asyncio.to_thread(http_status, f"http://127.0.0.1:{admin}/live") == 200
        assert await asyncio.to_thread(http_status, f"http://127.0.0.1:{admin}/ready") == 503
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", outbound), timeout=2).close()

        async with identity_service(FakeIdentityService(ca), port=service_port) as service:
            waiter = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sidecar", "wait-ready", "--admin", f"127.0.0.1:{admin}", "--timeout", "20",
                cwd=REPO, env=env,
            )  # fmt: skip
            assert await asyncio.wait_for(waiter.wait(), 30) == 0
            assert [s.identity for s in service.seen] == [str(CLIENT_ID)]
        socket.create_connection(("127.0.0.1", outbound), timeout=2).close()
        assert proc.poll() is None, "the proxy kept running while the identity service was down"
    finally:
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0, log_path.read_text()[-3000:]
    assert "certificate issued identity=spiffe://cluster.local/ns/default/sa/client" in log_path.read_text()


def test_a_proxy_with_certificate_files_never_imports_grpc(ca: CA, tmp_path: Path) -> None:
    files = issue_files(ca, tmp_path / "files", CLIENT_ID)
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    script = f"""
import asyncio, sys
from sidecar import config
from sidecar.app import serve

async def main():
    cfg = config.load({{
        "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0", "KUBERPC_ADMIN_ADDR": "127.0.0.1:0", "KUBERPC_DEBUG_ADDR": "127.0.0.1:0", "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_DISCOVERY": "file:{disc}", "KUBERPC_TLS_CERT": {files.cert!r}, "KUBERPC_TLS_KEY": {files.key!r},
        "KUBERPC_TRUST_ANCHORS": {files.ca!r},
    }})
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    await asyncio.wait_for(started, 20)
    stop.set()
    await task
    print("grpc imported:", "grpc" in sys.modules)

asyncio.run(main())
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "grpc imported: False"


async def test_a_proxy_with_an_identity_service_never_imports_grpc(ca: CA, tmp_path: Path, token_file: Path) -> None:
    out = output_workload(ca, tmp_path / "out", CLIENT_ID)
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    async with identity_service(FakeIdentityService(ca)) as service:
        environ = {
            "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0", "KUBERPC_ADMIN_ADDR": "127.0.0.1:0", "KUBERPC_DEBUG_ADDR": "127.0.0.1:0", "KUBERPC_INBOUND_ADDR": "off",
            "KUBERPC_DISCOVERY": f"file:{disc}", "KUBERPC_TLS_CERT": out.cert, "KUBERPC_TLS_KEY": out.key,
            "KUBERPC_TRUST_ANCHORS": out.ca, **identity_env(service.port, token_file, CLIENT_ID),
        }  # fmt: skip
        script = f"""
import asyncio, sys
from sidecar import config
from sidecar.app import serve

async def main():
    cfg = config.load({environ!r})
    stop = asyncio.Event()
    started = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    proxy = await asyncio.wait_for(started, 20)
    print("certificate from the identity service:", proxy.workload.current is not None)
    stop.set()
    await task
    print("grpc imported:", sorted(m for m in sys.modules if m == "grpc" or m.startswith("grpc.")))

asyncio.run(main())
"""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()[-3000:]
        assert [s.identity for s in service.seen] == [str(CLIENT_ID)]
    assert stdout.decode().splitlines() == ["certificate from the identity service: True", "grpc imported: []"]


# ---- certificate files rotated by someone else ---------------------------------------------------------


async def test_certificate_files_replaced_on_disk_are_presented_in_new_handshakes(
    ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.workload_cert")
    files = issue_files(ca, tmp_path / "files", SERVER_ID)
    context = identity.server_context(None, None, files.ca)
    expiries: list[float] = []
    source = FileIdentity(
        files=config_mod.TLSFiles(files.cert, files.key, files.ca),
        contexts=[context],
        on_certificate=lambda c: expiries.append(c.not_after),
        poll_interval=0.02,
    )
    source.load()
    first = source.current
    assert first is not None and expiries == [first.not_after]
    watcher = asyncio.create_task(source.run())
    try:
        # A half-finished update (a key that does not match the certificate) is refused and the old pair kept.
        other_key = pki.issue_workload(pki.KeyPair(ca.cert_pem, ca.key_pem), identity=SERVER_ID).key_pem
        write(files.key, other_key)
        await wait_for(lambda: "certificate reload failed" in caplog.text, "the refused reload")
        assert source.current is first
        issue_files(ca, tmp_path / "files", SERVER_ID)  # the complete update
        await wait_for(lambda: source.current is not first, "the reload")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    renewed = source.current
    assert renewed is not None and renewed.serial != first.serial and len(expiries) == 2
    assert len([r for r in caplog.records if "certificate reload failed" in r.getMessage()]) == 1
    # The reloaded context presents the new certificate.
    async def close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=context)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await presented_serial(port, issue_files(ca, tmp_path / "client", CLIENT_ID)) == renewed.serial
