"""`kuberpc inject -f FILE`: the manifests with the proxy the webhook would add, offline.

One code path with the webhook: each Pod template goes through webhook.patch.mutate and its JSON Patch
is applied as the API server applies it. Reads documents, returns documents; no I/O.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from webhook import annotations as a
from webhook.config import InjectorConfig
from webhook.patch import mutate

Doc = dict[str, Any]

# Where each kind keeps its Pod template (a Pod is its own template).
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}


@dataclass
class Injected:
    """The documents to print, what to tell the user on stderr, and whether any pod was refused."""

    documents: list[Doc] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    denied: bool = False


def inject_documents(docs: Iterable[Doc | None], cfg: InjectorConfig, *, namespace: str | None) -> Injected:
    """Every workload of `docs` with the proxy injected; other documents unchanged; Lists walked.

    A template that says `kuberpc.io/inject: disabled` is left alone; any other is opted in (that is
    what asking for injection means), then patched exactly as the webhook would patch its Pods.
    """
    out = Injected()
    for doc in _flatten(docs):
        out.documents.append(_inject_one(doc, cfg, namespace, out))
    return out


def _flatten(docs: Iterable[Doc | None]) -> Iterator[Doc]:
    for doc in docs:
        if not isinstance(doc, dict):
            continue
        if doc.get("kind", "").endswith("List") and isinstance(doc.get("items"), list):
            yield from _flatten(doc["items"])
        else:
            yield doc


def _inject_one(doc: Doc, cfg: InjectorConfig, namespace: str | None, out: Injected) -> Doc:
    kind = str(doc.get("kind", ""))
    name = f"{kind.lower()}/{(doc.get('metadata') or {}).get('name', '?')}"
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        return doc
    result = copy.deepcopy(doc)
    parent: Any = result
    for key in path:
        parent = parent.get(key) if isinstance(parent, dict) else None
    if not isinstance(parent, dict):
        out.messages.append(f"{name}: no pod template, left unchanged")
        return doc
    template: Doc = parent
    metadata = template.setdefault("metadata", {})
    annotations = metadata.setdefault("annotations", {})
    if str(annotations.get(a.INJECT, "")).strip() == a.INJECT_DISABLED:
        out.messages.append(f"{name}: {a.INJECT} is {a.INJECT_DISABLED}, left unchanged")
        return doc
    annotations[a.INJECT] = a.INJECT_ENABLED
    ns = namespace or (doc.get("metadata") or {}).get("namespace") or "default"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template.get("spec", {})}
    outcome = mutate(pod, {}, cfg, namespace=ns)
    out.messages += [f"{name}: {w.removeprefix('kuberpc: ')}" for w in outcome.warnings]
    if outcome.result == "denied":
        out.denied = True
        out.messages.append(f"{name}: denied: {outcome.message.removeprefix('kuberpc: ')}")
        return doc
    if outcome.result != "injected":
        return doc
    patched: Doc = jsonpatch.apply_patch(pod, list(outcome.patch))
    template["metadata"] = patched["metadata"]
    template["spec"] = patched["spec"]
    out.messages.append(f"{name}: injected")
    return result
