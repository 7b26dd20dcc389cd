"""Failure accrual as pure code: consecutive failures eject, the backoff grows with jitter, one probe brings an
endpoint back, a cap bounds how many are out, panic mode balances over all; every policy skips the ejected.

Time is a fake clock and randomness a seeded rng: no test sleeps.
"""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar import config
from sidecar.balancer import (
    CONSECUTIVE_FAILURES,
    EJECT_JITTER,
    EJECT_MAX_S,
    FailureAccrual,
    eject_delay,
    make_balancer,
)
from sidecar.model import LB_POLICIES, Endpoint
from tests.sidecar.test_balancer import FakeClock, eps


def accrual(
    policy: str,
    endpoints: list[Endpoint],
    clock: FakeClock,
    *,
    seed: int = 7,
    share: float = 0.5,
    threshold: int = CONSECUTIVE_FAILURES,
) -> FailureAccrual:
    rng = random.Random(seed)
    inner = make_balancer(policy, endpoints, rng=rng, clock=clock)
    return FailureAccrual(inner, endpoints, rng=rng, clock=clock, threshold=threshold, max_ejected_share=share)


def fail(b: FailureAccrual, ep: Endpoint, times: int = CONSECUTIVE_FAILURES, why: str = "connect: refused") -> None:
    for _ in range(times):
        b.done(ep, 0.001, why)


def picks(b: FailureAccrual, n: int) -> Counter[Endpoint]:
    seen: Counter[Endpoint] = Counter()
    for _ in range(n):
        ep = b.pick()
        assert ep is not None
        seen[ep] += 1
        b.done(ep, 0.001)
    return seen


def state_of(b: FailureAccrual, ep: Endpoint) -> dict[str, object]:
    return next(row for row in b.state() if (row["address"], row["port"]) == ep.key)


# ---- ejection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_every_policy_skips_an_endpoint_ejected_by_consecutive_failures(policy: str) -> None:
    clock = FakeClock()
    a, b, c = eps(100, 200, 300)
    lb = accrual(policy, [a, b, c], clock)

    fail(lb, b)
    seen = picks(lb, 600)

    assert seen[b] == 0
    assert seen[a] > 0 and seen[c] > 0
    assert lb.ejected == 1 and lb.ejections == 1


def test_wrr_keeps_the_other_endpoints_weights_while_one_is_ejected() -> None:
    clock = FakeClock()
    a, b, c = eps(100, 200, 300)
    lb = accrual("weighted-round-robin", [a, b, c], clock)

    fail(lb, a)
    seen = picks(lb, 500 * 5)

    assert seen[b] * 3 == seen[c] * 2


@given(st.lists(st.booleans(), max_size=60))
@settings(max_examples=200, deadline=None)
def test_an_endpoint_is_ejected_exactly_when_a_run_of_failures_reaches_the_threshold(outcomes: list[bool]) -> None:
    clock = FakeClock()
    a, b, c = eps(100, 100, 100)
    lb = accrual("round-robin", [a, b, c], clock, threshold=3, share=1.0)
    run = longest = 0
    for failed in outcomes:
        if lb.ejected:
            break
        lb.done(a, 0.001, "reset" if failed else "")
        run = run + 1 if failed else 0
        longest = max(longest, run)

    assert (lb.ejected == 1) == (longest >= 3)


def test_failures_below_the_threshold_then_a_success_start_the_count_again() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("random", [a, b], clock)

    fail(lb, a, CONSECUTIVE_FAILURES - 1)
    lb.done(a, 0.001)
    fail(lb, a, CONSECUTIVE_FAILURES - 1)

    assert lb.ejected == 0
    assert state_of(lb, a)["state"] == "failing"


def test_an_ejected_endpoint_says_why_in_its_state() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("p2c-ewma", [a, b], clock)

    fail(lb, a, why="connect: ConnectionRefusedError")

    row = state_of(lb, a)
    assert row["state"] == "ejected"
    assert row["weight"] == 100
    assert f"{CONSECUTIVE_FAILURES} consecutive failures" in str(row["why"])
    assert "ConnectionRefusedError" in str(row["why"])
    assert state_of(lb, b)["state"] == "ready"


