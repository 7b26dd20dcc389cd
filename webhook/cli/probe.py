"""What `kuberpc check` asks the control plane's own ports, at an address that reaches them (a port-forward).

Collects answers only: whether they are right is decided by check.py. Sends nothing that changes state: a GET of
/healthz, and a Certify request that is empty on purpose (refused before any TokenReview).
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
