"""The proxy's workload certificate: issued by the identity service and renewed at 2/3 of its life, or read
from files and reloaded when they change; either way loaded into the proxy's SSLContexts for new handshakes.

Must not log or expose a key, a token or a certificate, nor import grpc (Certify goes over the proxy's own HTTP/2).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar import grpc_client, identity
from sidecar.config import Address, TLSFiles
from sidecar.identity import IdentityError, SpiffeId, WorkloadCertificate

log = logging.getLogger(__name__)

# The identity service answers after one TokenReview; a call still pending after this is retried instead.
CERTIFY_TIMEOUT = 10.0
# Retries start fast (a pod starting just before the control plane is ready) and settle at one every ~30 s.
RETRY_BASE = 0.2
RETRY_CAP = 30.0
# Rotated certificate files (cert-manager, `python -m sidecar certs`) are picked up within this many seconds.
FILE_POLL_INTERVAL = 10.0


class CertifyError(IdentityError):
    """No certificate was issued: `code` is the gRPC status name (or TOKEN when the token is unreadable)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Issued:
    """What the identity service returned: the leaf and its intermediates, DER."""

    leaf_der: bytes
    intermediates_der: tuple[bytes, ...] = ()


class Certifier(Protocol):
    """Trades a CSR and a ServiceAccount token for a certificate; raises CertifyError when none is issued."""

    async def __call__(self, identity: SpiffeId, token: bytes, csr_der: bytes) -> Issued: ...


class WorkloadIdentity(Protocol):
    """What the proxy needs of its certificate source."""

    current: WorkloadCertificate | None

    async def obtain(self, stop: asyncio.Event) -> bool:
        """Until a certificate is loaded (True) or `stop` is set (False)."""
        ...

    async def run(self) -> None:
        """Keeps the certificate fresh until cancelled."""
        ...

    def debug(self) -> dict[str, object]: ...


def certificate_problem(cert: WorkloadCertificate | None, now: float) -> str | None:
    """Why the proxy cannot serve mTLS with `cert` at wall-clock time `now`, or None when it can.

    An expired certificate is refused by every peer: a proxy whose renewals kept failing must say so on
    /ready rather than take calls it can only fail.
    """
    if cert is None:
        return "no workload certificate yet"
    if now >= cert.not_after:
        return f"the workload certificate expired at {_iso(cert.not_after)} (renewal failing?)"
    return None


