"""The pod runner's kubelet streaming endpoint, port-forward only: what `kubectl port-forward` (pods/portforward)
reaches through the API server, so the cluster tests take the same path to a pod's loopback as a user does.

It serves `GET /portForward/<namespace>/<pod>?port=N` upgraded to a WebSocket (`v4.channel.k8s.io`, the kubelet's
own framing: two channels per port, data then error, each opened by a frame carrying the port number), and
connects inside the pod's network namespace to 127.0.0.1:N, as the kubelet does. Test infrastructure: it listens on
the pod bridge only, and, like a kubelet started without --client-ca-file, does not authenticate the API server
(the API server authorises the user: `create` on pods/portforward). No exec, logs or attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2e.cluster.forward import _enter_netns

log = logging.getLogger("kubelet.streaming")
PROTOCOL = "v4.channel.k8s.io"


def _self_signed(host: str, directory: Path) -> ssl.SSLContext:
    """A serving certificate nobody verifies: the API server skips verification without --kubelet-certificate-authority."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kuberpc pod runner")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "kubelet.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "kubelet.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(directory / "kubelet.crt", directory / "kubelet.key")
    return ctx


def _connect_inside(netns: str, port: int) -> socket.socket:
    """A TCP connection to 127.0.0.1:port inside `netns`, made by a thread that enters it (and then ends)."""
    result: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            _enter_netns(netns)
            result.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except BaseException as e:  # handed to the caller
            result.append(e)

    t = threading.Thread(target=run, name=f"connect-{netns}", daemon=True)
    t.start()
    t.join(15)
    if not result:
        raise OSError(f"connecting inside {netns} timed out")
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class StreamingServer:
    """`StreamingServer(host, port, netns_of).start()`; netns_of(namespace, pod) names the pod's network namespace."""

    def __init__(self, host: str, port: int, netns_of: Callable[[str, str], str | None]) -> None:
        self.host, self.port = host, port
        self._netns_of = netns_of
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streaming", daemon=True)
        self._dir = tempfile.TemporaryDirectory(prefix="kuberpc-kubelet-")

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15)
        log.info("streaming server (port-forward) on https://%s:%d", self.host, self.port)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/portForward/{namespace}/{pod}", self._port_forward)
        app.router.add_get("/portForward/{namespace}/{pod}/{uid}", self._port_forward)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, self.host, self.port, ssl_context=_self_signed(self.host, Path(self._dir.name))).start()

    async def _port_forward(self, request: web.Request) -> web.StreamResponse:
        namespace, pod = request.match_info["namespace"], request.match_info["pod"]
        try:
            ports = [int(p) for p in request.query.getall("port", [])]
        except ValueError:
            return web.Response(status=400, text="port must be a number")
        netns = self._netns_of(namespace, pod)
        if netns is None:
            return web.Response(status=404, text=f"pod {namespace}/{pod} is not running on this node")
        if not ports or not all(0 < p < 65536 for p in ports):
            return web.Response(status=400, text="at least one port query parameter is required")
        ws = web.WebSocketResponse(protocols=(PROTOCOL,))
        await ws.prepare(request)
        writers: dict[int, asyncio.StreamWriter] = {}
        pumps: list[asyncio.Task[None]] = []
        for i, port in enumerate(ports):
            for channel in (2 * i, 2 * i + 1):
                await ws.send_bytes(bytes([channel]) + port.to_bytes(2, "little"))
            try:
                sock = await asyncio.to_thread(_connect_inside, netns, port)
            except OSError as e:
                await ws.send_bytes(bytes([2 * i + 1]) + f"error forwarding port {port} to pod {pod}: {e}".encode())
                continue
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writers[2 * i] = writer
            pumps.append(asyncio.create_task(self._from_pod(reader, ws, 2 * i)))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY or not msg.data:
                    continue
                writer = writers.get(msg.data[0])
                if writer is not None:
                    writer.write(msg.data[1:])
                    with contextlib.suppress(ConnectionError):
                        await writer.drain()
        finally:
            for writer in writers.values():
                writer.close()
            for task in pumps:
                task.cancel()
            await ws.close()
        return ws

    @staticmethod
    async def _from_pod(reader: asyncio.StreamReader, ws: web.WebSocketResponse, channel: int) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                await ws.send_bytes(bytes([channel]) + data)
        # The pod closed its end: so does the forward, as the kubelet's does.
        await ws.close()
