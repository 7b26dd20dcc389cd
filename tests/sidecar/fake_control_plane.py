"""A test double of the control plane's discovery service: `Discovery.Watch` from proto/discovery.proto, served by
grpcio over mTLS in threads, with Services the test sets and changes. It speaks the wire contract (snapshots on
subscribe, deltas or snapshots on change, claims, selecting), not the control plane's Kubernetes side.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from proto import discovery_pb2 as pb
from proto import discovery_pb2_grpc as pb_grpc
from sidecar import identity, pki

Key = tuple[str, str]  # (namespace, name)


@dataclass
class FakeService:
    endpoints: list[pb.Endpoint] = field(default_factory=list)
    policy: pb.Policy = field(default_factory=lambda: pb.Policy(lb="weighted-round-robin", allow_any=True))
    ports: tuple[int, ...] = (50051,)
    selector: dict[str, str] = field(default_factory=dict)

    def snapshot(self, key: Key) -> pb.ServiceUpdate:
        return pb.ServiceUpdate(
            service=pb.ServiceRef(namespace=key[0], name=key[1]),
            exists=True,
            full=True,
            endpoints=self.endpoints,
            policy=self.policy,
            ports=self.ports,
            selector=self.selector,
        )


def missing(key: Key) -> pb.ServiceUpdate:
    return pb.ServiceUpdate(service=pb.ServiceRef(namespace=key[0], name=key[1]), exists=False, full=True)


def endpoint(address: str, port: int, *, weight: int = 100, tls: bool = True, ready: bool = True,
             serving: bool = True, terminating: bool = False, pod: str = "") -> pb.Endpoint:  # fmt: skip
    return pb.Endpoint(address=address, port=port, weight=weight, tls=tls, ready=ready, serving=serving,
                       terminating=terminating, pod=pod)  # fmt: skip


class _Stream:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.subscribed: set[Key] = set()
        self.grpc_services: set[str] = set()
        self.pod: Key | None = None
        self.outbox: queue.Queue[pb.WatchResponse | None] = queue.Queue()


class FakeControlPlane(pb_grpc.DiscoveryServicer):
    """Services by (namespace, name); pods' labels for `selecting`. Every change is pushed to the streams
    subscribed to it. `requests` records every WatchRequest received, `peers` every client identity."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.services: dict[Key, FakeService] = {}
        self.pod_labels: dict[Key, dict[str, str]] = {}
        self.streams: list[_Stream] = []
        self.requests: list[pb.WatchRequest] = []
        self.peers: list[str] = []
        self.refuse: str | None = None  # a status name: refuse every new Watch with it
        # As the real control plane: a pod it has not seen (no kuberpc.io/injected=true label) is waited for,
        # so `selecting` is not answered until pod_labels has it and something is pushed.
        self.known_pods_only = False

    # ---- what tests change ----

    def set_service(self, ns: str, name: str, service: FakeService) -> None:
        with self.lock:
            self.services[(ns, name)] = service
            self._push((ns, name), service.snapshot((ns, name)))

    def delta(self, ns: str, name: str, update: pb.ServiceUpdate) -> None:
        """Apply a delta the test built (endpoints added/replaced, `removed`, policy) and push it as it is."""
        key = (ns, name)
        with self.lock:
            svc = self.services[key]
            gone = {(r.address, r.port) for r in update.removed}
            changed = {(e.address, e.port): e for e in update.endpoints}
            svc.endpoints = [e for e in svc.endpoints if (e.address, e.port) not in gone | changed.keys()]
            svc.endpoints += list(changed.values())
            if update.HasField("policy"):
                svc.policy = update.policy
            update.service.CopyFrom(pb.ServiceRef(namespace=ns, name=name))
            update.exists = True
            update.full = False
            self._push(key, update)

    def delete_service(self, ns: str, name: str) -> None:
        with self.lock:
            self.services.pop((ns, name), None)
            self._push((ns, name), missing((ns, name)))

    def connected(self) -> int:
        with self.lock:
            return len(self.streams)

    # ---- the service ----

    def _push(self, key: Key, update: pb.ServiceUpdate) -> None:
        for s in self.streams:
            if key in s.subscribed:
                s.outbox.put(pb.WatchResponse(services=[update]))
        for s in self.streams:
            claims = [
                pb.GrpcServiceClaims(grpc_service=n, services=self._claiming(n))
                for n in sorted(s.grpc_services)
            ]
            if claims:
                for c in claims:
                    for ref in c.services:
                        self._subscribe(s, (ref.namespace, ref.name))
                s.outbox.put(pb.WatchResponse(claims=claims))
            if s.pod is not None and self._knows(s.pod):
                s.outbox.put(pb.WatchResponse(selecting=self._selecting(s.pod)))

    def _claiming(self, grpc_service: str) -> list[pb.ServiceRef]:
        return [
            pb.ServiceRef(namespace=k[0], name=k[1])
            for k, svc in sorted(self.services.items())
            if grpc_service in svc.policy.grpc_services
        ]

    def _knows(self, pod: Key) -> bool:
        return not self.known_pods_only or pod in self.pod_labels

    def _selecting(self, pod: Key) -> pb.Selecting:
        labels = self.pod_labels.get(pod, {})
        refs = [
            pb.ServiceRef(namespace=k[0], name=k[1])
            for k, svc in sorted(self.services.items())
            if k[0] == pod[0] and svc.selector and all(labels.get(a) == b for a, b in svc.selector.items())
        ]
        return pb.Selecting(services=refs)

    def _subscribe(self, s: _Stream, key: Key) -> None:
        if key in s.subscribed:
            return
        s.subscribed.add(key)
        svc = self.services.get(key)
        s.outbox.put(pb.WatchResponse(services=[svc.snapshot(key) if svc is not None else missing(key)]))

    def _handle(self, s: _Stream, request: pb.WatchRequest) -> None:
        with self.lock:
            self.requests.append(request)
            for ref in request.subscribe:
                self._subscribe(s, (ref.namespace, ref.name))
            for ref in request.unsubscribe:
                s.subscribed.discard((ref.namespace, ref.name))
            if request.grpc_services:
                claims = []
                for name in request.grpc_services:
                    s.grpc_services.add(name)
                    refs = self._claiming(name)
                    for ref in refs:
                        self._subscribe(s, (ref.namespace, ref.name))
                    claims.append(pb.GrpcServiceClaims(grpc_service=name, services=refs))
                s.outbox.put(pb.WatchResponse(claims=claims))
            if request.HasField("pod"):
                s.pod = (request.pod.namespace, request.pod.name)
                if not self._knows(s.pod):
                    return
                selecting = self._selecting(s.pod)
                for ref in selecting.services:
                    self._subscribe(s, (ref.namespace, ref.name))
                s.outbox.put(pb.WatchResponse(selecting=selecting))

    def Watch(  # the generated servicer's method name
        self, request_iterator: Iterator[pb.WatchRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.WatchResponse]:
        if self.refuse is not None:
            context.abort(getattr(grpc.StatusCode, self.refuse), "refused by the test")
        auth = context.auth_context()
        uris = [v.decode() for v in auth.get("x509_subject_alternative_name", [])]
        s = _Stream(",".join(uris))
        with self.lock:
            self.peers.append(s.peer)
            self.streams.append(s)

        def read() -> None:
            try:
                for request in request_iterator:
                    self._handle(s, request)
            except grpc.RpcError:
                pass
            finally:
                s.outbox.put(None)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        context.add_callback(lambda: s.outbox.put(None))
        try:
            while context.is_active():
                item = s.outbox.get()
                if item is None:
                    return
                yield item
        finally:
            with self.lock:
                if s in self.streams:
                    self.streams.remove(s)


@dataclass(frozen=True)
class ServerCert:
    key_pem: bytes
    chain_pem: bytes
    ca_pem: bytes


def server_cert(ca_dir_ca_key: bytes, ca_cert: bytes, dns_name: str = "localhost") -> ServerCert:
    issued = pki.issue_workload(
        pki.KeyPair(ca_cert, ca_dir_ca_key),
        identity=identity.SpiffeId("cluster.local", "kuberpc-system", "kuberpc-webhook"),
        dns_names=[dns_name],
    )
    return ServerCert(issued.key_pem, issued.cert_pem, ca_cert)


class RunningPlane:
    """One replica of the fake control plane on a port (restartable on the same port)."""

    def __init__(self, plane: FakeControlPlane, cert: ServerCert, port: int = 0) -> None:
        self.plane = plane
        self.cert = cert
        self.port = port
        self._server: grpc.Server | None = None

    def start(self) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(32))
        pb_grpc.add_DiscoveryServicer_to_server(self.plane, server)
        creds = grpc.ssl_server_credentials(
            [(self.cert.key_pem, self.cert.chain_pem)], root_certificates=self.cert.ca_pem, require_client_auth=True
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                # A port just released by a stopped replica may take grpc a moment to let go of.
                self.port = server.add_secure_port(f"127.0.0.1:{self.port}", creds)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None
        # A stopped server leaves its generators blocked on their outboxes: end them.
        with self.plane.lock:
            for s in list(self.plane.streams):
                s.outbox.put(None)


@contextlib.contextmanager
def running_plane(plane: FakeControlPlane, cert: ServerCert) -> Iterator[RunningPlane]:
    replica = RunningPlane(plane, cert)
    replica.start()
    try:
        yield replica
    finally:
        replica.stop()


def labels(pairs: Mapping[str, str]) -> dict[str, str]:
    return dict(pairs)
