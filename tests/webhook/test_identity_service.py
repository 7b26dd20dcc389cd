"""The identity service end to end: a real grpc.aio client over TLS on loopback, TokenReview served by kmock."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import kmock
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from kubernetes import client
from prometheus_client import CollectorRegistry

from proto import identity_pb2, identity_pb2_grpc
from sidecar import pki
from sidecar.pki import KeyPair
from tests.ports import dead_port
from webhook.identity import (
    CertificateAuthority,
    CertifyError,
    InvalidRequest,
    PermissionDenied,
    TokenReview,
    Unauthenticated,
    Unavailable,
)
from webhook.identity_service import (
    RESULTS,
    IdentityMetrics,
    IdentityService,
    Limited,
    Limits,
    Refusal,
    ServingCertificate,
    identity_dns_names,
    peer_host,
    serving,
    status_of,
)
from webhook.kube import review_token

ROOT = Path(__file__).parents[2]
TD = "cluster.local"
SERVER_NAME = "kuberpc-webhook.kuberpc-system.svc"
NAMES = identity_dns_names("kuberpc-system")
TOKEN_REVIEWS = "post /apis/authentication.k8s.io/v1/tokenreviews"
# A plain HTTP mock: TokenReviews are answered by FakeTokenReviews, not stored as objects.
pytestmark = pytest.mark.kmock(cls=kmock.RawHandler)
SHOP = "spiffe://cluster.local/ns/shop/sa/cart"
# Tokens are opaque to the service: these stand in for projected ServiceAccount JWTs.
SHOP_TOKEN = "eyJhbGciOiJSUzI1NiJ9.shop-cart-token.c2lnbmF0dXJl"
ADMIN_TOKEN = "eyJhbGciOiJSUzI1NiJ9.shop-admin-token.c2lnbmF0dXJl"
OTHER_AUDIENCE_TOKEN = "eyJhbGciOiJSUzI1NiJ9.apiserver-audience-token.c2lnbmF0dXJl"
FORGED_TOKEN = "eyJhbGciOiJSUzI1NiJ9.forged.c2ln"


@dataclass
class FakeTokenReviews:
    """The TokenReview API's answers: token -> (username, audiences); any other token is rejected."""

    tokens: dict[str, tuple[str, list[str]]] = field(
        default_factory=lambda: {
            SHOP_TOKEN: ("system:serviceaccount:shop:cart", ["kuberpc-identity"]),
            ADMIN_TOKEN: ("system:serviceaccount:shop:admin", ["kuberpc-identity"]),
            OTHER_AUDIENCE_TOKEN: ("system:serviceaccount:shop:cart", ["https://kubernetes.default.svc"]),
        }
    )

    def __call__(self, request: kmock.Request) -> dict[str, Any]:
        spec = request.data["spec"]
        status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        if spec["token"] in self.tokens:
            user, audiences = self.tokens[spec["token"]]
            status = {"authenticated": True, "user": {"username": user}, "audiences": audiences}
        # The real API server echoes the spec, token included: the service must not log the answer either.
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}


def api_client(url: str) -> client.ApiClient:
    conf = client.Configuration()
    conf.host = url.rstrip("/")
    return client.ApiClient(conf)


def csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@dataclass
class Mesh:
    pair: KeyPair
    ca: CertificateAuthority
    cert_path: Path
    key_path: Path


@pytest.fixture
def mesh(tmp_path: Path) -> Mesh:
    # Made a day ago: every certificate, the service's own included, is issued within its CA's life, and one test
    # starts the service's clock 17 h in the past.
    created = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    pair = pki.create_ca(trust_domain=TD, common_name="kuberpc identity CA", now=created)
    cert, key = tmp_path / "ca.pem", tmp_path / "ca-key.pem"
    cert.write_bytes(pair.cert_pem)
    key.write_bytes(pair.key_pem)
    return Mesh(pair, CertificateAuthority.load(cert, key, trust_domain=TD), cert, key)


