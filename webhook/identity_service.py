"""The identity service on gRPC (kuberpc.identity.v1.Identity/Certify) over TLS with a certificate from the mesh CA.

Bounded: a per (service account, pod address) rate limit, a cap on TokenReviews in flight, and a repeated request
answered with the certificate already issued for it. Maps identity errors to gRPC status codes in exactly one
place (`status_of`); never logs a token or a key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import grpc
from prometheus_client import CollectorRegistry, Counter

from proto import identity_pb2, identity_pb2_grpc
from sidecar.address import parse_dial_address
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

Result = Literal["issued", "reused", "limited", "unauthenticated", "denied", "invalid", "error"]
RESULTS: tuple[Result, ...] = ("issued", "reused", "limited", "unauthenticated", "denied", "invalid", "error")
TokenReviewer = Callable[[str], Awaitable[TokenReview]]
Clock = Callable[[], dt.datetime]

# A projected ServiceAccount token is 1-2 KB; a CertifyRequest is far below this whole bound.
MAX_TOKEN_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 64 * 1024
# Renew the serving certificate at 2/3 of its life, as the proxies do theirs (DESIGN.md §4).
RENEW_AT = 2 / 3
# After a failed renewal, keep the current certificate and try again on a handshake this much later.
RETRY_RENEWAL = dt.timedelta(minutes=1)
# A certificate is given again for a repeated request only while this much of its life is left: the third
# the proxies keep for renewing (they renew at 2/3 of 24 h), so a renewing proxy never gets its old one back.
REUSE_MIN_LEFT = dt.timedelta(hours=8)


@dataclass(frozen=True, slots=True)
class Limits:
    """How much one caller may ask and how much the API server is asked at once.

    A proxy asks once at start and once per ~16 h, retrying with backoff (0.2 s doubling to 30 s) on failure:
    `burst` requests at once, then one per `refill_seconds`, per (claimed service account, pod address).
    Keyed by the address as well as the claimed identity so that requests claiming someone else's service
    account spend only the claimant's own allowance. `max_reviews` bounds the TokenReviews in flight whoever
    asks (made-up tokens from many pods); beyond it a request is refused at once rather than queued.
    """

    burst: int = 10
    refill_seconds: float = 6.0
    max_reviews: int = 32
    max_callers: int = 10_000  # rate-limit entries kept (least recently used dropped first)
    max_reused: int = 10_000  # issued certificates remembered for repeated requests

    def __post_init__(self) -> None:
        if self.burst < 1 or self.refill_seconds <= 0 or self.max_reviews < 1:
            raise ValueError(f"limits must be positive: {self}")
        if self.max_callers < 1 or self.max_reused < 1:
            raise ValueError(f"limits must be positive: {self}")


class Limited(CertifyError):
    """The caller asked too often, or too many TokenReviews are in flight: retry later (RESOURCE_EXHAUSTED)."""


class _Buckets:
    """Token buckets by key, in an LRU bounded to `limit` keys (a dropped key starts again with a full bucket)."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def take(self, key: tuple[str, str], now: float) -> bool:
        burst, refill = self._limits.burst, self._limits.refill_seconds
        tokens, at = self._buckets.pop(key, (float(burst), now))
        tokens = min(float(burst), tokens + max(0.0, now - at) / refill)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self._limits.max_callers:
            self._buckets.popitem(last=False)
        return allowed

_STATUS: tuple[tuple[type[CertifyError], grpc.StatusCode, Result], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "denied"),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, "error"),
    (Limited, grpc.StatusCode.RESOURCE_EXHAUSTED, "limited"),
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
        self,
        ca: CertificateAuthority,
        *,
        review: TokenReviewer,
        metrics: IdentityMetrics,
        clock: Clock,
        limits: Limits = Limits(),
    ) -> None:
        self._ca = ca
        self._review = review
        self._metrics = metrics
        self._clock = clock
        self._limits = limits
        self._buckets = _Buckets(limits)
        self._reviews = 0  # TokenReviews in flight
        # sha256(identity, token, CSR) -> what was issued for it: a retried request (its answer was lost) gets
        # the same certificate again with no TokenReview and no signature. Safe: it names the CSR's own key,
        # which only the caller holds.
        self._issued: OrderedDict[bytes, Issued] = OrderedDict()

    def _reusable(self, key: bytes, now: dt.datetime) -> Issued | None:
        issued = self._issued.get(key)
        if issued is None:
            return None
        # Only while most of its life is left: a proxy renewing must get a fresh one, not its old one back.
        if now >= issued.not_after - REUSE_MIN_LEFT:
            del self._issued[key]
            return None
        self._issued.move_to_end(key)
        return issued

    async def _certify(self, identity: str, token: bytes, csr: bytes, peer: str) -> Issued:
        # The request is checked before the token is sent anywhere: a malformed one costs no API call.
        request = check_request(identity, csr, trust_domain=self._ca.trust_domain)
        text = _token_text(token)
        if not self._buckets.take((identity, peer), self._clock().timestamp()):
            raise Limited(
                f"too many certificate requests for {identity} from {peer or 'this address'} "
                f"(at most {self._limits.burst}, then one per {self._limits.refill_seconds:g} s)"
            )
        if self._reviews >= self._limits.max_reviews:
            raise Limited(f"{self._reviews} token reviews in flight: retry later")
        self._reviews += 1
        try:
            review = await self._review(text)
        finally:
            self._reviews -= 1
        return self._ca.certify(request, review, now=self._clock())

    async def certify(self, identity: str, token: bytes, csr: bytes, *, peer: str = "") -> Issued | Refusal:
        """`peer`: the caller's address (one pod), for the rate limit."""
        key = hashlib.sha256(b"\0".join((identity.encode(), token, csr))).digest()
        reused = self._reusable(key, self._clock())
        if reused is not None:
            self._metrics.count("reused")
            log.info("event=certificate_reused identity=%s serial=%x", identity, reused.serial)
            return reused
        try:
            issued = await self._certify(identity, token, csr, peer)
        except CertifyError as e:
            code, result = status_of(e)
            self._metrics.count(result)
            log.info("event=certify_refused result=%s code=%s reason=%s", result, code.name, json.dumps(str(e)))
            return Refusal(code, str(e))
        except Exception:
            self._metrics.count("error")
            log.exception("event=certify_failed")
            return Refusal(grpc.StatusCode.INTERNAL, "internal error in the identity service")
        self._issued[key] = issued
        while len(self._issued) > self._limits.max_reused:
            self._issued.popitem(last=False)
        self._metrics.count("issued")
        log.info(
            "event=certificate_issued identity=%s serial=%x not_after=%s",
            identity, issued.serial, issued.not_after.isoformat(),
        )  # fmt: skip
        return issued


