"""A pod runner that plays the kubelet for the cluster tests: Pods bound to its Node run as real processes.

What it is: a Node registered with the real API server (its Lease renewed), and for each Pod the scheduler binds
to it, a network namespace on the pod bridge with the Pod's own address, its volumes (emptyDir, configMap,
secret, downwardAPI, projected ServiceAccount tokens from the TokenRequest API, refreshed; hostPath and
hostPath-backed PersistentVolumeClaims), its env (downward API fields, configMap/secret refs, $(VAR)
expansion), init containers in order, native sidecars started first and stopped last, postStart/preStop hooks,
startup/readiness/liveness probes (httpGet, tcpSocket, exec), restarts per restartPolicy, SIGTERM then SIGKILL
after the grace period, and the Pod's status written back so the real EndpointSlice controller does its job.
What it is not: a container runtime. Images are mapped to local commands (IMAGES); processes run as root on
the host's filesystem (runAsUser, readOnlyRootFilesystem and resource limits are checked by the API server's
admission, not enforced here); ClusterIP Services are not proxied: each pod's /etc/hosts maps Service names
to one ready endpoint address, which is all the mesh's control-plane addresses need.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from e2e import netns
from e2e.cluster.streaming import StreamingServer

log = logging.getLogger("kubelet")
REPO = Path(__file__).resolve().parents[2]
PYTHON_BIN = Path(sys.executable).parent

# image repository -> (ENTRYPOINT, CMD) of its Dockerfile; the project's images run from this checkout.
IMAGES: dict[str, tuple[list[str], list[str]]] = {
    "ghcr.io/kuberpc/proxy": (["python", "-m", "sidecar"], ["run"]),
    "ghcr.io/kuberpc/webhook": (["python", "-m", "webhook"], ["--help"]),
    "ghcr.io/kuberpc/arith-example": ([], ["python", "-m", "e2e.arith.server"]),
}
LEASE_SECONDS = 40
KUBELET_PORT = 10250  # the streaming endpoint (port-forward), as the Node's daemonEndpoints say
TICK = 0.1


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_repo(image: str) -> str:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known names are replaced, unknown ones kept, $$ escapes a $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def quantity(value: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


class Api:
    """The runner's only door to the API server; every call retries while the server is away."""

    def __init__(self, kubeconfig: str) -> None:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        cfg.retries = urllib3.Retry(0)  # type: ignore[attr-defined]
        self.client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.client)
        self.coord = client.CoordinationV1Api(self.client)
        self.discovery = client.DiscoveryV1Api(self.client)

    def retry(self, what: str, fn: Any, *args: Any, attempts: int = 0, **kwargs: Any) -> Any:
        """Call until it answers (or `attempts` are spent); ApiExceptions other than 5xx are raised."""
        n = 0
        while True:
            n += 1
            try:
                return fn(*args, _request_timeout=10, **kwargs)
            except ApiException as e:
                if e.status is not None and e.status < 500 and e.status != 429:
                    raise
                err: Exception = e
            except (urllib3.exceptions.HTTPError, OSError) as e:  # type: ignore[attr-defined]
                err = e
            if attempts and n >= attempts:
                raise err
            log.debug("api %s failed (%r); retrying", what, err)
            time.sleep(min(2.0, 0.2 * n))


# --- pod addresses and namespaces --------------------------------------------------------------------------


