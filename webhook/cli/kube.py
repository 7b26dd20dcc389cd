"""The `kuberpc` command's only door to the cluster: the `kubernetes` client, wrapped.

Reads what the commands show (meshed pods, a proxy's /metrics through the API server's pod proxy) and
turns every client error into a CliError naming what failed. Decides nothing.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.stream import portforward

from webhook import annotations as a
from webhook.cli.forward import Tunnel, local_port

MESHED_SELECTOR = f"{a.INJECTED}={a.INJECTED_LABEL_VALUE}"
FINISHED = ("Succeeded", "Failed")  # pod phases after which no container runs again


class CliError(Exception):
    """A failure the user can act on; the message says what failed and, when known, why."""


@dataclass(frozen=True, slots=True)
class Pod:
    """What the commands need of a meshed Pod."""

    namespace: str
    name: str
    workload: str  # "deploy/web", "sts/db", "pod/lonely": the controller the pod belongs to
    proxy_version: str
    proxy_ready: bool
    created: float  # seconds since the epoch


def _workload(pod: Any) -> str:
    owners = pod.metadata.owner_references or []
    controller = next((o for o in owners if o.controller), owners[0] if owners else None)
    if controller is None:
        return f"pod/{pod.metadata.name}"
    if controller.kind == "ReplicaSet":
        template_hash = (pod.metadata.labels or {}).get("pod-template-hash")
        if template_hash and controller.name.endswith("-" + template_hash):
            return "deploy/" + str(controller.name)[: -len(template_hash) - 1]
        return f"rs/{controller.name}"
    short = {"StatefulSet": "sts", "DaemonSet": "ds", "Job": "job"}.get(
        controller.kind, controller.kind.lower()
    )
    return f"{short}/{controller.name}"


def _pod(p: Any) -> Pod:
    """The client's V1Pod (a wire object: fields may be None) as the facts the commands use."""
    meta = p.metadata
    return Pod(
        namespace=str(meta.namespace),
        name=str(meta.name),
        workload=_workload(p),
        proxy_version=str((meta.annotations or {}).get(a.INJECTED, "?")),
        proxy_ready=_proxy_ready(p),
        created=meta.creation_timestamp.timestamp() if meta.creation_timestamp else 0.0,
    )


def _name(pod: Any) -> str:
    return str(pod.metadata.name)


def _all_ready(pod: Any) -> bool:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    return bool(statuses) and all(bool(c.ready) for c in statuses)


def _proxy_ready(pod: Any) -> bool:
    status = pod.status
    for s in [*(status.init_container_statuses or []), *(status.container_statuses or [])] if status else []:
        if s.name == a.PROXY_CONTAINER:
            return bool(s.ready)
    return False


