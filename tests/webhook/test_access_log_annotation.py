"""`kuberpc.io/access-log: json` on a pod turns on the proxy's access log (KUBERPC_ACCESS_LOG=json);
without it, or with `off`, the proxy gets no such variable; anything else is a warning, not a denial."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sidecar import config as proxy_config
from tests.webhook.test_patch import Apply, Review, admit, env_of, injected, proxy_of
from webhook import annotations as a
from webhook.config import InjectorConfig


def test_access_log_json_sets_the_proxy_variable(review: Review, apply: Apply, native_cfg: InjectorConfig) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, access_log="json")))
    assert env["KUBERPC_ACCESS_LOG"] == "json"
    assert "KUBERPC_ACCESS_LOG" in proxy_config.ENV_DOC


@pytest.mark.parametrize("annotations", [{}, {"access_log": "off"}, {"access_log": " OFF "}])
def test_without_the_annotation_or_with_off_the_proxy_logs_no_calls(
    review: Review, apply: Apply, native_cfg: InjectorConfig, annotations: dict[str, str]
) -> None:
    env = env_of(proxy_of(injected(review, apply, "deployment-pod-review", native_cfg, **annotations)))
    assert "KUBERPC_ACCESS_LOG" not in env


def test_an_unknown_access_log_value_is_injected_with_a_warning_naming_it(
    review: Callable[[str], dict[str, Any]], native_cfg: InjectorConfig
) -> None:
    r = review("deployment-pod-review")
    r["request"]["object"]["metadata"].setdefault("annotations", {})[a.ACCESS_LOG] = "apache"

    outcome = admit(r, native_cfg)

    assert outcome.result == "injected"
    assert outcome.warnings == (f"kuberpc: {a.ACCESS_LOG}: 'apache' is not json or off; using off",)
    assert not any("KUBERPC_ACCESS_LOG" in str(op) for op in outcome.patch)