@dataclass
class Live:
    port: int
    registry: CollectorRegistry
    stub: Any
    clock: Clock
    certificate: ServingCertificate

    async def certify(self, token: str | bytes, *, identity: str = SHOP, request: bytes | None = None) -> Any:
        return await self.stub.Certify(certify_request(token, identity=identity, request=request), timeout=10)

    def count(self, result: str) -> float:
        value = self.registry.get_sample_value("kuberpc_identity_certificates_total", {"result": result})
        assert value is not None
        return value


def certify_request(token: str | bytes, *, identity: str = SHOP, request: bytes | None = None) -> Any:
    """A CertifyRequest; by default with a fresh P-256 key's CSR."""
    return identity_pb2.CertifyRequest(
        identity=identity,
        token=token.encode() if isinstance(token, str) else token,
        certificate_signing_request=csr(ec.generate_private_key(ec.SECP256R1())) if request is None else request,
    )


def channel(port: int, ca_pem: bytes, *, name: str = SERVER_NAME) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        grpc.ssl_channel_credentials(root_certificates=ca_pem),
        options=[("grpc.ssl_target_name_override", name)],
    )


@asynccontextmanager
async def running_service(
    mesh: Mesh, review: Callable[[str], Any], *, clock: Clock | None = None, limits: Limits | None = None
) -> AsyncIterator[Live]:
    registry = CollectorRegistry()
    clock = clock or Clock()
    metrics = IdentityMetrics(registry)
    service = IdentityService(mesh.ca, review=review, metrics=metrics, clock=clock, limits=limits or Limits())
    certificate = ServingCertificate(mesh.ca, NAMES, clock=clock)
    async with (
        serving(service, certificate, host="127.0.0.1", port=0, grace=5.0) as port,
        channel(port, mesh.pair.cert_pem) as ch,
    ):
        yield Live(port, registry, identity_pb2_grpc.IdentityStub(ch), clock, certificate)


@pytest.fixture
async def live(mesh: Mesh, kmock: kmock.RawHandler) -> AsyncIterator[Live]:
    """The service on 127.0.0.1 with the real TokenReview client, against kmock's fake API server."""
    kmock[TOKEN_REVIEWS] << FakeTokenReviews()
    with api_client(str(kmock.url)) as api:
        async with running_service(mesh, partial(review_token, api, audience="kuberpc-identity")) as service:
            yield service


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    code: grpc.StatusCode = e.value.code()
    return code


# --- Certify over TLS ------------------------------------------------------------------------------------


async def test_a_proxy_with_its_own_token_gets_a_24h_certificate_for_its_identity(live: Live, mesh: Mesh) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    answer = await live.certify(SHOP_TOKEN, request=csr(key))
    leaf = x509.load_der_x509_certificate(answer.leaf_certificate)
    now = dt.datetime.now(dt.UTC)
    verified = PolicyBuilder().store(Store([mesh.ca.cert])).time(now).build_client_verifier().verify(leaf, [])
    assert verified.subjects == [x509.UniformResourceIdentifier(SHOP)]
    assert leaf.public_key() == key.public_key()
    assert answer.valid_until == int(leaf.not_valid_after_utc.timestamp())
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=24, minutes=1)
    assert list(answer.intermediate_certificates) == []  # the mesh CA signs directly


async def test_the_token_review_asks_about_the_token_for_the_kuberpc_identity_audience(
    live: Live, kmock: kmock.RawHandler
) -> None:
    await live.certify(SHOP_TOKEN)
    reviews = kmock[TOKEN_REVIEWS]
    assert len(reviews) == 1
    assert reviews[0].data["spec"] == {"token": SHOP_TOKEN, "audiences": ["kuberpc-identity"]}


async def test_a_token_the_api_rejects_is_unauthenticated(live: Live) -> None:
    assert await code_of(live.certify(FORGED_TOKEN)) == grpc.StatusCode.UNAUTHENTICATED