class Network:
    """Pod namespaces on the control plane's bridge, each with its own address."""

    def __init__(self, node_netns: str, subnet: str, run_id: str, prefix: str) -> None:
        self.node_netns = node_netns
        self.network = ipaddress.ip_network(subnet)
        self.run_id = run_id
        self.prefix = prefix
        self._lock = threading.Lock()
        self._used: set[str] = set()
        self._next_veth = 0
        self._hosts_text = "127.0.0.1 localhost\n"

    def allocate(self) -> tuple[str, str, str]:
        """(address, netns name, veth name), all fresh."""
        with self._lock:
            for host in list(self.network.hosts())[9:]:  # .1 is the bridge, .2 the control plane
                if str(host) not in self._used:
                    self._used.add(str(host))
                    break
            else:
                raise RuntimeError("no free pod address")
            self._next_veth += 1
            slot = self._next_veth
        return str(host), f"{self.prefix}p{slot}-{self.run_id}", f"kp{slot}"

    def create(self, address: str, ns: str, veth: str, pod_name: str) -> None:
        netns.ip("netns", "add", ns)
        netns.ip("-n", ns, "link", "set", "lo", "up")
        netns.ip("-n", self.node_netns, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        netns.ip("-n", self.node_netns, "link", "set", veth, "master", netns.BRIDGE, "up")
        netns.ip("-n", ns, "addr", "add", f"{address}/{self.network.prefixlen}", "dev", "eth0")
        netns.ip("-n", ns, "link", "set", "eth0", "up")
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(self._hosts_for(address, pod_name))

    def _hosts_for(self, address: str, pod_name: str) -> str:
        return f"{self._hosts_text}{address} {pod_name}\n"

    def set_service_hosts(self, text: str, pods: dict[str, tuple[str, str]]) -> None:
        """Rewrite every pod's /etc/hosts in place (a bind mount follows the inode, not the name)."""
        self._hosts_text = text
        for ns, (address, pod_name) in pods.items():
            path = Path("/etc/netns") / ns / "hosts"
            with contextlib.suppress(OSError), path.open("r+") as f:
                content = self._hosts_for(address, pod_name)
                f.write(content)
                f.truncate(len(content.encode()))

    def delete(self, address: str, ns: str) -> None:
        with contextlib.suppress(netns.NetnsError):
            netns.delete_netns(ns)
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        with self._lock:
            self._used.discard(address)


# --- containers ----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    spec: dict[str, Any]
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds", 10))

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds", 1))


@dataclass
class Container:
    spec: dict[str, Any]
    init: bool = False
    sidecar: bool = False
    proc: subprocess.Popen[bytes] | None = None
    started_at: str | None = None
    restarts: int = 0
    last_exit: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None
    waiting: str | None = "ContainerCreating"
    started: bool = False
    ready: bool = False
    restart_at: float = 0.0
    startup: Probe | None = None
    readiness: Probe | None = None
    liveness: Probe | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any]:
        state: dict[str, Any]
        if self.running():
            state = {"running": {"startedAt": self.started_at}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated}
        else:
            state = {"waiting": {"reason": self.waiting or "ContainerCreating"}}
        out: dict[str, Any] = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": state,
            "lastState": {"terminated": self.last_exit} if self.last_exit else {},
        }
        if self.proc is not None:
            out["containerID"] = f"kuberpc-runner://{self.proc.pid}"
        return out


# How long a pod waits for a ConfigMap or Secret its volumes name to exist (a kubelet waits without end).
SOURCE_WAIT_S = 120.0

