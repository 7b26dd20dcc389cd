"""Failure as a first-class path, end to end: three replicas (weights 1:2:3) under load from a real gRPC client
(8 callers, 2 of them streaming, 2 s deadlines) while one replica fails. Each test is one scenario of the issue
with its target: calls the Service's retry policy allows are never lost; a dead peer costs at most the calls it
held, and throughput is back within seconds.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from e2e.chaos import CALLERS, DISCOVERY_GONE_S, REPLICAS, SCENARIOS, ChaosMesh, Outcome
from sidecar.retry import MAX_ATTEMPTS

pytestmark = [pytest.mark.netns]

BY_NAME = {s.name: s for s in SCENARIOS}
RECOVERY_S = 5.0  # the bound: throughput back above 90 % within this long


def run(chaos: ChaosMesh, name: str, at_least: int = 200) -> Outcome:
    outcome = BY_NAME[name].run(chaos)
    assert len(outcome.calls) >= at_least, f"too little load to judge: {len(outcome.calls)} calls"
    return outcome


def describe(o: Outcome) -> str:
    return f"{o.scenario}: {len(o.failed)} failed of {len(o.calls)}: " + ", ".join(
        f"{c.code}@{c.start - o.fault_at:+.2f}s{'' if c.retryable else ' (answer started)'} {c.details!r}"
        for c in o.failed[:10]
    )


@pytest.mark.parametrize("name", ["kill-app", "kill-proxy", "kill-app-and-proxy"])
def test_a_replica_killed_mid_traffic_loses_no_call_the_policy_may_retry(chaos: ChaosMesh, name: str) -> None:
    o = run(chaos, name)

    assert o.failed_retryable == [], describe(o)
    # Only a call in flight whose answer had already started at the kill may be lost: the caller has seen it.
    assert len(o.failed) <= CALLERS, describe(o)
    assert o.share("arith-2") < 0.2  # 2/6 before the kill: ejected soon after it


def test_without_a_retry_policy_a_killed_app_costs_no_call_that_never_reached_it(chaos: ChaosMesh) -> None:
    o = run(chaos, "kill-app-no-retry")

    # Its proxy refuses what it cannot hand to the app (REFUSED_STREAM), and the client's proxy places it on
    # another replica: no call that never reached an app fails.
    assert o.failed_retryable == [], describe(o)
    # A call the app had taken when it died may have been acted on: without a policy it is not sent again.
    # At most one per caller, and each says its request had reached the app.
    assert len(o.failed) <= CALLERS and all(c.code == "UNAVAILABLE" and c.reached_app for c in o.failed), describe(o)
    assert o.share("arith-2") < 0.2  # ejected soon after the kill


@pytest.mark.parametrize("name", ["black-hole", "sigstop-proxy"])
def test_a_peer_that_stops_answering_costs_at_most_the_calls_it_held_and_throughput_returns_within_5s(
    chaos: ChaosMesh, name: str
) -> None:
    o = run(chaos, name)

    # Each caller can be held by the silent peer once before it is ejected (its calls time out at the
    # deadline: that is how it is found out), and a probe a second later may be held once more.
    assert len(o.failed) <= CALLERS + 2, describe(o)
    assert {c.code for c in o.failed} <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}, describe(o)
    recovery = o.recovery_s()
    assert recovery is not None and recovery <= RECOVERY_S, f"{name}: recovery {recovery}"


def test_with_200ms_added_to_one_replica_p2c_moves_calls_away(chaos: ChaosMesh) -> None:
    o = run(chaos, "delay-200ms-p2c")

    assert o.failed == [], describe(o)
    assert o.share("arith-3") < 0.1  # its weight alone would give it half


def test_with_200ms_added_to_one_replica_wrr_keeps_the_weights(chaos: ChaosMesh) -> None:
    o = run(chaos, "delay-200ms-wrr", at_least=60)  # half the calls take 200 ms: the callers wait on them

    assert o.failed == [], describe(o)
    assert abs(o.share("arith-3") - 0.5) < 0.05
    assert o.p99_during_ms() >= 200


def test_a_flapping_replica_loses_no_call_the_policy_may_retry(chaos: ChaosMesh) -> None:
    o = run(chaos, "flapping")

    assert o.failed_retryable == [], describe(o)
    assert len(o.failed) <= 2 * CALLERS, describe(o)  # two kills, each losing at most the answers under way


def test_every_proxy_rotating_its_certificate_under_load_loses_no_call(chaos: ChaosMesh) -> None:
    reloaded: list[set[str]] = []
    scenario = BY_NAME["cert-rotation"]

    def fault(m: ChaosMesh) -> None:
        scenario.fault(m)  # returns once every proxy reloaded, or after two polls
        reloaded.append(m.reloaded())

    o = replace(scenario, fault=fault).run(chaos)

    assert o.failed == [], describe(o)
    assert reloaded == [{"arith-1", "arith-2", "arith-3", "client"}]


def test_proxies_keep_serving_while_the_discovery_source_is_unreachable_for_30s(chaos: ChaosMesh) -> None:
    noticed: list[bool] = []
    scenario = BY_NAME["discovery-unreachable"]

    def fault(m: ChaosMesh) -> None:
        scenario.fault(m)  # returns when the source is back, DISCOVERY_GONE_S later
        noticed.append(all(m.logged(name, "file missing (keeping the last catalog)") for name in m.proxies))

    o = replace(scenario, fault=fault).run(chaos)

    assert DISCOVERY_GONE_S >= 30
    assert noticed == [True]  # every proxy saw its source gone, and kept what it had
    assert o.failed == [], describe(o)
    # Every replica keeps serving all along: in each 5 s of the outage, each one answered calls.
    for t in range(0, int(DISCOVERY_GONE_S), 5):
        start = o.fault_at + t
        assert {c.replica for c in o.calls if start <= c.start < start + 5} == set(REPLICAS), f"{t}-{t + 5} s"


def test_an_app_failing_10_percent_of_calls_is_hidden_by_retries(chaos: ChaosMesh) -> None:
    o = run(chaos, "unavailable-10pct-retry")

    # A call fails only if every attempt does: 0.1 ** MAX_ATTEMPTS of the unary calls, in expectation.
    unary = len(o.calls) * 6 // 8
    assert len(o.failed) <= max(2, 5 * unary * 0.1**MAX_ATTEMPTS), describe(o)
    assert o.failed_retryable == o.failed  # the app answers UNAVAILABLE before anything else
