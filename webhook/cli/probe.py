"""What `kuberpc check` asks the control plane's own ports, at an address that reaches them (a port-forward).

Collects answers only: whether they are right is decided by check.py. Sends nothing that changes state: a GET of
/healthz, a Certify request that is empty on purpose (refused before any TokenReview), and a TLS handshake with
the discovery port that presents no client certificate (refused before any HTTP/2 is read).
"""

from __future__ import annotations

import http.client
import socket
import ssl

import grpc

from proto import identity_pb2, identity_pb2_grpc


def webhook_certificate(address: str, server_name: str, *, timeout: float = 10.0) -> tuple[bytes | None, str]:
    """(the DER certificate served at `address` for `server_name`, "") once /healthz answered 200; else
    (None or the certificate, why). The certificate is not verified here: check.webhook_serving does that."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # read it whatever it is, to say precisely what is wrong with it
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw, ctx.wrap_socket(
            raw, server_hostname=server_name
        ) as tls:
            der = tls.getpeercert(binary_form=True)
            conn = http.client.HTTPConnection(server_name, timeout=timeout)
            conn.sock = tls
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            if resp.status != 200:
                return der, f"/healthz answered HTTP {resp.status}"
            return der, ""
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"


def identity_answer(
    address: str, trust_anchors_pem: bytes, server_name: str, *, timeout: float = 10.0
) -> tuple[str, str]:
    """(gRPC status name, details) of an empty Certify, over TLS verified by the trust anchors for `server_name`."""
    creds = grpc.ssl_channel_credentials(root_certificates=trust_anchors_pem)
    options = [("grpc.ssl_target_name_override", server_name), ("grpc.default_authority", server_name)]
    with grpc.secure_channel(address, creds, options=options) as channel:
        stub = identity_pb2_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.Certify(identity_pb2.CertifyRequest(), timeout=timeout)
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            return (code.name if code is not None else "UNKNOWN"), str(details or "")
    return "OK", "an empty request was granted a certificate"


# What discovery_answer found: the port proved itself the mesh's and refused a client without a certificate.
MTLS = "MTLS"
NO_CLIENT_AUTH = "NO_CLIENT_AUTH"  # it served an HTTP/2 client that presented no certificate
UNTRUSTED = "UNTRUSTED"  # its certificate is not the trust anchors' for the name
UNREACHABLE = "UNREACHABLE"
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def discovery_answer(
    address: str, trust_anchors_pem: bytes, server_name: str, *, timeout: float = 10.0
) -> tuple[str, str]:
    """(one of MTLS, NO_CLIENT_AUTH, UNTRUSTED, UNREACHABLE; details) of a TLS connection to the discovery port
    that verifies the server against the trust anchors for `server_name` and presents no client certificate.

    A CLI holds no mesh certificate, so it cannot open a Watch; what it can prove is that the port is served by
    the mesh's control plane and that it refuses whoever is not meshed: on the first read after the handshake,
    TLS 1.3's certificate_required alert or the connection closed, where a server that took the client would
    have sent its HTTP/2 SETTINGS."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cadata=trust_anchors_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            try:
                tls = ctx.wrap_socket(raw, server_hostname=server_name)
            except ssl.SSLCertVerificationError as e:
                return UNTRUSTED, e.verify_message or str(e)
            with tls:
                tls.sendall(_H2_PREFACE)
                try:
                    data = tls.recv(64)
                except (ssl.SSLEOFError, ConnectionResetError):
                    data = b""
                except ssl.SSLError as e:
                    if "CERTIFICATE_REQUIRED" in (e.reason or "") or "certificate required" in str(e):
                        return MTLS, "a client without a certificate is refused (certificate_required)"
                    return UNREACHABLE, f"{type(e).__name__}: {e}"
                if data:
                    return NO_CLIENT_AUTH, "it answered HTTP/2 to a client that presented no certificate"
                # grpc's TLS drops the connection of a client without a certificate rather than sending the alert.
                return MTLS, "a client without a certificate is disconnected"
    except OSError as e:
        return UNREACHABLE, f"{type(e).__name__}: {e}"