class PodWorker(threading.Thread):
    """Everything one Pod goes through on this node, from its namespace to its deletion."""

    def __init__(self, runner: Runner, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner = runner
        self.pod = pod
        self.ns_name = str(meta["namespace"])
        self.name = str(meta["name"])
        self.uid = str(meta["uid"])
        self.dir = runner.state / "pods" / f"{self.ns_name}_{self.name}_{self.uid[:8]}"
        self.address, self.netns, self.veth = runner.network.allocate()
        self.deleting = threading.Event()
        self.grace: float = 30.0
        self.spec: dict[str, Any] = pod["spec"]
        self.inits = [
            Container(c, init=True, sidecar=c.get("restartPolicy") == "Always") for c in self.spec.get("initContainers") or []
        ]
        self.containers = [Container(c) for c in self.spec.get("containers") or []]
        for c in [*self.inits, *self.containers]:
            for kind in ("startup", "readiness", "liveness"):
                spec = c.spec.get(f"{kind}Probe")
                if spec and not (c.init and not c.sidecar):
                    setattr(c, kind, Probe(spec))
        self.phase = "Pending"
        self.initialized = False
        self.start_time = now()
        self.token_refresh: list[tuple[float, Path, dict[str, Any]]] = []
        self._last_status: str = ""
        self.restart_policy = self.spec.get("restartPolicy", "Always")

    # -- environment and volumes --

    def field(self, path: str) -> str:
        meta = self.pod["metadata"]
        simple = {
            "metadata.name": self.name,
            "metadata.namespace": self.ns_name,
            "metadata.uid": self.uid,
            "spec.nodeName": self.runner.node,
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": self.address,
            "status.podIPs": self.address,
            "status.hostIP": self.runner.host_ip,
            "status.hostIPs": self.runner.host_ip,
        }
        if path in simple:
            return simple[path]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        raise RuntimeError(f"fieldRef {path} is not supported by the pod runner")

    def resource(self, ref: dict[str, Any], container: dict[str, Any] | None) -> str:
        res = (container or {}).get("resources") or {}
        section, _, kind = str(ref["resource"]).partition(".")
        value = (res.get(section) or {}).get(kind)
        if value is None:
            value = "2" if kind == "cpu" else str(24 * 2**30)
        divisor = quantity(str(ref.get("divisor", "1")))
        amount = quantity(str(value)) / divisor
        return str(max(1, int(-(-amount // 1))) if kind == "cpu" else int(amount))

    def config_data(self, kind: str, name: str, optional: bool) -> dict[str, bytes] | None:
        """A ConfigMap's or Secret's data. One that does not exist yet is waited for, as a kubelet leaves the pod
        ContainerCreating (a new namespace's kube-root-ca.crt comes from the controller manager a moment after
        the namespace), for at most SOURCE_WAIT_S; an optional one is skipped at once."""
        api = self.runner.api
        deadline = time.monotonic() + SOURCE_WAIT_S
        while True:
            try:
                if kind == "configMap":
                    cm = api.retry("read configmap", api.core.read_namespaced_config_map, name, self.ns_name)
                    data = {k: v.encode() for k, v in (cm.data or {}).items()}
                    data.update({k: base64.b64decode(v) for k, v in (cm.binary_data or {}).items()})
                    return data
                sec = api.retry("read secret", api.core.read_namespaced_secret, name, self.ns_name)
                return {k: base64.b64decode(v) for k, v in (sec.data or {}).items()}
            except ApiException as e:
                if e.status == 404 and optional:
                    return None
                if e.status != 404 or time.monotonic() > deadline or self.deleting.wait(0.5):
                    raise

    def env(self, c: dict[str, Any]) -> dict[str, str]:
        env = {
            "PATH": f"{PYTHON_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/tmp",
            "HOSTNAME": self.name,
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "KUBERNETES_SERVICE_HOST": self.runner.api_host,
            "KUBERNETES_SERVICE_PORT": str(self.runner.api_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.runner.api_port),
        }
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind in ("configMap", "secret"):
                ref = src.get(f"{kind}Ref")
                if ref:
                    data = self.config_data(kind, ref["name"], bool(ref.get("optional"))) or {}
                    env.update({prefix + k: v.decode() for k, v in data.items()})
        for item in c.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = expand(str(item["value"]), env)
                continue
            vf = item.get("valueFrom") or {}
            if "fieldRef" in vf:
                env[name] = self.field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                env[name] = self.resource(vf["resourceFieldRef"], c)
            elif "configMapKeyRef" in vf or "secretKeyRef" in vf:
                kind = "configMap" if "configMapKeyRef" in vf else "secret"
                ref = vf[f"{kind}KeyRef"]
                data = self.config_data(kind, ref["name"], bool(ref.get("optional"))) or {}
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode()
            else:
                env[name] = ""
        return env

    def token(self, source: dict[str, Any]) -> tuple[bytes, float]:
        api = self.runner.api
        seconds = int(source.get("expirationSeconds", 3600))
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[source["audience"]] if source.get("audience") else [],
                expiration_seconds=seconds,
                bound_object_ref=client.V1BoundObjectReference(api_version="v1", kind="Pod", name=self.name, uid=self.uid),
            )
        )
        sa = self.spec.get("serviceAccountName", "default")
        got = api.retry("token request", api.core.create_namespaced_service_account_token, sa, self.ns_name, body)
        ttl = (got.status.expiration_timestamp - dt.datetime.now(dt.UTC)).total_seconds()
        # As the kubelet: refresh at 80 % of the lifetime (or after 24 h).
        return got.status.token.encode(), time.monotonic() + min(0.8 * ttl, 86400)

    @staticmethod
    def write(path: Path, data: bytes, mode: int = 0o644) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(mode)
        tmp.replace(path)  # atomic within the directory the container sees through its bind mount

    def items(self, data: dict[str, bytes], items: list[dict[str, Any]] | None) -> dict[str, bytes]:
        if not items:
            return dict(data)
        return {i["path"]: data[i["key"]] for i in items if i["key"] in data}

    def volumes(self) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for vol in self.spec.get("volumes") or []:
            name = vol["name"]
            path = self.dir / "volumes" / name
            if "hostPath" in vol:
                host = Path(vol["hostPath"]["path"])
                host.mkdir(parents=True, exist_ok=True)
                out[name] = host
                continue
            if "persistentVolumeClaim" in vol:
                out[name] = self.claim_path(vol["persistentVolumeClaim"]["claimName"])
                continue
            if "emptyDir" in vol and (vol["emptyDir"] or {}).get("medium") == "Memory":
                path = Path("/dev/shm") / f"kuberpc-{self.uid}-{name}"
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
            out[name] = path
            if "emptyDir" in vol:
                continue
            if "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                src = vol[kind]
                data = self.config_data(kind, src.get("name") or src.get("secretName"), bool(src.get("optional")))
                for rel, value in self.items(data or {}, src.get("items")).items():
                    self.write(path / rel, value)
            elif "downwardAPI" in vol:
                for item in vol["downwardAPI"]["items"]:
                    self.write(path / item["path"], self.field(item["fieldRef"]["fieldPath"]).encode())
            elif "projected" in vol:
                for source in vol["projected"]["sources"]:
                    self.project(path, source)
            else:
                raise RuntimeError(f"volume {name}: this kind is not supported by the pod runner")
        return out

    def project(self, path: Path, source: dict[str, Any]) -> None:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            token, refresh_at = self.token(sat)
            self.write(path / sat["path"], token, 0o600)
            self.token_refresh.append((refresh_at, path / sat["path"], sat))
        for kind in ("configMap", "secret"):
            if kind in source:
                src = source[kind]
                data = self.config_data(kind, src["name"], bool(src.get("optional")))
                for rel, value in self.items(data or {}, src.get("items")).items():
                    self.write(path / rel, value)
        if "downwardAPI" in source:
            for item in source["downwardAPI"]["items"]:
                self.write(path / item["path"], self.field(item["fieldRef"]["fieldPath"]).encode())

    def refresh_tokens(self) -> None:
        due = [t for t in self.token_refresh if t[0] <= time.monotonic()]
        for entry in due:
            self.token_refresh.remove(entry)
            _, file, sat = entry
            try:
                token, refresh_at = self.token(sat)
            except ApiException:
                refresh_at, token = time.monotonic() + 5, b""
            if token:
                self.write(file, token, 0o600)
            self.token_refresh.append((refresh_at, file, sat))

    def claim_path(self, claim: str) -> Path:
        api = self.runner.api
        pvc = api.retry("read pvc", api.core.read_namespaced_persistent_volume_claim, claim, self.ns_name)
        pv = api.retry("read pv", api.core.read_persistent_volume, pvc.spec.volume_name)
        if pv.spec.host_path is None:
            raise RuntimeError(f"claim {claim}: only hostPath PersistentVolumes are supported by the pod runner")
        host = Path(pv.spec.host_path.path)
        host.mkdir(parents=True, exist_ok=True)
        return host

    # -- processes --

    def argv(self, c: dict[str, Any], env: dict[str, str]) -> list[str]:
        repo = image_repo(str(c.get("image", "")))
        if repo not in IMAGES:
            raise RuntimeError(f"image {c.get('image')!r} is not one the pod runner knows ({', '.join(IMAGES)})")
        entrypoint, cmd = IMAGES[repo]
        if c.get("command"):
            argv = list(c["command"]) + list(c.get("args") or [])
        else:
            argv = entrypoint + (list(c["args"]) if c.get("args") else cmd)
        return [expand(str(a), env) for a in argv]

    def wrapped(self, c: dict[str, Any], argv: list[str]) -> list[str]:
        mounts: list[str] = []
        for m in c.get("volumeMounts") or []:
            src = self.vols[m["name"]]
            if m.get("subPath"):
                src = src / m["subPath"]
            mounts += ["--mount", f"{src}:{m['mountPath']}" + (":ro" if m.get("readOnly") else "")]
        workdir = c.get("workingDir") or str(REPO)
        return netns.exec_argv(
            self.netns,
            [sys.executable, "-m", "e2e.cluster.container", *mounts, "--workdir", workdir,
             "--keep", str(REPO), "--keep", sys.prefix, "--keep", sys.base_prefix, "--", *argv],
        )

    def start_container(self, c: Container) -> None:
        env = self.env(c.spec)
        argv = self.argv(c.spec, env)
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{c.name}.log").open("ab") as out:
            out.write(f"--- {now()} start {argv}\n".encode())
            out.flush()
            c.proc = subprocess.Popen(
                self.wrapped(c.spec, argv), env=env, cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )
        c.started_at = now()
        c.terminated = None
        c.waiting = None
        c.started = c.startup is None and not c.spec.get("lifecycle", {}).get("postStart")
        c.ready = False
        for p in (c.startup, c.readiness, c.liveness):
            if p is not None:
                p.successes = p.failures = 0
                p.next_at = time.monotonic() + float(p.spec.get("initialDelaySeconds", 0))
        hook = (c.spec.get("lifecycle") or {}).get("postStart")
        if hook:
            # The kubelet starts the next container only when the postStart hook returns.
            if not self.handler(hook, c, timeout=float(self.grace) + 120):
                self.signal(c, signal.SIGKILL)
                log.info("pod %s/%s container %s postStart hook failed", self.ns_name, self.name, c.name)
            c.started = c.startup is None
        log.info("pod %s/%s container %s started pid=%s", self.ns_name, self.name, c.name, c.proc.pid)

    def exec_in(self, c: Container, command: list[str], timeout: float) -> bool:
        env = self.env(c.spec)
        try:
            done = subprocess.run(
                self.wrapped(c.spec, command), env=env, cwd=str(REPO), capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def port(self, c: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for spec in [*self.inits, *self.containers]:
            for p in spec.spec.get("ports") or []:
                if p.get("name") == port:
                    return int(p["containerPort"])
        raise RuntimeError(f"named port {port} not found")

    def handler(self, h: dict[str, Any], c: Container, timeout: float) -> bool:
        """An exec, httpGet or tcpSocket action (probe or hook); True when it succeeded."""
        try:
            if "exec" in h:
                return self.exec_in(c, list(h["exec"]["command"]), timeout)
            if "httpGet" in h:
                g = h["httpGet"]
                host, port = g.get("host") or self.address, self.port(c, g["port"])
                conn: http.client.HTTPConnection
                if str(g.get("scheme", "HTTP")).upper() == "HTTPS":  # the kubelet does not verify the certificate
                    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl._create_unverified_context())
                else:
                    conn = http.client.HTTPConnection(host, port, timeout=timeout)
                try:
                    conn.request("GET", g.get("path", "/"), headers={"User-Agent": "kube-probe/1.36"})
                    return 200 <= conn.getresponse().status < 400
                finally:
                    conn.close()
            if "tcpSocket" in h:
                with socket.create_connection((self.address, self.port(c, h["tcpSocket"]["port"])), timeout=timeout):
                    return True
            if "sleep" in h:
                time.sleep(float(h["sleep"]["seconds"]))
                return True
        except (OSError, http.client.HTTPException):
            return False
        return False

    def signal(self, c: Container, sig: int) -> None:
        if c.proc is not None and c.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.proc.pid, sig)

    def reap(self, c: Container) -> bool:
        """Record an exit; True when the container just exited."""
        if c.proc is None or c.terminated is not None or c.proc.poll() is None:
            return False
        code = c.proc.returncode
        code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a runtime reports it
        c.terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": c.started_at,
            "finishedAt": now(),
        }
        c.ready = False
        c.started = False
        log.info("pod %s/%s container %s exited code=%d", self.ns_name, self.name, c.name, code)
        return True

    def should_restart(self, c: Container) -> bool:
        if c.sidecar:
            return True
        policy = self.restart_policy
        code = (c.terminated or {}).get("exitCode", 0)
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def restart_later(self, c: Container) -> None:
        c.last_exit = c.terminated
        c.waiting = "CrashLoopBackOff" if c.restarts else None
        c.restart_at = time.monotonic() + min(10.0, 0.5 * 2 ** min(c.restarts, 5))

    def probe(self, c: Container) -> None:
        t = time.monotonic()
        if not c.running():
            return
        if c.startup is not None and not c.started:
            p = c.startup
            if t >= p.next_at:
                p.next_at = t + p.period
                if self.handler(p.spec, c, p.timeout):
                    c.started = True
                else:
                    p.failures += 1
                    if p.failures >= int(p.spec.get("failureThreshold", 3)):
                        log.info("pod %s/%s container %s startup probe failed", self.ns_name, self.name, c.name)
                        self.signal(c, signal.SIGKILL)
            return
        if c.readiness is not None:
            p = c.readiness
            if t >= p.next_at:
                p.next_at = t + p.period
                if self.handler(p.spec, c, p.timeout):
                    p.failures = 0
                    p.successes += 1
                    if p.successes >= int(p.spec.get("successThreshold", 1)):
                        c.ready = True
                else:
                    p.successes = 0
                    p.failures += 1
                    if p.failures >= int(p.spec.get("failureThreshold", 3)) and c.ready:
                        log.info("pod %s/%s container %s not ready: readiness probe failed", self.ns_name, self.name, c.name)
                        c.ready = False
        else:
            c.ready = c.started
        if c.liveness is not None:
            p = c.liveness
            if t >= p.next_at:
                p.next_at = t + p.period
                if self.handler(p.spec, c, p.timeout):
                    p.failures = 0
                else:
                    p.failures += 1
                    if p.failures >= int(p.spec.get("failureThreshold", 3)):
                        log.info("pod %s/%s container %s liveness probe failed", self.ns_name, self.name, c.name)
                        self.signal(c, signal.SIGKILL)

    # -- status --

    def status(self) -> dict[str, Any]:
        t = now()
        regular_ready = all(c.ready for c in self.containers) and all(c.ready for c in self.inits if c.sidecar)
        ready = self.phase == "Running" and regular_ready and not self.deleting.is_set()

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None, "lastTransitionTime": t}

        return {
            "phase": self.phase,
            "hostIP": self.runner.host_ip,
            "hostIPs": [{"ip": self.runner.host_ip}],
            "podIP": self.address,
            "podIPs": [{"ip": self.address}],
            "startTime": self.start_time,
            "conditions": [
                cond("PodReadyToStartContainers", True),
                cond("Initialized", self.initialized),
                cond("ContainersReady", ready),
                cond("Ready", ready),
            ],
            "initContainerStatuses": [c.status() for c in self.inits],
            "containerStatuses": [c.status() for c in self.containers],
        }

    def publish(self, force: bool = False) -> None:
        status = self.status()
        # Transition times change every second: compare without them.
        key = json.dumps({**status, "conditions": [(c["type"], c["status"]) for c in status["conditions"]]}, sort_keys=True)
        if key == self._last_status and not force:
            return
        api = self.runner.api
        try:
            api.retry("pod status", api.core.patch_namespaced_pod_status, self.name, self.ns_name, {"status": status}, attempts=3)
        except ApiException as e:
            if e.status == 404:
                self.deleting.set()
                return
            raise
        except Exception as e:  # the API server is away: the next tick tries again
            log.debug("status of %s/%s not written: %r", self.ns_name, self.name, e)
            return
        self._last_status = key

    # -- the life of the pod --

    def run(self) -> None:
        try:
            self.live()
        except Exception:
            log.exception("pod %s/%s failed in the runner", self.ns_name, self.name)
            self.phase = "Failed"
            with contextlib.suppress(Exception):
                self.publish(force=True)
        finally:
            self.teardown()

    def tick(self) -> bool:
        """One round of supervision; False once the pod should stop waiting here."""
        if self.deleting.is_set():
            return False
        self.refresh_tokens()
        for c in [*(c for c in self.inits if c.sidecar), *self.containers]:
            if c.proc is None:
                continue
            if self.reap(c) and self.should_restart(c):
                self.restart_later(c)
            if c.terminated is not None and c.restart_at and time.monotonic() >= c.restart_at:
                c.restart_at = 0.0
                c.restarts += 1
                self.start_container(c)
            self.probe(c)
        self.publish()
        time.sleep(TICK)
        return True

    def live(self) -> None:
        self.runner.network.create(self.address, self.netns, self.veth, self.name)
        self.runner.register_netns(self.netns, self.address, self.name)
        where = self.runner.state / "where" / self.ns_name
        where.mkdir(parents=True, exist_ok=True)
        (where / self.name).write_text(json.dumps({"netns": self.netns, "ip": self.address, "uid": self.uid, "dir": str(self.dir)}))
        self.vols = self.volumes()
        self.publish()
        for c in self.inits:
            if c.sidecar:
                self.start_container(c)
                while not c.started:  # the next init container starts once this sidecar has started
                    if not self.tick():
                        return
                continue
            while True:
                self.start_container(c)
                while c.running():
                    if not self.tick():
                        return
                self.reap(c)
                if (c.terminated or {}).get("exitCode") == 0:
                    break
                if self.restart_policy == "Never":
                    self.phase = "Failed"
                    self.publish()
                    self.finish_sidecars()
                    return
                c.restarts += 1
                time.sleep(min(10.0, 0.5 * 2 ** min(c.restarts, 5)))
        self.initialized = True
        for c in self.containers:
            self.start_container(c)
        self.phase = "Running"
        while self.tick():
            regular = self.containers
            if all(c.terminated is not None and not c.restart_at for c in regular):
                failed = any(c.terminated and c.terminated["exitCode"] != 0 for c in regular)
                self.finish_sidecars()
                self.phase = "Failed" if failed else "Succeeded"
                self.publish(force=True)
                return

    def stop(self, containers: list[Container], grace_until: float) -> None:
        for c in containers:
            hook = (c.spec.get("lifecycle") or {}).get("preStop")
            if hook and c.running():
                self.handler(hook, c, timeout=max(0.1, grace_until - time.monotonic()))
        for c in containers:
            self.signal(c, signal.SIGTERM)
        while time.monotonic() < grace_until and any(c.running() for c in containers):
            time.sleep(0.05)
        for c in containers:
            self.signal(c, signal.SIGKILL)
            if c.proc is not None:
                c.proc.wait()
            self.reap(c)

    def finish_sidecars(self) -> None:
        for c in reversed([c for c in self.inits if c.sidecar]):  # in reverse order of their start
            self.stop([c], time.monotonic() + self.grace)

    def terminate(self, grace: float) -> None:
        self.grace = grace
        self.deleting.set()

    def teardown(self) -> None:
        deadline = time.monotonic() + self.grace
        self.stop(self.containers, deadline)
        for c in reversed([c for c in self.inits if c.sidecar]):
            self.stop([c], max(deadline, time.monotonic() + 2))
        self.runner.unregister_netns(self.netns)
        self.runner.network.delete(self.address, self.netns)
        for vol in (self.spec.get("volumes") or []):
            shutil.rmtree(Path("/dev/shm") / f"kuberpc-{self.uid}-{vol['name']}", ignore_errors=True)
        api = self.runner.api
        if self.pod["metadata"].get("deletionTimestamp") or self.deleting.is_set():
            with contextlib.suppress(Exception):
                self.publish(force=True)
            body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid))
            with contextlib.suppress(ApiException):
                api.retry("delete pod", api.core.delete_namespaced_pod, self.name, self.ns_name, body=body, attempts=50)
        self.runner.forget(self.uid)
        log.info("pod %s/%s torn down", self.ns_name, self.name)


