"""The identity service on gRPC (kuberpc.identity.v1.Identity/Certify) over TLS with a certificate from the mesh CA.

Maps identity errors to gRPC status codes in exactly one place (`status_of`); never logs a token or a key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter

from proto import identity_pb2, identity_pb2_grpc
from webhook import annotations as a
from webhook.identity import (
    CertificateAuthority,
    CertifyError,
    InvalidRequest,
    Issued,
    PermissionDenied,
    TokenReview,
    Unauthenticated,
    Unavailable,
    check_request,
)

log = logging.getLogger(__name__)

Result = Literal["issued", "unauthenticated", "denied", "invalid", "error"]
RESULTS: tuple[Result, ...] = ("issued", "unauthenticated", "denied", "invalid", "error")
TokenReviewer = Callable[[str], Awaitable[TokenReview]]
Clock = Callable[[], dt.datetime]

# A projected ServiceAccount token is 1-2 KB; a CertifyRequest is far below this whole bound.
MAX_TOKEN_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 64 * 1024
# Renew the serving certificate at 2/3 of its life, as the proxies do theirs (DESIGN.md §4).
RENEW_AT = 2 / 3
# After a failed renewal, keep the current certificate and try again on a handshake this much later.
RETRY_RENEWAL = dt.timedelta(minutes=1)

_STATUS: tuple[tuple[type[CertifyError], grpc.StatusCode, Result], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "denied"),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, "error"),
)


def status_of(error: CertifyError) -> tuple[grpc.StatusCode, Result]:
    """The gRPC status (proto/identity.proto) and metric result of a refused Certify call."""
    for cls, code, result in _STATUS:
        if isinstance(error, cls):
            return code, result
    return grpc.StatusCode.INTERNAL, "error"


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.certificates = Counter(
            "kuberpc_identity_certificates",
            "Certify calls answered by the identity service, by result",
            ["result"],
            registry=registry,
        )
        # Bound once, so every result exports a zero before its first event (rate() and alerts work).
        self._by_result = {result: self.certificates.labels(result=result) for result in RESULTS}

    def count(self, result: Result) -> None:
        self._by_result[result].inc()


@dataclass(frozen=True, slots=True)
class Refusal:
    code: grpc.StatusCode
    message: str


def _token_text(token: bytes) -> str:
    if not token.strip():
        raise Unauthenticated("no ServiceAccount token in the request")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated(f"token is {len(token)} bytes (at most {MAX_TOKEN_BYTES})")
    try:
        return token.decode("ascii").strip()
    except UnicodeDecodeError as e:
        raise Unauthenticated("token is not a JWT (not ASCII)") from e


class IdentityService:
    """Certify: check the request, review its token, sign; every answer counted and logged once."""

    def __init__(
        self, ca: CertificateAuthority, *, review: TokenReviewer, metrics: IdentityMetrics, clock: Clock
    ) -> None:
        self._ca = ca
        self._review = review
        self._metrics = metrics
        self._clock = clock

    async def _certify(self, identity: str, token: bytes, csr: bytes) -> Issued:
        # The request is checked before the token is sent anywhere: a malformed one costs no API call.
        request = check_request(identity, csr, trust_domain=self._ca.trust_domain)
        review = await self._review(_token_text(token))
        return self._ca.certify(request, review, now=self._clock())

    async def certify(self, identity: str, token: bytes, csr: bytes) -> Issued | Refusal:
        try:
            issued = await self._certify(identity, token, csr)
        except CertifyError as e:
            code, result = status_of(e)
            self._metrics.count(result)
            log.info("event=certify_refused result=%s code=%s reason=%s", result, code.name, json.dumps(str(e)))
            return Refusal(code, str(e))
        except Exception:
            self._metrics.count("error")
            log.exception("event=certify_failed")
            return Refusal(grpc.StatusCode.INTERNAL, "internal error in the identity service")
        self._metrics.count("issued")
        log.info(
            "event=certificate_issued identity=%s serial=%x not_after=%s",
            identity, issued.serial, issued.not_after.isoformat(),
        )  # fmt: skip
        return issued


def identity_dns_names(namespace: str, identity_addr: str = "") -> list[str]:
    """The names proxies may dial the service by: the webhook Service's, and the host of `identityAddr`."""
    names = [f"{a.WEBHOOK_NAME}.{namespace}.svc", f"{a.WEBHOOK_NAME}.{namespace}.svc.cluster.local"]
    host = identity_addr.rpartition(":")[0]
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host and host not in names:
            names.append(host)
    return names


class ServingCertificate:
    """The identity port's TLS certificate, minted from the mesh CA and renewed at 2/3 of its life.

    grpc asks `fetch` for a newer certificate before every TLS handshake (dynamic_ssl_server_credentials),
    so renewal needs no timer: the first connection past the renewal time gets a fresh certificate.
    """

    def __init__(self, ca: CertificateAuthority, dns_names: Sequence[str], *, clock: Clock) -> None:
        self._ca = ca
        self._dns_names = list(dns_names)
        self._clock = clock
        # grpc calls fetch() from its own threads, possibly several at once.
        self._lock = threading.Lock()
        self._initial = self._mint()

    def _mint(self) -> Any:
        now = self._clock()
        pair, not_after = self._ca.serving_pair(self._dns_names, now=now)
        self.not_after = not_after
        self.renew_at = now + (not_after - now) * RENEW_AT
        log.info("event=identity_serving_cert_issued names=%s not_after=%s", ",".join(self._dns_names), not_after.isoformat())
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])

    def fetch(self) -> Any:
        """A new certificate configuration when renewal is due, else None (keep the current one)."""
        with self._lock:
            now = self._clock()
            if now < self.renew_at:
                return None
            try:
                return self._mint()
            except Exception as e:  # called from grpc's core: an exception here would fail the handshake
                self.renew_at = now + RETRY_RENEWAL
                log.warning("event=identity_serving_cert_renewal_failed error=%s", type(e).__name__)
                return None

    def credentials(self) -> Any:
        return grpc.dynamic_ssl_server_credentials(self._initial, self.fetch, require_client_authentication=False)


@asynccontextmanager
async def serving(
    service: IdentityService, certificate: ServingCertificate, *, host: str, port: int, grace: float = 5.0
) -> AsyncIterator[int]:
    """Serve Certify on host:port until the block exits, then let in-flight calls finish; yields the bound port."""
    class Servicer(identity_pb2_grpc.IdentityServicer):
        async def Certify(self, request: identity_pb2.CertifyRequest, context: Any) -> identity_pb2.CertifyResponse:
            outcome = await service.certify(request.identity, request.token, request.certificate_signing_request)
            if isinstance(outcome, Issued):
                return identity_pb2.CertifyResponse(leaf_certificate=outcome.leaf_der, valid_until=outcome.valid_until)
            await context.abort(outcome.code, outcome.message)
            raise AssertionError("context.abort() returned")  # it raises to end the call with that status

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # grpc's default SO_REUSEPORT would let a second process share the port silently.
            ("grpc.so_reuseport", 0),
        ]
    )
    identity_pb2_grpc.add_IdentityServicer_to_server(Servicer(), server)  # type: ignore[no-untyped-call]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, certificate.credentials())
    await server.start()
    try:
        log.info("event=identity_listening address=%s", json.dumps([host, bound]))
        yield bound
    finally:
        await server.stop(grace)
