"""Proxy test harness: mesh certificates, a real grpcio backend, and real proxies on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from sidecar import config as config_mod
from sidecar import identity, pki
from sidecar.app import Proxy, serve

BIG = 64 << 20
GRPC_OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]


@dataclass(frozen=True)
class Workload:
    cert: str
    key: str
    ca: str
    spiffe: str


@dataclass(frozen=True)
class MeshCerts:
    client: Workload
    server: Workload
    rogue: Workload  # same shape, but from a CA the mesh does not trust
    ca_dir: Path


def _issue(ca_key: bytes, ca_cert: bytes, out: Path, ns: str, sa: str) -> Workload:
    out.mkdir(parents=True, exist_ok=True)
    ident = identity.SpiffeId("cluster.local", ns, sa)
    issued = pki.issue_workload(pki.KeyPair(ca_cert, ca_key), identity=ident)
    key, chain = issued.key_pem, issued.cert_pem
    (out / "key.pem").write_bytes(key)
    (out / "cert.pem").write_bytes(chain)
    (out / "ca.pem").write_bytes(ca_cert)
    return Workload(str(out / "cert.pem"), str(out / "key.pem"), str(out / "ca.pem"), str(ident))


@pytest.fixture(scope="session")
def mesh_certs(tmp_path_factory: pytest.TempPathFactory) -> MeshCerts:
    root = tmp_path_factory.mktemp("mesh")
    ca = pki.create_ca(trust_domain="cluster.local")
    rogue = pki.create_ca(trust_domain="cluster.local")
    ca_key, ca_cert, rogue_key, rogue_cert = ca.key_pem, ca.cert_pem, rogue.key_pem, rogue.cert_pem
    return MeshCerts(
        client=_issue(ca_key, ca_cert, root / "client", "default", "client"),
        server=_issue(ca_key, ca_cert, root / "server", "default", "arith"),
        rogue=_issue(rogue_key, rogue_cert, root / "rogue", "default", "client"),
        ca_dir=root,
    )


# ---- a grpcio backend whose behaviour each call chooses through its metadata ------------------------


@dataclass
class BackendState:
    name: str = "backend"
    cancelled: threading.Event = field(default_factory=threading.Event)
    seen_metadata: list[tuple[tuple[str, str | bytes], ...]] = field(default_factory=list)
    seen_deadline: list[float | None] = field(default_factory=list)
    stream_messages_sent: int = 0


def _instructions(ctx: grpc.ServicerContext, state: BackendState) -> dict[str, str | bytes]:
    md = tuple((k, v) for k, v in ctx.invocation_metadata())
    state.seen_metadata.append(md)
    state.seen_deadline.append(ctx.time_remaining())
    echo = [(k, v) for k, v in md if k.startswith("x-echo")]
    ctx.send_initial_metadata(tuple(echo) + (("x-served-by", state.name),))
    return dict(md)


def _finish(ctx: grpc.ServicerContext, md: dict[str, str | bytes]) -> None:
    trailers: list[tuple[str, str | bytes]] = [("x-trailer", "done"), ("x-trailer-bin", b"\x00\xff\x10")]
    if "x-status" in md:
        if "x-details-bin" in md:
            trailers.append(("grpc-status-details-bin", md["x-details-bin"]))
        ctx.set_trailing_metadata(tuple(trailers))
        raw = md.get("x-message-bin")  # -bin: lets a test ask for a non-ASCII status message
        message = raw.decode() if isinstance(raw, bytes) else str(md.get("x-message", ""))
        ctx.abort(grpc.StatusCode[str(md["x-status"])], message)
    ctx.set_trailing_metadata(tuple(trailers))


def make_backend_handler(state: BackendState) -> grpc.GenericRpcHandler:
    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        md = _instructions(ctx, state)
        if "x-sleep-ms" in md:
            end = time.monotonic() + int(md["x-sleep-ms"]) / 1000
            while time.monotonic() < end:
                if not ctx.is_active():
                    state.cancelled.set()
                    return b""
                time.sleep(0.005)
        _finish(ctx, md)
        return req

    def server_stream(req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        md = _instructions(ctx, state)
        for i in range(int(md.get("x-count", "3"))):
            yield req + str(i).encode()
            state.stream_messages_sent += 1
        _finish(ctx, md)

    def client_stream(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> bytes:
        md = _instructions(ctx, state)
        total = b"".join(reqs)
        _finish(ctx, md)
        return total[:1024] + str(len(total)).encode()

    def bidi(reqs: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        md = _instructions(ctx, state)
        yield from reqs
        _finish(ctx, md)

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        },
    )


@dataclass
class Backend:
    port: int
    state: BackendState


@contextlib.contextmanager
def start_backend(name: str = "backend") -> Iterator[Backend]:
    state = BackendState(name)
    server = grpc.server(futures.ThreadPoolExecutor(16), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((make_backend_handler(state),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Backend(port, state)
    finally:
        server.stop(0)


@pytest.fixture
def backend() -> Iterator[Backend]:
    with start_backend() as b:
        yield b


# ---- real proxies in the test's event loop ------------------------------------------------------------


@dataclass
class RunningProxy:
    proxy: Proxy
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def outbound(self) -> str:
        return f"127.0.0.1:{self.proxy.bound_port('outbound')}"

    @property
    def inbound_port(self) -> int:
        return self.proxy.bound_port("inbound")

    @property
    def admin(self) -> str:
        return f"127.0.0.1:{self.proxy.bound_port('admin')}"

    @property
    def debug(self) -> str:
        """The loopback-only listener of /debug and /tap."""
        return f"127.0.0.1:{self.proxy.bound_port('debug')}"


def endpoints_yaml(
    services: dict[str, list[dict[str, object]]],
    annotations: dict[str, dict[str, str]] | None = None,
    selectors: dict[str, dict[str, str]] | None = None,
) -> str:
    """An endpoints file; each Service selects the pods labelled `app=<its name>` unless `selectors` says otherwise
    (a server proxy started with KUBERPC_POD_LABELS=app=echo is then selected by `echo.default`)."""
    import yaml

    doc = {
        "services": [
            {
                "name": name.split(".")[0],
                "namespace": name.split(".")[1] if "." in name else "default",
                "ports": [50051],
                "annotations": (annotations or {}).get(name, {}),
                "selector": (selectors or {}).get(name, {"app": name.split(".")[0]}),
                "endpoints": eps,
            }
            for name, eps in services.items()
        ]
    }
    return str(yaml.safe_dump(doc))


@contextlib.asynccontextmanager
async def run_proxy(workload: Workload, discovery_file: Path, **env: str) -> AsyncIterator[RunningProxy]:
    environ = {
        "KUBERPC_OUTBOUND_ADDR": "127.0.0.1:0",
        "KUBERPC_ADMIN_ADDR": "127.0.0.1:0",
        "KUBERPC_DEBUG_ADDR": "127.0.0.1:0",
        "KUBERPC_INBOUND_ADDR": "off",
        "KUBERPC_DISCOVERY": f"file:{discovery_file}",
        "KUBERPC_TLS_CERT": workload.cert,
        "KUBERPC_TLS_KEY": workload.key,
        "KUBERPC_TRUST_ANCHORS": workload.ca,
        "KUBERPC_DRAIN_SECONDS": "2",
        **env,
    }
    cfg = config_mod.load(environ)
    stop = asyncio.Event()
    started: asyncio.Future[Proxy] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, stop=stop, started=started))
    done, _ = await asyncio.wait({task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the startup error
    assert started in done, "proxy did not become ready within 10 s"
    try:
        yield RunningProxy(started.result(), stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@dataclass
class Pair:
    client_side: RunningProxy
    server_side: RunningProxy
    discovery: Path

    @property
    def target(self) -> str:
        return self.client_side.outbound


@contextlib.asynccontextmanager
async def run_pair(
    mesh_certs: MeshCerts,
    backend_port: int,
    tmp_path: Path,
    annotations: dict[str, str] | None = None,
    client_workload: Workload | None = None,
    server_workload: Workload | None = None,
    client_env: dict[str, str] | None = None,
    server_env: dict[str, str] | None = None,
) -> AsyncIterator[Pair]:
    """client -> outbound proxy -> mTLS -> inbound proxy -> backend: the real mesh path, on loopback."""
    disc = tmp_path / "endpoints.yaml"
    disc.write_text(endpoints_yaml({"echo.default": []}))
    async with run_proxy(
        server_workload or mesh_certs.server,
        disc,
        KUBERPC_INBOUND_ADDR="127.0.0.1:0",
        KUBERPC_APP_PORT=str(backend_port),
        KUBERPC_POD_LABELS="app=echo",
        **(server_env or {}),
    ) as server_side:
        disc.write_text(
            endpoints_yaml(
                {"echo.default": [{"address": "127.0.0.1", "port": server_side.inbound_port, "tls": True}]},
                {"echo.default": {"kuberpc.io/grpc-services": "test.Echo", **(annotations or {})}},
            )
        )
        async with run_proxy(client_workload or mesh_certs.client, disc, **(client_env or {})) as client_side:
            await wait_for_endpoints(client_side, "echo.default", 1)
            await wait_for(lambda: _has_policy(server_side), "the server side to load the Service's policy")
            yield Pair(client_side, server_side, disc)


def _has_policy(p: RunningProxy) -> bool:
    inbound = p.proxy.inbound
    return inbound is not None and any(
        es.policy.grpc_services for es in inbound.catalog.services.values()
    ) and inbound.closed_because() is None


async def wait_for(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Bounded poll for state that changes asynchronously (file discovery reloads)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_for_endpoints(p: RunningProxy, service: str, n: int, timeout: float = 10.0) -> None:
    """Discovery reloads asynchronously: wait (bounded) until the proxy sees `n` endpoints."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key, st in p.proxy.outbound.services.items():
            if str(key) == service and len(st.set.usable()) == n:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{service} never reached {n} endpoints")


@pytest.fixture
async def pair(mesh_certs: MeshCerts, backend: Backend, tmp_path: Path) -> AsyncIterator[Pair]:
    async with run_pair(mesh_certs, backend.port, tmp_path) as p:
        yield p