def retry_delay(failures: int, rng: random.Random, *, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds to wait after `failures` (>= 1) consecutive failures: exponential, capped, with jitter.

    Half of it fixed, half random ("equal jitter"): it never degenerates into a busy loop, and proxies that
    failed together (the control plane restarted) spread their retries out.
    """
    ceiling = min(cap, base * 2.0 ** min(max(failures, 1) - 1, 32))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="seconds")


def _describe(cert: WorkloadCertificate | None) -> dict[str, object]:
    if cert is None:
        return {"serial": None, "not_after": None}
    return {"serial": f"{cert.serial:x}", "not_after": _iso(cert.not_after)}


def _read_token(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            token = f.read()
    except OSError as e:
        raise CertifyError("TOKEN", f"cannot read the ServiceAccount token {path!r}: {e.strerror or e}") from e
    if not token.strip():
        raise CertifyError("TOKEN", f"the ServiceAccount token file {path!r} is empty")
    return token


def _redact(message: str, token: bytes) -> str:
    """A server that echoes the token in an error must not get it into our logs."""
    secret = token.decode("utf-8", "replace").strip()
    return message.replace(secret, "<token>") if secret else message


class GrpcCertifier:
    """Certify over TLS (root: the trust anchors; server name: the host of `address`), made with the proxy's
    own HTTP/2 client (sidecar.grpc_client) on a connection opened for the call and closed after it.

    Not grpcio: measured, it added ~19 MiB to every proxy's RSS (the module and its core threads) for one
    unary call every ~16 h. The messages are encoded by the generated proto.identity_pb2 (protobuf's upb
    runtime, ~2 MiB once imported, on the first call).
    """

    PATH = "/kuberpc.identity.v1.Identity/Certify"

    def __init__(self, address: Address, trust_anchors_file: str, *, timeout: float = CERTIFY_TIMEOUT) -> None:
        self._address = address
        self._anchors_file = trust_anchors_file
        self._timeout = timeout

    async def __call__(self, identity: SpiffeId, token: bytes, csr_der: bytes) -> Issued:
        # Imported here, not at the top: a proxy with file-based identity never pays for protobuf.
        from google.protobuf.message import DecodeError

        from proto import identity_pb2

        ctx = self._tls_context()  # built each time: the ConfigMap may add a new anchor
        request = identity_pb2.CertifyRequest(
            identity=str(identity), token=token, certificate_signing_request=csr_der
        )
        try:
            answer = await grpc_client.unary_call(
                self._address, self.PATH, request.SerializeToString(), ssl_context=ctx, timeout=self._timeout
            )
        except grpc_client.CallError as e:
            raise CertifyError(e.code, e.message) from None
        try:
            response = identity_pb2.CertifyResponse.FromString(answer)
        except DecodeError as e:
            raise CertifyError("INTERNAL", f"undecodable CertifyResponse: {e}") from None
        return Issued(bytes(response.leaf_certificate), tuple(bytes(d) for d in response.intermediate_certificates))

    def _tls_context(self) -> ssl.SSLContext:
        try:
            return grpc_client.tls_context(_read_file(self._anchors_file))
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError; a non-ASCII file, a ValueError
            reason = (e.strerror if isinstance(e, OSError) else None) or e
            raise CertifyError("TRUST_ANCHORS", f"cannot read {self._anchors_file!r}: {reason}") from e


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class IssuedIdentity:
    """The certificate from the identity service, for a fresh key made here: obtained before the proxy serves,
    renewed at 2/3 of its life. A failed renewal is retried with backoff while the current certificate serves on.

    The key goes to `files.key` (mode 0600, an in-memory volume) and the chain to `files.cert`, because
    ssl.SSLContext only loads from files; the contexts then present them in every new handshake.
    """

    def __init__(
        self,
        *,
        identity: SpiffeId,
        files: TLSFiles,
        token_file: str,
        certify: Certifier,
        contexts: Sequence[ssl.SSLContext],
        on_certificate: Callable[[WorkloadCertificate], None],
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.identity = identity
        self._files = files
        self._token_file = token_file
        self._certify = certify
        self._contexts = tuple(contexts)
        self._on_certificate = on_certificate
        self._clock = clock
        self._rng = rng
        self.current: WorkloadCertificate | None = None
        self.renew_at: float | None = None
        self.failures = 0  # consecutive, since the last certificate
        self._last_failure: tuple[str, str] | None = None

    async def obtain(self, stop: asyncio.Event) -> bool:
        """The first certificate, retried with backoff: True once loaded, False if `stop` is set first."""
        attempt = asyncio.create_task(self._until_issued())
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({attempt, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (attempt, stopped):
                task.cancel()
            await asyncio.wait({attempt, stopped})
        if not attempt.cancelled() and (error := attempt.exception()) is not None:
            raise error  # a bug, not a refusal: refusals are retried
        return self.current is not None

    async def run(self) -> None:
        """Renews at each certificate's renewal time, until cancelled. Call after obtain() returned True."""
        while True:
            if self.renew_at is None:
                raise RuntimeError("IssuedIdentity.run() before a certificate was obtained")
            await asyncio.sleep(max(0.0, self.renew_at - self._clock()))
            await self._until_issued()

    def debug(self) -> dict[str, object]:
        return {
            "source": "identity-service",
            "identity": str(self.identity),
            **_describe(self.current),
            "renew_at": _iso(self.renew_at) if self.renew_at is not None else None,
            "failures": self.failures,
            "last_failure": ": ".join(self._last_failure) if self._last_failure else None,
        }

    async def _until_issued(self) -> None:
        while True:
            try:
                await self._request()
                return
            except CertifyError as e:
                failure = (e.code, e.message)
            except IdentityError as e:  # an answer that is not a certificate for our key and identity
                failure = ("BAD_CERTIFICATE", str(e))
            except OSError as e:  # the in-memory volume is not writable
                failure = ("WRITE", f"cannot write the certificate files: {e.strerror or e}")
            self.failures += 1
            delay = retry_delay(self.failures, self._rng)
            if failure != self._last_failure:
                # Once per state change: a control plane down for an hour must not write a line every 30 s.
                log.warning(
                    "certificate request failed identity=%s code=%s message=%r attempt=%d retry_in_s=%.2f "
                    "has_certificate=%s",
                    self.identity, *failure, self.failures, delay, self.current is not None,
                )  # fmt: skip
            self._last_failure = failure
            await asyncio.sleep(delay)

    async def _request(self) -> None:
        # Read at every attempt: the kubelet replaces the projected token long before the certificate expires.
        # Files here are small and on in-memory volumes, read or written once per ~16 h: no thread needed.
        token = _read_token(self._token_file)
        request = identity.create_csr(self.identity)
        try:
            issued = await self._certify(self.identity, token, request.csr_der)
        except CertifyError as e:
            raise CertifyError(e.code, _redact(e.message, token)) from None
        received_at = self._clock()
        cert = identity.accept_issued(
            request,
            issued.leaf_der,
            issued.intermediates_der,
            now=datetime.datetime.fromtimestamp(received_at, datetime.UTC),
        )
        self._write(request.key_pem, cert.chain_pem)
        # On the loop's thread, where handshakes use these contexts: an OpenSSL context must not be changed
        # while another thread uses it.
        for ctx in self._contexts:
            identity.load_certificate(ctx, self._files.cert, self._files.key)
        rotated = self.current is not None
        self.current = cert
        self.renew_at = identity.renewal_time(cert, received_at=received_at)
        self._on_certificate(cert)
        log.info(
            "certificate %s identity=%s serial=%x not_after=%s renew_at=%s failed_attempts=%d",
            "rotated" if rotated else "issued", self.identity, cert.serial, _iso(cert.not_after),
            _iso(self.renew_at), self.failures,
        )  # fmt: skip
        self.failures = 0
        self._last_failure = None

    def _write(self, key_pem: bytes, chain_pem: bytes) -> None:
        # Key first: the pair on disk only matches once both are written, and only this process reads them.
        identity.write_atomically(self._files.key, key_pem, 0o600)
        identity.write_atomically(self._files.cert, chain_pem, 0o644)


def _file_stamp(files: TLSFiles) -> tuple[tuple[int, int, int], ...] | None:
    """Changes whenever either file is replaced or rewritten (Secret volumes swap a symlink: stat follows it)."""
    try:
        stats = [os.stat(path) for path in (files.cert, files.key)]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in stats)