# --- the node ------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    api: Api
    node: str
    host_ip: str
    api_host: str
    api_port: int
    network: Network
    state: Path
    workers: dict[str, PodWorker] = field(default_factory=dict)
    _netns: dict[str, tuple[str, str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    done: set[str] = field(default_factory=set)  # uids finished here: late events must not restart them

    def register_netns(self, ns: str, address: str, pod: str) -> None:
        with self._lock:
            self._netns[ns] = (address, pod)

    def unregister_netns(self, ns: str) -> None:
        with self._lock:
            self._netns.pop(ns, None)

    def forget(self, uid: str) -> None:
        with self._lock:
            self.workers.pop(uid, None)
            self.done.add(uid)

    def register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
        }
        with contextlib.suppress(ApiException):
            self.api.retry("create node", self.api.core.create_node, body)
        self.node_status()

    def node_status(self) -> None:
        t = now()
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "200", "ephemeral-storage": "100Gi"}
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": self.host_ip}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kuberpc pod runner",
                 "lastHeartbeatTime": t, "lastTransitionTime": t},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.36.3", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
                "containerRuntimeVersion": "kuberpc-runner://1", "kernelVersion": os.uname().release, "osImage": "test",
                "machineID": "", "systemUUID": "", "bootID": "",
            },
        }
        self.api.retry("node status", self.api.core.patch_node_status, self.node, {"status": status})

    def heartbeat(self) -> None:
        """The node lease every 10 s and the Ready condition every minute, as a kubelet keeps them."""
        last_status = time.monotonic()
        while not self.stopping.is_set():
            try:
                lease_body = {
                    "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                    "spec": {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS,
                             "renewTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
                }
                try:
                    self.api.coord.patch_namespaced_lease(self.node, "kube-node-lease", lease_body, _request_timeout=5)
                except ApiException as e:
                    if e.status != 404:
                        raise
                    self.api.coord.create_namespaced_lease("kube-node-lease", lease_body, _request_timeout=5)
                if time.monotonic() - last_status > 60:
                    self.node_status()
                    last_status = time.monotonic()
            except Exception as e:
                log.debug("heartbeat failed: %r", e)
            self.stopping.wait(10)

    def service_hosts(self) -> None:
        """Keep every pod's /etc/hosts mapping Service names to a ready endpoint (there is no kube-proxy here)."""
        last = ""
        last_pods: Any = set()
        while not self.stopping.is_set():
            try:
                slices = self.api.discovery.list_endpoint_slice_for_all_namespaces(_request_timeout=5)
                names: dict[str, str] = {}
                for s in sorted(slices.items, key=lambda s: s.metadata.name):
                    svc = (s.metadata.labels or {}).get("kubernetes.io/service-name")
                    if not svc or s.address_type != "IPv4":
                        continue
                    for ep in s.endpoints or []:
                        if ep.conditions is not None and ep.conditions.ready and ep.addresses:
                            names.setdefault(f"{svc}.{s.metadata.namespace}", ep.addresses[0])
                            break
                text = "127.0.0.1 localhost\n" + "".join(
                    f"{ip} {n}.svc.cluster.local {n}.svc {n}\n" for n, ip in sorted(names.items())
                )
                with self._lock:
                    pods = dict(self._netns)
                # A pod whose namespace was made while the text changed may hold the old one: rewrite on either.
                if text != last or pods.keys() != last_pods:
                    self.network.set_service_hosts(text, pods)
                    last, last_pods = text, pods.keys()
            except Exception as e:
                log.debug("service hosts not refreshed: %r", e)
            self.stopping.wait(0.5)

    def handle(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        phase = (pod.get("status") or {}).get("phase")
        with self._lock:
            if uid in self.done:
                return
            worker = self.workers.get(uid)
            if worker is None:
                if meta.get("deletionTimestamp") is not None and phase in ("Succeeded", "Failed", None, "Pending"):
                    # Never started here (or already finished): nothing to stop, just let it go.
                    if phase in ("Succeeded", "Failed") or not (pod.get("status") or {}).get("podIP"):
                        body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid))
                        with contextlib.suppress(Exception):
                            self.api.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body, _request_timeout=5)
                        return
                if phase in ("Succeeded", "Failed"):
                    return
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
        worker.pod = pod
        if meta.get("deletionTimestamp") is not None and not worker.deleting.is_set():
            grace = meta.get("deletionGracePeriodSeconds")
            worker.terminate(float(grace if grace is not None else pod["spec"].get("terminationGracePeriodSeconds", 30)))

    def watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node}"
        while not self.stopping.is_set():
            try:
                listing = self.api.core.list_pod_for_all_namespaces(field_selector=selector, _request_timeout=10)
                rv = listing.metadata.resource_version
                for item in listing.items:
                    self.handle(self.api.client.sanitize_for_serialization(item))
                w = watch.Watch()
                for event in w.stream(
                    self.api.core.list_pod_for_all_namespaces, field_selector=selector, resource_version=rv,
                    timeout_seconds=60, _request_timeout=70,
                ):
                    obj = event["object"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self.handle(self.api.client.sanitize_for_serialization(obj))
                    elif event["type"] == "ERROR":
                        break
            except Exception as e:
                log.info("pod watch restarting: %r", e)
                self.stopping.wait(0.5)

    def netns_of(self, namespace: str, pod: str) -> str | None:
        """The network namespace of a running pod of this node (for port-forward), None if there is none."""
        with self._lock:
            workers = list(self.workers.values())
        return next((w.netns for w in workers if (w.ns_name, w.name) == (namespace, pod) and not w.deleting.is_set()), None)

    def shutdown(self) -> None:
        self.stopping.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.terminate(2.0)
        for w in workers:
            w.join(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node", default="node-1")
    parser.add_argument("--node-netns", required=True, help="the namespace holding the pod bridge")
    parser.add_argument("--subnet", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--api", required=True, help="host:port pods use for the API (KUBERNETES_SERVICE_*)")
    parser.add_argument("--state", required=True, type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    host, _, port = args.api.rpartition(":")
    net = Network(args.node_netns, args.subnet, args.run_id, args.prefix)
    gateway = str(next(ipaddress.ip_network(args.subnet).hosts()))
    runner = Runner(Api(args.kubeconfig), args.node, gateway, host, int(port), net, args.state)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    StreamingServer(gateway, KUBELET_PORT, runner.netns_of).start()
    runner.register_node()
    for target in (runner.heartbeat, runner.service_hosts, runner.watch_pods):
        threading.Thread(target=target, name=target.__name__, daemon=True).start()
    print("runner ready", flush=True)
    stop.wait()
    runner.shutdown()


if __name__ == "__main__":
    main()