def peer_host(peer: str) -> str:
    """The address in a grpc peer string (`ipv4:10.0.0.7:41234`, `ipv6:[::1]:41234`); the string otherwise."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return peer


def identity_dns_names(namespace: str, identity_addr: str = "") -> list[str]:
    """The names proxies may dial the service by: the webhook Service's, and the host of `identityAddr`."""
    names = [f"{a.WEBHOOK_NAME}.{namespace}.svc", f"{a.WEBHOOK_NAME}.{namespace}.svc.cluster.local"]
    host = parse_dial_address(identity_addr).host if identity_addr else ""  # the proxy's parser (config checked it)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host and host not in names:
            names.append(host)
    return names


class ServingCertificate:
    """The identity port's TLS certificate, minted from the mesh CA and renewed at 2/3 of its life.

    grpc asks `fetch` for a newer certificate before every TLS handshake (dynamic_ssl_server_credentials),
    so renewal needs no timer: the first connection past the renewal time gets a fresh certificate.
    """

    def __init__(
        self, ca: CertificateAuthority, dns_names: Sequence[str], *, clock: Clock, client_roots: bytes | None = None
    ) -> None:
        self._ca = ca
        self._dns_names = list(dns_names)
        self._clock = clock
        # With client_roots (the mesh trust anchors), clients must present a certificate chaining to them.
        self._client_roots = client_roots
        # grpc calls fetch() from its own threads, possibly several at once.
        self._lock = threading.Lock()
        self._initial = self._mint()

    def _mint(self) -> Any:
        now = self._clock()
        pair, not_after = self._ca.serving_pair(self._dns_names, now=now)
        self.not_after = not_after
        self.renew_at = now + (not_after - now) * RENEW_AT
        log.info("event=identity_serving_cert_issued names=%s not_after=%s", ",".join(self._dns_names), not_after.isoformat())
        return grpc.ssl_server_certificate_configuration(
            [(pair.key_pem, pair.cert_pem)], root_certificates=self._client_roots
        )

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
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=self._client_roots is not None
        )


@asynccontextmanager
async def serving(
    service: IdentityService, certificate: ServingCertificate, *, host: str, port: int, grace: float = 5.0
) -> AsyncIterator[int]:
    """Serve Certify on host:port until the block exits, then let in-flight calls finish; yields the bound port."""
    class Servicer(identity_pb2_grpc.IdentityServicer):
        async def Certify(self, request: identity_pb2.CertifyRequest, context: Any) -> identity_pb2.CertifyResponse:
            outcome = await service.certify(
                request.identity, request.token, request.certificate_signing_request, peer=peer_host(context.peer())
            )
            if isinstance(outcome, Issued):
                return identity_pb2.CertifyResponse(leaf_certificate=outcome.leaf_der, valid_until=outcome.valid_until)
            await context.abort(outcome.code, outcome.message)
            raise AssertionError("context.abort() returned")  # it raises to end the call with that status

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    register = partial(identity_pb2_grpc.add_IdentityServicer_to_server, Servicer())
    async with grpc_serving(register, certificate, host=host, port=port, options=options, grace=grace) as bound:
        log.info("event=identity_listening address=%s", json.dumps([host, bound]))
        yield bound


@asynccontextmanager
async def grpc_serving(
    register: Callable[[grpc.aio.Server], object],
    certificate: ServingCertificate,
    *,
    host: str,
    port: int,
    options: Sequence[tuple[str, int]],
    grace: float,
) -> AsyncIterator[int]:
    """A grpc.aio server with `register`'s servicer on host:port over `certificate`'s TLS, until the block exits;
    then in-flight calls get `grace` seconds. Yields the bound port."""
    # grpc's default SO_REUSEPORT would let a second process share the port silently.
    server = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])
    register(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_secure_port(address, certificate.credentials())
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(grace)
