"""`kuberpc` argument parsing and the commands, with kubectl's conventions: -n/-A, --context,
--kubeconfig, -o table|wide|json|yaml; exit 0 when all is well, 1 when the command found a problem or
could not do its job (the message says which), 2 for a usage error.

The cluster, the clock and the wait between scrapes are parameters, so tests run every command against
a fake API server and real proxies.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml
from prometheus_client.parser import text_string_to_metric_families

from webhook import annotations as a
from webhook import install
from webhook.cli import check as checks
from webhook.cli import debug as debug_view
from webhook.cli import probe
from webhook.cli import stat as stat_mod
from webhook.cli.inject import inject_documents
from webhook.cli.kube import CliError, Cluster, Pod
from webhook.cli.output import FORMATS, duration, millis, percent, render
from webhook.cli.prom import inbound_by_pod
from webhook.cli.tap import aggregate, p50_ms, status_name
from webhook.cli.tap import stream as tap_stream
from webhook.config import ConfigError, InjectorConfig, load_config, parse_kubernetes_version

OK, PROBLEM, USAGE = 0, 1, 2

KINDS = {
    "deploy": "deploy",
    "deployment": "deploy",
    "deployments": "deploy",
    "sts": "sts",
    "statefulset": "sts",
    "statefulsets": "sts",
    "ds": "ds",
    "daemonset": "ds",
    "daemonsets": "ds",
    "po": "pod",
    "pod": "pod",
    "pods": "pod",
    "svc": "svc",
    "service": "svc",
    "services": "svc",
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace (default: the context's, or default)")
    common.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    common.add_argument("--context", help="kubeconfig context to use")
    common.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    common.add_argument("-o", "--output", choices=FORMATS, default="table", help="output format")
    parser = argparse.ArgumentParser(
        prog="kuberpc",
        description="Operate a kuberpc gRPC mesh (also `kubectl kuberpc ...`).",
        epilog="exit status: 0 all is well; 1 a problem was found or the command failed; 2 usage error",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    inject = sub.add_parser(
        "inject",
        parents=[common],
        help="print manifests with the proxy the webhook would inject (offline)",
        description="Print the manifests of FILE with the kuberpc proxy injected into every pod template, "
        "by the webhook's own patch. Workloads saying kuberpc.io/inject: disabled are left alone. "
        "Output is YAML (or -o json); messages go to stderr.",
    )
    inject.add_argument("-f", "--filename", required=True, help="manifest file, or - for stdin")
    inject.add_argument("--config", help="injector config.yaml (default: the built-in defaults)")
    inject.add_argument(
        "--kubernetes-version", help="cluster version, e.g. 1.30 (decides the native sidecar; default: not)"
    )
    stat = sub.add_parser(
        "stat",
        parents=[common],
        help="success rate, RPS and latency by workload, pod or Service",
        description="Success rate, requests per second and p50/p95/p99 latency of the calls meshed pods "
        "served (server view, each call once), read from their proxies' metrics through the API "
        "server's pod proxy, over a window.",
    )
    stat.add_argument("kind", help="deploy | sts | ds | pod | svc")
    stat.add_argument("name", nargs="?", help="only this one")
    stat.add_argument(
        "--window",
        type=float,
        help="seconds to look at (default: 10 between two scrapes; 60 from Prometheus)",
    )
    stat.add_argument(
        "--prometheus",
        metavar="URL",
        help="read the counts from this Prometheus instead of the pods' proxies",
    )
    sub.add_parser(
        "proxy-status",
        parents=[common],
        help="every meshed pod's proxy: version, ready, certificate expiry, discovery",
        description="One line per meshed pod: proxy version, ready, time left on its certificate, the "
        "Services it has endpoints for, discovery updates received, age. Exit 1 if a proxy is not "
        "ready or cannot be read.",
    )
    check = sub.add_parser(
        "check",
        parents=[common],
        help="is the mesh healthy? one line per fact, with the fix for each problem",
        description="Checks the API server, the control plane, the trust anchors, that every pod asking "
        "for a proxy has one, and that every proxy is ready with a valid certificate. Exit 1 if any fails.",
    )
    check.add_argument("--pre", action="store_true", help="only what must hold before installing kuberpc")
    check.add_argument(
        "--control-plane-namespace",
        default="kuberpc-system",
        help="where kuberpc runs (default kuberpc-system)",
    )
    reach = (
        "The proxy serves it on the pod's loopback only (127.0.0.1:15091): given POD, kuberpc reaches it "
        "through the API server's pods/portforward, as `kubectl port-forward` does, so only who may "
        "port-forward to the pod (RBAC: create pods/portforward) can read it; --admin HOST:PORT reads a "
        "debug listener you can reach yourself (a proxy run by hand, or a port-forward you opened)."
    )
    for name, text in (
        ("tap", "each call a proxy finishes from now on: method, status, latency, peer identity"),
        ("top", "the calls a proxy finishes over a while, by route (method) and peer, busiest first"),
    ):
        p = sub.add_parser(
            name,
            parents=[common],
            help=text,
            description=f"{text[0].upper()}{text[1:]}, from the proxy's bounded /tap stream. {reach} "
            "Never shows metadata values or message bodies (the proxy does not send them).",
        )
        p.add_argument("pod", nargs="?", metavar="POD", help="the meshed pod whose proxy to tap")
        p.add_argument("--admin", help="HOST:PORT of a proxy's debug listener, instead of POD")
        p.add_argument(
            "--limit", type=int, default=100 if name == "tap" else 1000, help="calls at most (<= 1000)"
        )
        p.add_argument("--seconds", type=float, default=10.0, help="how long at most (<= 60)")
    debug = sub.add_parser(
        "debug",
        parents=[common],
        help="what one proxy knows: routes, endpoints and their state, ejections, connections, peers",
        description="A proxy's /debug for a person: readiness (and why not), identity and certificate, "
        "routes, every endpoint with its weight and state (ejected: why, and when it is tried again), "
        f"connections with each peer's SPIFFE ID. -o json|yaml prints the document itself. {reach}",
    )
    debug.add_argument("pod", nargs="?", metavar="POD", help="the meshed pod whose proxy to show")
    debug.add_argument("--admin", help="HOST:PORT of a proxy's debug listener, instead of POD")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    cluster: Callable[..., Cluster] = Cluster,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.time,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE
    try:
        if args.command == "inject":
            return _inject(args, stdin or sys.stdin, out, err)
        if args.command in ("tap", "top", "debug"):
            if (args.pod is None) == (args.admin is None):
                err.write(f"kuberpc {args.command}: name a POD or give --admin HOST:PORT (one of the two)\n")
                return USAGE
            if args.admin is not None:
                return _on_debug_listener(args, args.admin, clock, out)
            c = cluster(context=args.context, kubeconfig=args.kubeconfig)
            try:
                with c.forward(args.namespace or "default", args.pod, a.DEBUG_PORT) as address:
                    return _on_debug_listener(args, address, clock, out)
            finally:
                c.close()
        kind = None
        if args.command == "stat":
            kind = KINDS.get(args.kind.lower())
            if kind is None:
                err.write(f"kuberpc stat: unknown kind {args.kind!r} (deploy, sts, ds, pod or svc)\n")
                return USAGE
            if args.window is None:
                args.window = 60.0 if args.prometheus else 10.0
            if args.window <= 0:
                err.write("kuberpc stat: --window must be a positive number of seconds\n")
                return USAGE
        c = cluster(context=args.context, kubeconfig=args.kubeconfig)
        try:
            namespace = None if args.all_namespaces else (args.namespace or "default")
            if kind is not None:
                return _stat(c, kind, args, namespace, sleep, out)
            if args.command == "check":
                return _check(c, args, clock, out)
            return _proxy_status(c, args, namespace, clock, out, err)
        finally:
            c.close()
    except CliError as e:
        err.write(f"kuberpc {args.command}: {e}\n")
        return PROBLEM


def _inject(args: argparse.Namespace, stdin: TextIO, out: TextIO, err: TextIO) -> int:
    try:
        text = stdin.read() if args.filename == "-" else Path(args.filename).read_text(encoding="utf-8")
        docs = list(yaml.safe_load_all(text))
    except OSError as e:
        raise CliError(f"reading {args.filename}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise CliError(f"{args.filename} is not YAML: {e}") from e
    cfg = InjectorConfig()
    try:
        if args.config:
            with open(args.config, encoding="utf-8") as f:
                cfg = load_config(_config_yaml(f.read()))
        if args.kubernetes_version:
            cfg = dataclasses.replace(
                cfg, kubernetes_version=parse_kubernetes_version(args.kubernetes_version)
            )
    except OSError as e:
        raise CliError(f"reading {args.config}: {e.strerror or e}") from e
    except (ConfigError, ValueError) as e:
        raise CliError(f"injector configuration: {e}") from e
    result = inject_documents(docs, cfg, namespace=None if args.all_namespaces else args.namespace)
    for message in result.messages:
        err.write(message + "\n")
    if args.output == "json":
        items = result.documents
        single = items[0] if len(items) == 1 else {"apiVersion": "v1", "kind": "List", "items": items}
        out.write(json.dumps(single, indent=2) + "\n")
    else:
        out.write(yaml.safe_dump_all(result.documents, sort_keys=False))
    return PROBLEM if result.denied else OK


def _on_debug_listener(
    args: argparse.Namespace, address: str, clock: Callable[[], float], out: TextIO
) -> int:
    if args.command == "tap":
        return _tap(args, address, out)
    if args.command == "top":
        return _top(args, address, out)
    return _debug(args, address, clock, out)


def _debug(args: argparse.Namespace, address: str, clock: Callable[[], float], out: TextIO) -> int:
    url = f"http://{address}/debug"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise CliError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace').strip()}") from e
    except (urllib.error.URLError, OSError) as e:
        raise CliError(f"{url}: {getattr(e, 'reason', e)}") from e
    except ValueError as e:
        raise CliError(f"{url} did not answer JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CliError(f"{url} answered {type(doc).__name__}, not a JSON object")
    if args.output == "json":
        out.write(json.dumps(doc, indent=2) + "\n")
    elif args.output == "yaml":
        out.write(yaml.safe_dump(doc, sort_keys=False))
    else:
        out.write("\n".join(debug_view.render(doc, dt.datetime.fromtimestamp(clock(), dt.UTC))) + "\n")
    return OK if doc.get("ready") else PROBLEM


def _tap(args: argparse.Namespace, admin: str, out: TextIO) -> int:
    columns = ("DIRECTION", "SERVICE", "METHOD", "STATUS", "LATENCY", "PEER")
    widths = (9, 24, 32, 18, 10)
    if args.output in ("table", "wide"):
        out.write("".join(c.ljust(w + 2) for c, w in zip(columns, widths, strict=False)) + columns[-1] + "\n")
    for r in tap_stream(admin, limit=args.limit, seconds=args.seconds):
        if args.output in ("json", "yaml"):
            out.write(json.dumps(r) + "\n")
        elif "end" in r:
            out.write(f"# ended ({r['end']}): {r['calls']} calls, {r['dropped']} dropped\n")
        else:
            cells = (
                r["direction"],
                r["service"],
                r["method"],
                status_name(r["grpc_code"]),
                f"{r['duration_ms']:.2f}ms",
            )
            out.write(
                "".join(str(c).ljust(w + 2) for c, w in zip(cells, widths, strict=True))
                + str(r["peer"] or "-")
                + "\n"
            )
        out.flush()
    return OK


def _top(args: argparse.Namespace, admin: str, out: TextIO) -> int:
    routes, end = aggregate(tap_stream(admin, limit=args.limit, seconds=args.seconds))
    rows = []
    for (direction, service, method, peer), route in sorted(
        routes.items(), key=lambda kv: (-kv[1].calls, kv[0])
    ):
        success = route.ok / route.calls
        rows.append(
            {
                "DIRECTION": direction,
                "SERVICE": service,
                "METHOD": method,
                "PEER": peer,
                "CALLS": route.calls,
                "SUCCESS": percent(success),
                "LATENCY_P50": f"{p50_ms(route):.2f}ms",
                "LATENCY_MAX": f"{max(route.durations_ms):.2f}ms",
                "raw": {
                    "direction": direction,
                    "service": service,
                    "method": method,
                    "peer": peer,
                    "calls": route.calls,
                    "success": success,
                    "latency_ms": {"p50": p50_ms(route), "max": max(route.durations_ms)},
                },
            }
        )
    render(
        rows,
        columns=["DIRECTION", "SERVICE", "METHOD", "CALLS", "SUCCESS", "LATENCY_P50", "LATENCY_MAX"],
        wide=["PEER"],
        fmt=args.output,
        out=out,
        kind="kuberpc.io/top",
    )
    if args.output in ("table", "wide") and end:
        out.write(f"# {end['calls']} calls in the stream, {end['dropped']} dropped ({end['end']} reached)\n")
    return OK


def _config_yaml(text: str) -> str:
    """The injector's config.yaml, given as itself or as the kuberpc-injector-config ConfigMap."""
    doc = yaml.safe_load(text)
    if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
        data = doc.get("data") or {}
        if "config.yaml" not in data:
            raise CliError("the ConfigMap has no data.config.yaml")
        return str(data["config.yaml"])
    return text