async def test_a_token_for_another_audience_is_unauthenticated(live: Live) -> None:
    assert await code_of(live.certify(OTHER_AUDIENCE_TOKEN)) == grpc.StatusCode.UNAUTHENTICATED


async def test_an_empty_token_is_unauthenticated_without_asking_the_api(live: Live, kmock: kmock.RawHandler) -> None:
    assert await code_of(live.certify(b"")) == grpc.StatusCode.UNAUTHENTICATED
    assert len(kmock[TOKEN_REVIEWS]) == 0


async def test_another_service_accounts_token_is_permission_denied(live: Live) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await live.certify(ADMIN_TOKEN)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "system:serviceaccount:shop:admin" in (e.value.details() or "")


@pytest.mark.parametrize(
    ("identity", "request_bytes"),
    [(SHOP, b"not a CSR"), ("spiffe://other.example/ns/shop/sa/cart", None), ("shop/cart", None)],
    ids=["bad-csr", "other-trust-domain", "not-spiffe"],
)
async def test_a_malformed_request_is_invalid_argument_and_costs_no_token_review(
    live: Live, kmock: kmock.RawHandler, identity: str, request_bytes: bytes | None
) -> None:
    call = live.certify(SHOP_TOKEN, identity=identity, request=request_bytes)
    assert await code_of(call) == grpc.StatusCode.INVALID_ARGUMENT
    assert len(kmock[TOKEN_REVIEWS]) == 0


async def test_an_unreachable_api_is_unavailable_so_the_proxy_retries(mesh: Mesh) -> None:
    with api_client(f"http://127.0.0.1:{dead_port()}") as api:
        review = partial(review_token, api, audience="kuberpc-identity", request_timeout=2.0)
        async with running_service(mesh, review) as live:
            assert await code_of(live.certify(SHOP_TOKEN)) == grpc.StatusCode.UNAVAILABLE
            assert live.count("error") == 1


async def test_an_api_error_answer_is_unavailable(mesh: Mesh, kmock: kmock.RawHandler) -> None:
    # e.g. 403: the control plane's ServiceAccount lost `tokenreviews: create`.
    kmock[TOKEN_REVIEWS] << 403
    with api_client(str(kmock.url)) as api:
        async with running_service(mesh, partial(review_token, api, audience="kuberpc-identity")) as live:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await live.certify(SHOP_TOKEN)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "HTTP 403" in (e.value.details() or "")


async def test_every_answer_is_counted_by_result(live: Live) -> None:
    assert {r: live.count(r) for r in RESULTS} == dict.fromkeys(RESULTS, 0)  # exported before the first call
    await live.certify(SHOP_TOKEN)
    await live.certify(SHOP_TOKEN)
    for call in (live.certify("rejected"), live.certify(ADMIN_TOKEN), live.certify(SHOP_TOKEN, request=b"x")):
        await code_of(call)
    assert {r: live.count(r) for r in RESULTS} == {
        "issued": 2, "reused": 0, "limited": 0, "unauthenticated": 1, "denied": 1, "invalid": 1, "error": 0,
    }  # fmt: skip


