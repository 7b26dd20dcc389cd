"""`kuberpc stat --prometheus URL`: the same server-view counts, from a Prometheus that scrapes the
proxies (with the namespace and pod target labels of manifests/monitoring) instead of the pods' proxies.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from webhook.cli.kube import CliError
from webhook.cli.stat import Traffic

INBOUND = 'direction="inbound"'


def _query(url: str, expr: str) -> list[dict[str, Any]]:
    target = f"{url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(target, timeout=30) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as e:
        raise CliError(
            f"Prometheus at {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"
        ) from e
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CliError(f"Prometheus at {url}: {getattr(e, 'reason', e)}") from e
    if body.get("status") != "success":
        raise CliError(f"Prometheus at {url} refused {expr}: {body.get('error', body)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def inbound_by_pod(url: str, seconds: float) -> dict[tuple[str, str], dict[str, Traffic]]:
    """Per (namespace, pod), per Service: the calls its proxy served over the last `seconds`."""
    window = f"[{max(int(seconds), 1)}s]"
    by = "namespace, pod, service"
    out: dict[tuple[str, str], dict[str, Traffic]] = {}

    def traffic(m: dict[str, str]) -> Traffic:
        return out.setdefault((m.get("namespace", ""), m.get("pod", "")), {}).setdefault(
            m.get("service", "?"), Traffic()
        )

    for r in _query(url, f"sum by ({by}) (increase(kuberpc_requests_total{{{INBOUND}}}{window}))"):
        traffic(r["metric"]).calls = float(r["value"][1])
    for r in _query(
        url, f'sum by ({by}) (increase(kuberpc_requests_total{{{INBOUND},grpc_code="0"}}{window}))'
    ):
        traffic(r["metric"]).ok = float(r["value"][1])
    for r in _query(
        url, f"sum by ({by}, le) (increase(kuberpc_request_duration_seconds_bucket{{{INBOUND}}}{window}))"
    ):
        traffic(r["metric"]).buckets[float(r["metric"]["le"])] = float(r["value"][1])
    return out