class FileIdentity:
    """The certificate from files something else renews (cert-manager, `python -m sidecar certs`): loaded at
    start, reloaded into the contexts when the files change. A bad update is logged and the old one kept."""

    def __init__(
        self,
        *,
        files: TLSFiles,
        contexts: Sequence[ssl.SSLContext],
        on_certificate: Callable[[WorkloadCertificate], None],
        poll_interval: float = FILE_POLL_INTERVAL,
    ) -> None:
        self._files = files
        self._contexts = tuple(contexts)
        self._on_certificate = on_certificate
        self._poll_interval = poll_interval
        self.current: WorkloadCertificate | None = None
        self._stamp: tuple[tuple[int, int, int], ...] | None = None
        self._last_failure: str | None = None

    def load(self) -> None:
        """Loads the files into every context; IdentityError (naming the file) when they cannot be used."""
        stamp = _file_stamp(self._files)
        # A scratch context first: a pair that does not load must not leave a real context half-changed.
        identity.load_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), self._files.cert, self._files.key)
        try:
            chain = _read_file(self._files.cert)
        except OSError as e:
            raise IdentityError(f"cannot read {self._files.cert!r}: {e.strerror or e}") from e
        cert = identity.read_chain(chain)
        for ctx in self._contexts:
            identity.load_certificate(ctx, self._files.cert, self._files.key)
        reloaded = self.current is not None
        self.current, self._stamp = cert, stamp
        self._on_certificate(cert)
        if reloaded:
            log.info(
                "certificate reloaded cert_file=%s serial=%x not_after=%s",
                self._files.cert, cert.serial, _iso(cert.not_after),
            )  # fmt: skip

    async def obtain(self, stop: asyncio.Event) -> bool:
        if self.current is None:
            self.load()
        return True

    async def run(self) -> None:
        """Polls the files' identity (inode, mtime, size) and reloads on change, until cancelled."""
        while True:
            await asyncio.sleep(self._poll_interval)
            stamp = _file_stamp(self._files)
            if stamp is None or stamp == self._stamp:
                continue
            try:
                self.load()
                self._last_failure = None
            except IdentityError as e:
                # Often transient (the key written, the certificate not yet): retried at the next poll.
                if str(e) != self._last_failure:
                    log.warning("certificate reload failed, keeping the current one: %s", e)
                self._last_failure = str(e)

    def debug(self) -> dict[str, object]:
        return {"source": "files", "cert_file": self._files.cert, **_describe(self.current)}