async def test_neither_the_token_nor_the_ca_key_is_ever_logged(
    live: Live, mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await live.certify(SHOP_TOKEN)
    for call in (
        live.certify(FORGED_TOKEN),
        live.certify(ADMIN_TOKEN),
        live.certify(OTHER_AUDIENCE_TOKEN),
        live.certify(SHOP_TOKEN, request=b"x"),
    ):
        await code_of(call)
    logged = caplog.text + "".join(repr(r.args) for r in caplog.records)
    assert "event=certificate_issued" in logged and "event=certify_refused" in logged  # the calls were logged
    for token in (SHOP_TOKEN, ADMIN_TOKEN, OTHER_AUDIENCE_TOKEN, FORGED_TOKEN, "shop-cart-token"):
        assert token not in logged
    key_body = b"".join(mesh.pair.key_pem.splitlines()[1:-1]).decode()
    assert key_body[:40] not in logged.replace("\n", "")


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (Unauthenticated("x"), grpc.StatusCode.UNAUTHENTICATED),
        (PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (Limited("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (CertifyError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_error_class_has_the_status_code_of_the_proto(error: CertifyError, code: grpc.StatusCode) -> None:
    assert status_of(error)[0] == code


# --- bounded: rate limit, TokenReviews in flight, a repeated request answered again ---------------------


async def test_one_token_asking_again_and_again_is_limited_after_its_burst(
    live: Live, kmock: kmock.RawHandler
) -> None:
    burst = Limits().burst
    for _ in range(burst):
        await live.certify(SHOP_TOKEN)  # each with a fresh key: a new certificate each time
    for _ in range(20):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await live.certify(SHOP_TOKEN)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many certificate requests for spiffe://cluster.local/ns/shop/sa/cart from 127.0.0.1" in (
        e.value.details() or ""
    )
    assert len(kmock[TOKEN_REVIEWS]) == burst  # refused before the API is asked
    assert (live.count("issued"), live.count("limited")) == (burst, 20)

    live.clock.now += dt.timedelta(seconds=Limits().refill_seconds)
    await live.certify(SHOP_TOKEN)
    assert live.count("issued") == burst + 1


async def test_made_up_tokens_are_limited_too_without_reaching_the_api(live: Live, kmock: kmock.RawHandler) -> None:
    codes = [await code_of(live.certify(f"{FORGED_TOKEN}{i}")) for i in range(30)]
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == Limits().burst
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 30 - Limits().burst
    assert len(kmock[TOKEN_REVIEWS]) == Limits().burst


async def test_token_reviews_in_flight_are_capped_and_the_rest_refused_at_once(mesh: Mesh) -> None:
    release = asyncio.Event()
    reviewed: list[str] = []

    async def slow_review(token: str) -> TokenReview:
        reviewed.append(token)
        await release.wait()
        return TokenReview(authenticated=False, error="invalid bearer token")

    async with running_service(mesh, slow_review, limits=Limits(burst=100, max_reviews=3)) as live:
        calls = [asyncio.ensure_future(code_of(live.certify(f"{FORGED_TOKEN}{i}"))) for i in range(10)]
        refused: set[asyncio.Future[grpc.StatusCode]] = set()
        pending = set(calls)
        while len(refused) < 7:  # answered while three reviews still hang: refused, not queued
            done, pending = await asyncio.wait(pending, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            assert done, f"only {len(refused)} calls answered while the reviews hang"
            refused |= done
        assert len(reviewed) == 3 and len(pending) == 3
        release.set()
        codes = [await c for c in calls]
        assert live.count("limited") == 7
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 7
    assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 3


async def test_the_same_request_again_gets_the_same_certificate_without_a_token_review(
    live: Live, kmock: kmock.RawHandler
) -> None:
    request = csr(ec.generate_private_key(ec.SECP256R1()))
    first = await live.certify(SHOP_TOKEN, request=request)
    again = await live.certify(SHOP_TOKEN, request=request)  # a retry whose answer was lost
    assert again.leaf_certificate == first.leaf_certificate
    assert len(kmock[TOKEN_REVIEWS]) == 1
    assert (live.count("issued"), live.count("reused")) == (1, 1)

    live.clock.now += dt.timedelta(hours=16, minutes=1)  # a renewing proxy gets a fresh one
    renewed = await live.certify(SHOP_TOKEN, request=request)
    assert renewed.leaf_certificate != first.leaf_certificate
    assert len(kmock[TOKEN_REVIEWS]) == 2


async def test_requests_claiming_someone_elses_account_do_not_spend_its_allowance(mesh: Mesh) -> None:
    async def review(token: str) -> TokenReview:
        if token != SHOP_TOKEN:
            return TokenReview(authenticated=False, error="invalid bearer token")
        return TokenReview(True, "system:serviceaccount:shop:cart", ("kuberpc-identity",))

    service = IdentityService(
        mesh.ca, review=review, metrics=IdentityMetrics(CollectorRegistry()), clock=Clock(), limits=Limits(burst=2)
    )

    def fresh() -> bytes:
        return csr(ec.generate_private_key(ec.SECP256R1()))

    for _ in range(5):  # an attacker's pod, claiming shop/cart with made-up tokens
        await service.certify(SHOP, FORGED_TOKEN.encode(), fresh(), peer="10.0.0.66")
    outcomes = [await service.certify(SHOP, SHOP_TOKEN.encode(), fresh(), peer="10.0.0.7") for _ in range(2)]
    assert not any(isinstance(o, Refusal) for o in outcomes)


@pytest.mark.parametrize(
    ("peer", "host"),
    [("ipv4:10.0.0.7:41234", "10.0.0.7"), ("ipv6:[::1]:41234", "::1"), ("unix:/tmp/s", "unix:/tmp/s")],
)
def test_the_rate_limit_keys_on_the_address_of_the_grpc_peer(peer: str, host: str) -> None:
    assert peer_host(peer) == host


# --- the service's own TLS certificate --------------------------------------------------------------------


async def served_certificate(port: int, ca_pem: bytes) -> x509.Certificate:
    """The certificate the identity port serves, verified as a proxy does: against the mesh CA, for the DNS name."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])

    def handshake() -> bytes:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    return x509.load_der_x509_certificate(await asyncio.to_thread(handshake))


def test_the_serving_names_are_the_services_and_the_configured_identity_addr() -> None:
    assert NAMES == ["kuberpc-webhook.kuberpc-system.svc", "kuberpc-webhook.kuberpc-system.svc.cluster.local"]
    assert identity_dns_names("mesh", "identity.mesh.example:8081")[-1] == "identity.mesh.example"
    assert identity_dns_names("mesh", "10.0.0.7:8081") == identity_dns_names("mesh")
    assert identity_dns_names("mesh", "kuberpc-webhook.mesh.svc:8081") == identity_dns_names("mesh")


async def test_the_service_serves_a_certificate_for_its_dns_names_from_the_mesh_ca(live: Live, mesh: Mesh) -> None:
    served = await served_certificate(live.port, mesh.pair.cert_pem)
    san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == NAMES


async def test_a_client_expecting_another_name_refuses_the_service(live: Live, mesh: Mesh) -> None:
    async with channel(live.port, mesh.pair.cert_pem, name="impostor.example") as ch:
        call = identity_pb2_grpc.IdentityStub(ch).Certify(identity_pb2.CertifyRequest(), timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNAVAILABLE


async def test_the_serving_certificate_is_renewed_at_two_thirds_of_its_life(mesh: Mesh) -> None:
    # Started 17 h ago with a 24 h certificate: renewal (at 16 h) is due at the next handshake.
    clock = Clock()
    real_now = clock.now
    clock.now = real_now - dt.timedelta(hours=17)
    async with running_service(mesh, lambda token: None, clock=clock) as live:
        first = await served_certificate(live.port, mesh.pair.cert_pem)
        assert live.certificate.renew_at == clock.now + (live.certificate.not_after - clock.now) * 2 / 3
        assert first.not_valid_after_utc < real_now + dt.timedelta(hours=8)
        clock.now = real_now
        renewed = await served_certificate(live.port, mesh.pair.cert_pem)
        again = await served_certificate(live.port, mesh.pair.cert_pem)
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc > real_now + dt.timedelta(hours=23)
    assert again.serial_number == renewed.serial_number  # renewed once, then kept


async def test_in_flight_calls_finish_when_the_service_stops(mesh: Mesh) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow_review(token: str) -> TokenReview:
        entered.set()
        await release.wait()
        return TokenReview(authenticated=True, username="system:serviceaccount:shop:cart", audiences=("kuberpc-identity",))

    async with AsyncExitStack() as outer:
        stack = await outer.enter_async_context(AsyncExitStack())
        live = await stack.enter_async_context(running_service(mesh, slow_review))
        ch = await outer.enter_async_context(channel(live.port, mesh.pair.cert_pem))
        call = asyncio.ensure_future(identity_pb2_grpc.IdentityStub(ch).Certify(certify_request(SHOP_TOKEN), timeout=10))
        await asyncio.wait_for(entered.wait(), 10)
        stopping = asyncio.create_task(stack.aclose())
        async with asyncio.timeout(10):  # the listener closes first: new connections are refused
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", live.port)
                except ConnectionRefusedError:
                    break
                w.close()
                await asyncio.sleep(0.01)
        release.set()
        answer = await call
        await stopping
    assert x509.load_der_x509_certificate(answer.leaf_certificate).serial_number > 0


# --- python -m webhook serve --------------------------------------------------------------------------------


def run_main(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "webhook", *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_serve_help_documents_the_identity_flags() -> None:
    proc = run_main("serve", "--help")
    assert proc.returncode == 0
    for flag in ("--identity-port", "--identity-ca-key", "--identity-ca-cert"):
        assert flag in proc.stdout
    assert "(default 8081)" in " ".join(proc.stdout.split())


def test_serve_refuses_to_start_with_an_unusable_ca_key_and_names_it(tmp_path: Path, mesh: Mesh) -> None:
    (tmp_path / "config.yaml").write_text("{}\n")
    mesh.key_path.write_text("not a key")
    proc = run_main(
        "serve", "--config", str(tmp_path / "config.yaml"), "--tls-cert", "x", "--tls-key", "y",
        "--identity-ca-key", str(mesh.key_path), "--identity-ca-cert", str(mesh.cert_path),
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"{mesh.key_path}: not an unencrypted PEM private key" in proc.stderr


async def test_serve_runs_the_identity_service_beside_the_webhook_and_stops_on_sigterm(
    tmp_path: Path, mesh: Mesh, kmock: kmock.RawHandler, serving_files: tuple[KeyPair, Path, Path]
) -> None:
    kmock[TOKEN_REVIEWS] << FakeTokenReviews()
    webhook_ca, cert, key = serving_files
    (tmp_path / "config.yaml").write_text('kubernetesVersion: "1.30"\n')
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
        "current-context": "kmock",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig"), "POD_NAMESPACE": "kuberpc-system"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "webhook", "serve", "--config", str(tmp_path / "config.yaml"),
        "--tls-cert", str(cert), "--tls-key", str(key), "--host", "127.0.0.1", "--port", "0",
        "--identity-port", "0", "--identity-ca-key", str(mesh.key_path), "--identity-ca-cert", str(mesh.cert_path),
        "--trust-anchors", str(tmp_path / "absent.pem"), "--shutdown-delay", "0",
        cwd=ROOT, env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        found: dict[bytes, list[Any]] = {}
        async with asyncio.timeout(30):
            while len(found) < 2:
                line = await proc.stderr.readline()
                assert line, "serve exited before listening"
                if m := re.search(rb"event=(listening|identity_listening) address=(\[.*\])", line):
                    found[m.group(1)] = json.loads(m.group(2))
        _, identity_port = found[b"identity_listening"]
        async with channel(identity_port, mesh.pair.cert_pem) as ch:
            answer = await identity_pb2_grpc.IdentityStub(ch).Certify(certify_request(SHOP_TOKEN), timeout=10)
        leaf = x509.load_der_x509_certificate(answer.leaf_certificate)
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        ) == [SHOP]
        host, port = found[b"listening"]
        metrics = await asyncio.to_thread(
            ssl_get, f"https://{host}:{port}/metrics", webhook_ca.cert_pem
        )
        assert 'kuberpc_identity_certificates_total{result="issued"} 1.0' in metrics
        assert "kuberpc_webhook_admissions_total" in metrics  # one registry, one /metrics
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        assert SHOP_TOKEN.encode() not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def ssl_get(url: str, ca_pem: bytes) -> str:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.check_hostname = False  # the webhook's certificate names the Service, not 127.0.0.1
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        body: bytes = resp.read()
    return body.decode()