# ---- backoff and probe ------------------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_backoff_starts_near_one_second_doubles_and_stays_under_a_minute(ejections: int, seed: int) -> None:
    nominal = min(EJECT_MAX_S, 2.0 ** (ejections - 1))
    delay = eject_delay(ejections, random.Random(seed))

    assert nominal * (1 - EJECT_JITTER) <= delay <= nominal


def test_backoff_jitter_comes_from_the_injected_rng() -> None:
    assert eject_delay(3, random.Random(1)) == eject_delay(3, random.Random(1))
    assert len({eject_delay(3, random.Random(seed)) for seed in range(20)}) > 10


def test_after_the_backoff_exactly_one_probe_call_goes_to_the_ejected_endpoint() -> None:
    clock = FakeClock()
    a, b, c = eps(100, 100, 100)
    lb = accrual("round-robin", [a, b, c], clock)
    fail(lb, a)

    clock.now += 1.0  # the longest first backoff
    probe = lb.pick()
    others = [lb.pick() for _ in range(50)]

    assert probe == a
    assert a not in others
    assert state_of(lb, a)["state"] == "probing"


def test_a_successful_probe_returns_the_endpoint_to_balancing() -> None:
    clock = FakeClock()
    a, b, c = eps(100, 100, 100)
    lb = accrual("weighted-round-robin", [a, b, c], clock)
    fail(lb, a)
    clock.now += 1.0
    probe = lb.pick()
    assert probe == a

    changed = lb.done(a, 0.001)

    assert changed and lb.ejected == 0
    assert picks(lb, 300) == {a: 100, b: 100, c: 100}


@given(st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=1000))
@settings(max_examples=50, deadline=None)
def test_each_failed_probe_ejects_again_for_a_longer_backoff(failed_probes: int, seed: int) -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("round-robin", [a, b], clock, seed=seed)
    fail(lb, a)
    backoffs = [float(str(state_of(lb, a)["back_in_s"]))]
    for _ in range(failed_probes):
        clock.now += EJECT_MAX_S
        assert lb.pick() == a
        lb.done(a, 0.001, "reset")
        backoffs.append(float(str(state_of(lb, a)["back_in_s"])))

    for k, backoff in enumerate(backoffs, start=1):
        nominal = min(EJECT_MAX_S, 2.0 ** (k - 1))
        assert nominal * (1 - EJECT_JITTER) - 0.001 <= backoff <= nominal + 0.001
    assert lb.ejections == 1  # one ejection, prolonged: not one per failed probe


def test_no_probe_before_the_backoff_has_passed() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("random", [a, b], clock)
    fail(lb, a)

    clock.now += 1.0 * (1 - EJECT_JITTER) - 0.01  # the shortest possible first backoff, not yet over
    seen = picks(lb, 200)

    assert seen[a] == 0


def test_a_failure_of_a_call_placed_before_the_ejection_does_not_prolong_it() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("round-robin", [a, b], clock)
    fail(lb, a)
    back_in = state_of(lb, a)["back_in_s"]

    fail(lb, a, 3)

    assert state_of(lb, a)["back_in_s"] == back_in


# ---- the cap and panic mode -------------------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=12), st.sampled_from([0.0, 0.1, 0.34, 0.5, 0.9]))
def test_no_more_than_the_configured_share_of_endpoints_is_ejected(n: int, share: float) -> None:
    clock = FakeClock()
    endpoints = eps(*([100] * n))
    lb = accrual("round-robin", endpoints, clock, share=share)

    for ep in endpoints:
        fail(lb, ep)

    assert lb.ejected <= share * n
    assert lb.ejected == int(share * n + 1e-9)


