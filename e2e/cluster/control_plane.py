"""A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

They run in their own network namespace on a bridge shared with the pods (as a control-plane node would), so
the API server calls webhooks at pod addresses and pods reach the API without touching the host's network.
The test process reaches the API through a loopback forwarder. Test infrastructure, never shipped.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yaml

from e2e import netns
from e2e.cluster.forward import Forwarder
from e2e.cluster.pki import ClusterPKI

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "e2e" / "cluster" / "build-k8s.sh"
PREFIX = "kcl-"
SUBNET = "203.0.113.0/24"
API_ADDRESS = "203.0.113.2"  # the control-plane node's address on the pod bridge
API_PORT = 6443
SERVICE_RANGE = "198.51.100.0/24"  # ClusterIPs are only allocated: nothing here routes or proxies them
ISSUER = "https://kubernetes.default.svc.cluster.local"
READY_TIMEOUT = 90.0


def build_binaries() -> Path:
    """The bin directory holding kube-apiserver, kube-controller-manager, kube-scheduler and kubectl."""
    done = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building Kubernetes failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def etcd_binary() -> str | None:
    for candidate in ("/usr/bin/etcd", "/usr/local/bin/etcd"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> str:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority-data": b64(ca)}}],
            "users": [{"name": "admin", "user": {"client-certificate-data": b64(cert), "client-key-data": b64(key)}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }
    )


@dataclass
class ControlPlane:
    """`with ControlPlane(workdir) as cp:` starts everything and waits for /readyz; exit tears it all down."""

    workdir: Path
    bin_dir: Path = field(default_factory=build_binaries)
    net: netns.Cluster = field(init=False)
    node: netns.Pod = field(init=False)
    procs: dict[str, netns.NetnsProcess] = field(default_factory=dict, init=False)
    forwarder: Forwarder = field(init=False)
    kubeconfig: Path = field(init=False)  # for this namespace: https://127.0.0.1:<forwarded port>
    inside_kubeconfig: Path = field(init=False)  # for the control-plane namespace itself
    pod_kubeconfig: Path = field(init=False)  # for anything on the pod bridge (the pod runner)

    def __enter__(self) -> ControlPlane:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"

    def start(self) -> None:
        etcd = etcd_binary()
        if etcd is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        self._etcd = etcd
        self.pki = ClusterPKI(self.workdir / "pki")
        admin = self.pki.issue("admin", "kuberpc-admin", org="system:masters")
        self.serving = self.pki.issue(
            "apiserver",
            "kube-apiserver",
            server=True,
            dns=["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"],
            ips=["127.0.0.1", API_ADDRESS, str(next(ipaddress.ip_network(SERVICE_RANGE).hosts()))],  # the kubernetes Service
        )
        self.admin = admin
        netns.remove_leftovers(PREFIX)
        self.net = netns.Cluster(subnet=SUBNET, prefix=PREFIX)
        self.net.start()
        self.node = self.net.add_pod("cp", API_ADDRESS)
        self.inside_kubeconfig = self.workdir / "kubeconfig-inside"
        self.inside_kubeconfig.write_text(
            kubeconfig(f"https://127.0.0.1:{API_PORT}", self.pki.ca.cert, admin.cert, admin.key)
        )
        self.pod_kubeconfig = self.workdir / "kubeconfig-bridge"
        self.pod_kubeconfig.write_text(
            kubeconfig(f"https://{API_ADDRESS}:{API_PORT}", self.pki.ca.cert, admin.cert, admin.key)
        )
        self._start_etcd()
        self.start_apiserver()
        self.forwarder = Forwarder(self.node.netns, "127.0.0.1", API_PORT).__enter__()
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(
            kubeconfig(f"https://127.0.0.1:{self.forwarder.port}", self.pki.ca.cert, admin.cert, admin.key)
        )
        self.wait_ready()
        self._start_controllers()

    def _spawn(self, name: str, argv: list[str]) -> None:
        self.procs[name] = netns.spawn(
            self.node.netns, argv, name=name, log_dir=self.logs, env={"PATH": os.environ.get("PATH", "")}, cwd=self.workdir
        )

    def _start_etcd(self) -> None:
        data = Path("/dev/shm") / f"kuberpc-etcd-{self.net.run_id}"  # memory: fsync costs nothing
        self._etcd_data = data
        self._spawn(
            "etcd",
            [
                self._etcd, "--name", "test", "--data-dir", str(data),
                "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "test=http://127.0.0.1:2380", "--log-level", "warn",
                # As kubeadm runs it: progress notifications let the API server's watch cache move on.
                "--experimental-watch-progress-notify-interval=5s",
            ],
        )

    def start_apiserver(self) -> None:
        pki = self.pki
        self._spawn(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                "--etcd-servers=http://127.0.0.1:2379",
                "--bind-address=0.0.0.0", f"--secure-port={API_PORT}", f"--advertise-address={API_ADDRESS}",
                f"--tls-cert-file={self.serving.cert}", f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={pki.ca.cert}",
                f"--service-account-issuer={ISSUER}", f"--api-audiences={ISSUER}",
                f"--service-account-key-file={pki.sa_pub}", f"--service-account-signing-key-file={pki.sa_key}",
                "--authorization-mode=RBAC", f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--allow-privileged=true",
                # The pod runner's Node has no resolvable host name: port-forward reaches it at its InternalIP.
                "--kubelet-preferred-address-types=InternalIP",
                # Webhook calls go to a ready endpoint of the webhook Service (there is no kube-proxy here).
                "--enable-aggregator-routing=true",
                "--profiling=false", "--v=1",
            ],
        )

    def _start_controllers(self) -> None:
        pki = self.pki
        kc = str(self.inside_kubeconfig)
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}", f"--cluster-signing-key-file={pki.ca.key}",
                "--use-service-account-credentials=false", "--leader-elect=false",
                "--bind-address=127.0.0.1", "--secure-port=10257", "--profiling=false", "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259", "--profiling=false", "--v=1",
            ],
        )

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        ctx.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return ctx

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        url = f"https://127.0.0.1:{self.forwarder.port}{path}"
        try:
            with urllib.request.urlopen(url, context=self.ssl_context(), timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            api = self.procs["kube-apiserver"]
            if not api.alive():
                raise RuntimeError(f"kube-apiserver exited:\n{tail(api.stderr_path)}")
            try:
                status, body = self.get("/readyz", timeout=2)
                if status == 200:
                    return
                last = body.decode(errors="replace")[-400:]
            except OSError as e:
                last = repr(e)
            time.sleep(0.2)
        raise RuntimeError(f"kube-apiserver not ready in {timeout:.0f}s: {last}")

    def kill_apiserver(self) -> None:
        """SIGKILL: the API server does not reliably exit on SIGTERM, and a crash is the harder case anyway."""
        self.procs["kube-apiserver"].kill()

    def restart_apiserver(self) -> None:
        self.kill_apiserver()
        self.start_apiserver()
        self.wait_ready()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def kubectl_json(self, *args: str) -> dict[str, object]:
        out: dict[str, object] = json.loads(self.kubectl(*args, "-o", "json").stdout)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.forwarder.__exit__(None, None, None)
        netns.stop(reversed(list(self.procs.values())), timeout=3)
        with contextlib.suppress(Exception):
            self.net.close()
        with contextlib.suppress(Exception):
            subprocess.run(["rm", "-rf", str(self._etcd_data)], check=False)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


if __name__ == "__main__":  # `python -m e2e.cluster.control_plane DIR`: a control plane to poke at by hand
    with ControlPlane(Path(sys.argv[1])) as cp:
        print(f"KUBECONFIG={cp.kubeconfig}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