def _scrape_all(c: Cluster, pods: Sequence[Pod]) -> dict[Pod, dict[str, stat_mod.Traffic] | None]:
    out: dict[Pod, dict[str, stat_mod.Traffic] | None] = {}
    for pod in pods:
        try:
            out[pod] = stat_mod.inbound_by_service(c.proxy_metrics(pod))
        except CliError:
            out[pod] = None  # shown in MESHED as a pod that did not answer
    return out


def _stat(
    c: Cluster,
    kind: str,
    args: argparse.Namespace,
    namespace: str | None,
    sleep: Callable[[float], None],
    out: TextIO,
) -> int:
    pods = c.meshed_pods(namespace)
    if kind != "svc":
        pods = [p for p in pods if p.workload.split("/")[0] == kind]
    windows: dict[Pod, dict[str, stat_mod.Traffic] | None] = {}
    if args.prometheus:
        served = inbound_by_pod(args.prometheus, args.window)
        # A pod Prometheus has no inbound series for served nothing in the window.
        windows = {pod: served.get((pod.namespace, pod.name), {}) for pod in pods}
    else:
        before = _scrape_all(c, pods)
        sleep(args.window)
        after = _scrape_all(c, pods)
        for pod in pods:
            b, n = before[pod], after[pod]
            windows[pod] = stat_mod.window(b, n) if b is not None and n is not None else None
    groups: dict[tuple[str, str], list[stat_mod.Traffic | None]] = {}
    for pod in pods:
        per_service = windows[pod]
        if kind == "svc":
            for service, traffic in (per_service or {}).items():
                name, _, ns = service.partition(".")
                groups.setdefault((ns, name), []).append(traffic)
            continue
        total: stat_mod.Traffic | None = None
        if per_service is not None:
            total = stat_mod.Traffic()
            for traffic in per_service.values():
                total.add(traffic)
        key = (pod.namespace, pod.name if kind == "pod" else pod.workload.split("/", 1)[1])
        groups.setdefault(key, []).append(total)
    rows = [r for r in stat_mod.rows(groups, args.window) if args.name is None or r.name == args.name]
    if args.name is not None and not rows:
        raise CliError(f"no meshed {kind} named {args.name!r}")
    columns = ["NAME", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"]
    if namespace is None:
        columns.insert(0, "NAMESPACE")
    render(
        [
            {
                "NAMESPACE": r.namespace,
                "NAME": r.name,
                "MESHED": r.meshed,
                "SUCCESS": percent(r.success),
                "RPS": f"{r.rps:.1f}",
                "LATENCY_P50": millis(r.p50),
                "LATENCY_P95": millis(r.p95),
                "LATENCY_P99": millis(r.p99),
                "CALLS": r.calls,
                "raw": {
                    "namespace": r.namespace,
                    "name": r.name,
                    "kind": kind,
                    "meshed": r.meshed,
                    "success": r.success,
                    "rps": r.rps,
                    "latency_seconds": {"p50": r.p50, "p95": r.p95, "p99": r.p99},
                    "calls": r.calls,
                    "window_seconds": args.window,
                },
            }
            for r in rows
        ],
        columns=columns,
        wide=["CALLS"],
        fmt=args.output,
        out=out,
        kind=f"kuberpc.io/stat/{kind}",
    )
    return OK


def _proxy_facts(metrics_text: str) -> dict[str, Any]:
    expiry: float | None = None
    updates = 0.0
    ready_services: list[str] = []
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "kuberpc_cert_expiry_timestamp_seconds":
                expiry = s.value
            elif s.name == "kuberpc_discovery_updates_total":
                updates += s.value
            elif s.name == "kuberpc_endpoints" and s.labels.get("state") == "ready" and s.value > 0:
                ready_services.append(s.labels.get("service", "?"))
    return {
        "cert_expiry": expiry,
        "discovery_updates": int(updates),
        "services_with_endpoints": sorted(ready_services),
    }


def _check(c: Cluster, args: argparse.Namespace, clock: Callable[[], float], out: TextIO) -> int:
    now = dt.datetime.fromtimestamp(clock(), dt.UTC)
    results: list[checks.Result] = []
    try:
        results.append(checks.api_version(c.version()))
    except CliError as e:
        results.append(checks.Result(False, "the API server does not answer", str(e)))
    if results[0].ok and args.pre:
        results.append(checks.install_rights(_install_rights(c, args.control_plane_namespace)))
    if results[0].ok and not args.pre:
        cp = args.control_plane_namespace
        control_plane = c.control_plane_pods(cp)
        results.append(checks.control_plane(cp, control_plane))
        ready = [name for name, ok in control_plane if ok]
        results += _webhook_checks(c, cp, ready, now)
        anchors = c.trust_anchors(cp)
        results += _identity_checks(c, cp, ready, anchors)
        results += _discovery_checks(c, cp, ready, anchors)
        scope = None if args.all_namespaces or not args.namespace else args.namespace
        pods = c.meshed_pods(scope)
        for ns in sorted({cp} | {p.namespace for p in pods}):
            results.append(checks.trust_anchors(ns, anchors if ns == cp else c.trust_anchors(ns), now))
        results += checks.injection(c.pods_asking_for_a_proxy(scope))
        for pod in pods:
            try:
                expiry = _proxy_facts(c.proxy_metrics(pod))["cert_expiry"]
            except CliError as e:
                results.append(
                    checks.Result(False, f"the proxy of {pod.namespace}/{pod.name} cannot be read", str(e))
                )
                continue
            results.append(checks.proxy(pod.namespace, pod.name, pod.proxy_ready, expiry, now))
    if args.output in ("json", "yaml"):
        items = [dataclasses.asdict(r) for r in results]
        render([{"raw": i} for i in items], columns=[], fmt=args.output, out=out, kind="kuberpc.io/check")
    else:
        for r in results:
            out.write(f"{'✔' if r.ok else '✘'} {r.title}\n")
            if not r.ok and r.fix:
                out.write(f"    fix: {r.fix}\n")
        failed = sum(not r.ok for r in results)
        out.write(f"{'all checks passed' if not failed else f'{failed} check(s) failed'}\n")
    return OK if all(r.ok for r in results) else PROBLEM


def _install_rights(c: Cluster, namespace: str) -> dict[str, bool]:
    kinds = {str(d["kind"]) for d in install.load_kustomization(install.default_manifests_dir())}
    kinds |= {"Secret", "ConfigMap"}  # generated by install itself
    allowed = {}
    for kind in sorted(kinds):
        known = checks.INSTALL_RESOURCES.get(kind)
        if known is None:
            raise CliError(f"kuberpc install creates a {kind}, which check does not know how to ask about")
        group, resource, namespaced = known
        name = f"{resource}.{group}" if group else resource
        allowed[name] = c.can_i("create", group, resource, namespace if namespaced else None)
    return allowed


def _webhook_checks(c: Cluster, cp: str, ready: Sequence[str], now: dt.datetime) -> list[checks.Result]:
    hooks = c.webhook_ca_bundles(a.WEBHOOK_CONFIGURATION)
    if hooks is None:
        return [
            checks.Result(
                False,
                f"MutatingWebhookConfiguration {a.WEBHOOK_CONFIGURATION} is missing: no pod gets a proxy",
                "python -m webhook install | kubectl apply -f -",
            )
        ]
    results = []
    for _hook, where, bundle in hooks:
        svc_ns, _, rest = where.partition("/")
        svc, _, port = rest.partition(":")
        if not port.isdigit():  # a url: webhook, not the one install writes
            results.append(checks.Result(False, f"{a.WEBHOOK_CONFIGURATION} calls {where}, not kuberpc's Service"))
            continue
        target = c.service_target(svc_ns, svc, int(port))
        for pod in ready if svc_ns == cp else []:
            try:
                with c.forward(cp, pod, target) as address:
                    served, error = probe.webhook_certificate(address, f"{svc}.{svc_ns}.svc")
            except CliError as e:
                served, error = None, str(e)
            if served is not None and error:  # a certificate, but /healthz is not happy
                results.append(checks.Result(False, f"the webhook in {cp}/{pod} answers /healthz badly: {error}",
                                             f"kubectl -n {cp} logs {pod} -c webhook"))
                continue
            results.append(checks.webhook_serving(f"{cp}/{pod}", f"{svc}.{svc_ns}.svc", bundle, served, error, now))
    return results


def _identity_checks(c: Cluster, cp: str, ready: Sequence[str], anchors: str | None) -> list[checks.Result]:
    if anchors is None:
        return []  # the trust anchors check says what is missing
    port = int(a.DEFAULT_IDENTITY_ADDR.rpartition(":")[2])
    name = a.DEFAULT_IDENTITY_ADDR.rpartition(":")[0]
    results = []
    for pod in ready:
        try:
            with c.forward(cp, pod, port) as address:
                code, detail = probe.identity_answer(address, anchors.encode(), name)
        except CliError as e:
            code, detail = "UNREACHABLE", str(e)
        results.append(checks.identity_service(f"{cp}/{pod}", code, detail))
    return results


def _discovery_checks(c: Cluster, cp: str, ready: Sequence[str], anchors: str | None) -> list[checks.Result]:
    if anchors is None:
        return []  # the trust anchors check says what is missing
    name, _, port = a.DEFAULT_DISCOVERY_ADDR.rpartition(":")
    results = []
    for pod in ready:
        try:
            with c.forward(cp, pod, int(port)) as address:
                state, detail = probe.discovery_answer(address, anchors.encode(), name)
        except CliError as e:
            state, detail = probe.UNREACHABLE, str(e)
        results.append(checks.discovery_service(f"{cp}/{pod}", state, detail))
    return results


def _expires(expiry: float | None, now: float) -> str:
    if expiry is None:
        return "-"
    return f"in {duration(expiry - now)}" if expiry > now else f"EXPIRED {duration(now - expiry)} ago"


def _proxy_status(
    c: Cluster,
    args: argparse.Namespace,
    namespace: str | None,
    clock: Callable[[], float],
    out: TextIO,
    err: TextIO,
) -> int:
    now = clock()
    rows = []
    healthy = True
    for pod in c.meshed_pods(namespace):
        try:
            facts: dict[str, Any] | None = _proxy_facts(c.proxy_metrics(pod))
        except CliError as e:
            err.write(f"{e}\n")
            facts = None
        healthy = healthy and pod.proxy_ready and facts is not None
        expiry = facts["cert_expiry"] if facts else None
        rows.append(
            {
                "NAMESPACE": pod.namespace,
                "NAME": pod.name,
                "VERSION": pod.proxy_version,
                "READY": "true" if pod.proxy_ready else "false",
                "CERT-EXPIRES": "?" if facts is None else _expires(expiry, now),
                "SERVICES": "?" if facts is None else len(facts["services_with_endpoints"]),
                "DISCOVERY-UPDATES": "?" if facts is None else facts["discovery_updates"],
                "AGE": duration(now - pod.created),
                "WORKLOAD": pod.workload,
                "raw": {
                    "namespace": pod.namespace,
                    "name": pod.name,
                    "workload": pod.workload,
                    "version": pod.proxy_version,
                    "ready": pod.proxy_ready,
                    "reachable": facts is not None,
                    **(facts or {}),
                    "age_seconds": round(now - pod.created),
                },
            }
        )
    columns = ["NAME", "VERSION", "READY", "CERT-EXPIRES", "SERVICES", "DISCOVERY-UPDATES", "AGE"]
    if namespace is None:
        columns.insert(0, "NAMESPACE")
    render(rows, columns=columns, wide=["WORKLOAD"], fmt=args.output, out=out, kind="kuberpc.io/proxy-status")
    return OK if healthy else PROBLEM