class Cluster:
    """One API server, as the kubeconfig (and --context) or the pod's service account names it."""

    def __init__(self, *, context: str | None = None, kubeconfig: str | None = None) -> None:
        try:
            self._api = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, context=context
            )
        except (ConfigException, OSError, TypeError) as e:
            if kubeconfig is not None or context is not None:
                raise CliError(f"cannot use the kubeconfig: {e}") from e
            try:  # inside a pod, without a kubeconfig: its service account
                cfg = client.Configuration()
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            except ConfigException as e2:
                raise CliError(f"no kubeconfig and not in a cluster: {e}") from e2
            self._api = client.ApiClient(cfg)
        self._core = client.CoreV1Api(self._api)

    def close(self) -> None:
        self._api.close()

    def version(self) -> tuple[int, int]:
        """The API server's version (major, minor)."""
        try:
            info = client.VersionApi(self._api).get_code(_request_timeout=10)
            return int(info.major), int("".join(ch for ch in info.minor if ch.isdigit()))
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"reading the API server's version: {_reason(e)}") from e
        except ValueError as e:
            raise CliError(f"the API server reports an unreadable version: {e}") from e

    def pods_asking_for_a_proxy(self, namespace: str | None) -> list[tuple[str, str, bool, str]]:
        """(namespace, name, injected, why) of every pod, in `namespace` or everywhere (None), that asks for a
        proxy: annotated kuberpc.io/inject: enabled, or in a namespace labelled kuberpc.io/inject=enabled
        without saying disabled (the pod's annotation wins)."""
        try:
            if namespace is None:
                found = self._core.list_pod_for_all_namespaces(_request_timeout=30)
            else:
                found = self._core.list_namespaced_pod(namespace, _request_timeout=30)
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"listing pods: {_reason(e)}") from e
        # Only the namespaces of pods that do not decide for themselves, each read once.
        metas: list[Any] = [p.metadata for p in found.items]
        undecided = {str(m.namespace) for m in metas if a.INJECT not in (m.annotations or {})}
        opted_in = {ns for ns in undecided if self._namespace_opted_in(ns)}
        out = []
        for p in found.items:
            meta: Any = p.metadata
            if p.status is not None and p.status.phase in FINISHED:
                continue  # finished: whether it had a proxy no longer matters
            said = (meta.annotations or {}).get(a.INJECT, "").strip()
            if said == a.INJECT_ENABLED:
                why = f"{a.INJECT}: {a.INJECT_ENABLED}"
            elif not said and meta.namespace in opted_in:
                why = f"namespace label {a.NAMESPACE_INJECT_LABEL}={a.INJECT_ENABLED}"
            else:
                continue
            injected = (meta.labels or {}).get(a.INJECTED) == a.INJECTED_LABEL_VALUE
            out.append((str(meta.namespace), str(meta.name), injected, why))
        return out

    def _namespace_opted_in(self, namespace: str) -> bool:
        try:
            ns: Any = self._core.read_namespace(namespace, _request_timeout=10)
        except ApiException as e:
            if e.status == 404:
                return False
            raise CliError(f"reading namespace {namespace}: {_reason(e)}") from e
        except urllib3.exceptions.HTTPError as e:
            raise CliError(f"reading namespace {namespace}: {_reason(e)}") from e
        return (ns.metadata.labels or {}).get(a.NAMESPACE_INJECT_LABEL) == a.INJECT_ENABLED

    def can_i(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        """Whether the caller may `verb` the resource (a SelfSubjectAccessReview: the API server decides)."""
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb, group=group, resource=resource, namespace=namespace
                )
            )
        )
        try:
            answer: Any = client.AuthorizationV1Api(self._api).create_self_subject_access_review(
                review, _request_timeout=10
            )
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"asking whether you may {verb} {resource}: {_reason(e)}") from e
        return bool(answer.status.allowed)

    def webhook_ca_bundles(self, name: str) -> list[tuple[str, str, bytes]] | None:
        """(webhook name, "namespace/service:port", caBundle) of each webhook of the
        MutatingWebhookConfiguration `name`; None when it is absent."""
        try:
            mwc = client.AdmissionregistrationV1Api(self._api).read_mutating_webhook_configuration(
                name, _request_timeout=10
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise CliError(f"reading MutatingWebhookConfiguration {name}: {_reason(e)}") from e
        except urllib3.exceptions.HTTPError as e:
            raise CliError(f"reading MutatingWebhookConfiguration {name}: {_reason(e)}") from e
        out = []
        for hook in mwc.webhooks or []:
            cc: Any = hook.client_config
            svc = cc.service
            where = f"{svc.namespace}/{svc.name}:{svc.port or 443}" if svc else str(cc.url)
            try:  # the client hands caBundle over as the API sends it: base64 of the PEM
                bundle = base64.b64decode(cc.ca_bundle or "", validate=True)
            except ValueError:
                bundle = b""
            out.append((str(hook.name), where, bundle))
        return out

    def service_target(self, namespace: str, name: str, port: int) -> int:
        """The target port behind port `port` of a Service (numbers only: kuberpc's own Service uses them)."""
        try:
            svc: Any = self._core.read_namespaced_service(name, namespace, _request_timeout=10)
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"reading Service {namespace}/{name}: {_reason(e)}") from e
        for p in svc.spec.ports or []:
            if p.port == port:
                target = p.target_port
                return int(target) if target is not None and str(target).isdigit() else port
        raise CliError(f"Service {namespace}/{name} has no port {port}")

    @contextlib.contextmanager
    def forward(self, namespace: str, pod: str, port: int) -> Iterator[str]:
        """A loopback "127.0.0.1:N" reaching `port` on the pod's own loopback, through the API server's
        pods/portforward (the caller needs `create` on it, as for `kubectl port-forward`)."""

        # The client swaps its ApiClient's request method while it opens a WebSocket: a client of its own
        # keeps that away from the other requests of the command.
        core = client.CoreV1Api(client.ApiClient(self._api.configuration))

        def tunnel() -> Tunnel:
            try:
                pf = portforward(core.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port))
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as e:
                raise CliError(f"port-forward to {namespace}/{pod}:{port}: {_reason(e)}") from e
            sock: Tunnel = pf.socket(port)
            return sock

        # The first tunnel now, so that a refusal (RBAC, no such pod) is reported as itself.
        first = [tunnel()]
        try:
            with local_port(lambda: first.pop() if first else tunnel()) as address:
                yield address
        finally:
            for t in first:
                t.close()
            core.api_client.close()

    def control_plane_pods(self, namespace: str) -> list[tuple[str, bool]]:
        """(name, ready) of the kuberpc-webhook pods."""
        try:
            found = self._core.list_namespaced_pod(
                namespace, label_selector="app.kubernetes.io/name=kuberpc-webhook", _request_timeout=30
            )
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"listing the control plane's pods in {namespace}: {_reason(e)}") from e
        return [(str(_name(p)), _all_ready(p)) for p in found.items]

    def trust_anchors(self, namespace: str) -> str | None:
        """The PEM bundle of the kuberpc-trust-anchors ConfigMap in `namespace`; None when it is absent."""
        try:
            cm = self._core.read_namespaced_config_map(
                a.TRUST_ANCHORS_CONFIGMAP, namespace, _request_timeout=10
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise CliError(f"reading {namespace}/{a.TRUST_ANCHORS_CONFIGMAP}: {_reason(e)}") from e
        except urllib3.exceptions.HTTPError as e:
            raise CliError(f"reading {namespace}/{a.TRUST_ANCHORS_CONFIGMAP}: {_reason(e)}") from e
        return str((cm.data or {}).get(a.TRUST_ANCHORS_KEY, ""))

    def meshed_pods(self, namespace: str | None) -> list[Pod]:
        """Running (or starting) pods the injector labelled kuberpc.io/injected=true, in `namespace` or
        everywhere (None)."""
        try:
            if namespace is None:
                found = self._core.list_pod_for_all_namespaces(label_selector=MESHED_SELECTOR)
            else:
                found = self._core.list_namespaced_pod(namespace, label_selector=MESHED_SELECTOR)
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"listing meshed pods: {_reason(e)}") from e
        # A finished pod (a Job's) has no proxy left to ask: it is history, not part of the mesh.
        return [_pod(p) for p in found.items if not (p.status and p.status.phase in FINISHED)]

    def proxy_metrics(self, pod: Pod) -> str:
        """The proxy's /metrics, through the API server's pod proxy (needs get on pods/proxy)."""
        try:
            text = self._core.connect_get_namespaced_pod_proxy_with_path(
                f"{pod.name}:{a.ADMIN_PORT}", pod.namespace, a.METRICS_PATH.lstrip("/")
            )
        except (ApiException, urllib3.exceptions.HTTPError) as e:
            raise CliError(f"reading the proxy metrics of {pod.namespace}/{pod.name}: {_reason(e)}") from e
        return str(text)


def _reason(e: Exception) -> str:
    if isinstance(e, ApiException):
        # status 0: the client's WebSocket handshake failed; the reason carries the HTTP status line.
        return f"HTTP {e.status} {e.reason}".strip() if e.status else str(e.reason)
    return f"{type(e).__name__}: {e}"