def test_when_every_endpoint_is_ejected_balancing_uses_all_of_them() -> None:
    clock = FakeClock()
    a, b, c = eps(100, 100, 100)
    lb = accrual("weighted-round-robin", [a, b, c], clock, share=1.0)

    for ep in (a, b, c):
        fail(lb, ep)
    seen: Counter[Endpoint] = Counter()
    for _ in range(300):
        ep = lb.pick()
        assert ep is not None
        seen[ep] += 1
        lb.done(ep, 0.001, "unavailable")  # still failing: panic mode goes on

    assert lb.panic
    assert seen == {a: 100, b: 100, c: 100}
    assert "panic mode" in str(state_of(lb, a)["why"])


def test_panic_mode_ends_when_an_endpoint_answers() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("round-robin", [a, b], clock, share=1.0)
    fail(lb, a)
    fail(lb, b)
    assert lb.panic

    lb.done(b, 0.001)
    seen = picks(lb, 20)

    assert not lb.panic
    assert seen == {b: 20}


# ---- updates ------------------------------------------------------------------------------------------------


def test_an_ejection_survives_a_discovery_update_that_keeps_the_endpoint() -> None:
    clock = FakeClock()
    a, b, c = eps(100, 100, 100)
    lb = accrual("p2c-ewma", [a, b], clock)
    fail(lb, a)

    lb.update([a, b, c])
    seen = picks(lb, 200)

    assert seen[a] == 0 and seen[c] > 0


def test_an_endpoint_that_leaves_and_comes_back_starts_afresh() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("round-robin", [a, b], clock)
    fail(lb, a)

    lb.update([b])
    lb.update([a, b])

    assert lb.ejected == 0
    assert picks(lb, 10) == {a: 5, b: 5}


def test_nothing_is_tracked_while_every_call_succeeds() -> None:
    clock = FakeClock()
    endpoints = eps(100, 200)
    lb = accrual("weighted-round-robin", endpoints, clock)

    picks(lb, 100)

    assert [row["state"] for row in lb.state()] == ["ready", "ready"]
    assert lb.ejected == 0 and lb.ejections == 0


@pytest.mark.parametrize(("threshold", "share"), [(0, 0.5), (5, -0.1), (5, 1.5)])
def test_invalid_settings_are_refused(threshold: int, share: float) -> None:
    clock = FakeClock()
    endpoints = eps(100)
    with pytest.raises(ValueError):
        accrual("round-robin", endpoints, clock, threshold=threshold, share=share)


# ---- configuration --------------------------------------------------------------------------------------

BASE_ENV = {
    "KUBERPC_INBOUND_ADDR": "off",
    "KUBERPC_TLS_CERT": "cert.pem",
    "KUBERPC_TLS_KEY": "key.pem",
    "KUBERPC_TRUST_ANCHORS": "ca.pem",
}


def test_the_ejection_cap_is_half_by_default_and_set_in_percent() -> None:
    assert config.load(BASE_ENV).max_ejected_share == 0.5
    assert config.load({**BASE_ENV, "KUBERPC_MAX_EJECTED_PERCENT": "100"}).max_ejected_share == 1.0


@pytest.mark.parametrize("bad", ["101", "-1", "half", "0.5"])
def test_a_bad_ejection_cap_is_refused_naming_the_variable(bad: str) -> None:
    with pytest.raises(config.ConfigError, match=f"KUBERPC_MAX_EJECTED_PERCENT: '{re.escape(bad)}'"):
        config.load({**BASE_ENV, "KUBERPC_MAX_EJECTED_PERCENT": bad})


def test_a_released_pick_leaves_no_call_in_flight_and_no_failure_counted() -> None:
    clock = FakeClock()
    a, b = eps(100, 100)
    lb = accrual("p2c-ewma", [a, b], clock)
    fail(lb, a, CONSECUTIVE_FAILURES - 1)

    for _ in range(10):
        ep = lb.pick()
        assert ep is not None
        lb.release(ep)

    assert [row["inflight"] for row in lb.state()] == [0, 0]
    assert state_of(lb, a)["consecutive_failures"] == CONSECUTIVE_FAILURES - 1
