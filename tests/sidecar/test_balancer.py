"""Balancing policies: smooth WRR's exact interleaved counts, weight shares, P2C's latency preference, state kept across updates."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.balancer import Balancer, SmoothWeightedRoundRobin, make_balancer, smooth_wrr_step
from sidecar.model import LB_POLICIES, Endpoint


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def eps(*weights: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 15443, weight=w, pod=f"pod-{i}") for i, w in enumerate(weights)]


def balancer(
    policy: str, endpoints: list[Endpoint], clock: FakeClock | None = None, seed: int = 7
) -> Balancer:
    return make_balancer(policy, endpoints, rng=random.Random(seed), clock=clock or FakeClock())


def wrr_sequence(weights: list[int], n: int, current: list[int] | None = None) -> list[int]:
    cur = current if current is not None else [0] * len(weights)
    return [smooth_wrr_step(weights, cur) for _ in range(n)]


def window_counts_exact(seq: list[int], weights: list[int]) -> bool:
    """Every window of sum(weights) consecutive picks holds index i exactly weights[i] times."""
    total = sum(weights)
    counts = Counter(seq[:total])
    target = {i: w for i, w in enumerate(weights) if w}
    if counts != target:
        return False
    for k in range(total, len(seq)):
        counts[seq[k]] += 1
        counts[seq[k - total]] -= 1
        if +counts != target:
            return False
    return True


small_weights = st.lists(st.integers(0, 10_000), min_size=1, max_size=4).filter(
    lambda w: 0 < sum(w) <= 12_000
)


@settings(max_examples=60, deadline=None)
@given(small_weights)
def test_smooth_wrr_chooses_each_index_exactly_its_weight_in_every_window(weights: list[int]) -> None:
    seq = wrr_sequence(weights, 3 * sum(weights))
    assert window_counts_exact(seq, weights)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=2, max_size=6).filter(lambda w: sum(w) > 0))
def test_smooth_wrr_repeats_an_index_only_when_its_weight_is_strictly_the_largest(weights: list[int]) -> None:
    seq = wrr_sequence(weights, 3 * sum(weights))
    for a, b in itertools.pairwise(seq):
        if a == b:
            assert all(weights[a] > w for j, w in enumerate(weights) if j != a), (weights, seq)


def test_smooth_wrr_alternates_two_equal_weights() -> None:
    assert wrr_sequence([1, 1], 6) == [0, 1, 0, 1, 0, 1]


def test_smooth_wrr_interleaves_unequal_weights_like_nginx() -> None:
    # nginx's documented example: weights 5,1,1 give a a b a c a a, not a a a a a b c.
    assert wrr_sequence([5, 1, 1], 7) == [0, 0, 1, 0, 2, 0, 0]


def test_smooth_wrr_returns_minus_one_when_every_weight_is_zero() -> None:
    cur = [0, 0]
    assert smooth_wrr_step([0, 0], cur) == -1
    assert cur == [0, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=5).filter(lambda w: sum(w) > 0))
def test_wrr_balancer_picks_exactly_the_smooth_wrr_sequence(weights: list[int]) -> None:
    endpoints = eps(*weights)
    b = balancer("weighted-round-robin", endpoints)
    picks = [b.pick() for _ in range(4 * sum(weights))]
    expected = [endpoints[i] for i in wrr_sequence(weights, len(picks))]
    assert picks == expected


@pytest.mark.parametrize("policy", ["weighted-round-robin", "random", "p2c-ewma"])
def test_weighted_policies_give_each_endpoint_its_weight_share_within_one_percent(policy: str) -> None:
    weights = [100, 300, 50, 0, 550]
    endpoints = eps(*weights)
    b = balancer(policy, endpoints)
    counts: Counter[Endpoint] = Counter()
    n = 60_000
    for _ in range(n):
        ep = b.pick()
        assert ep is not None
        counts[ep] += 1
        b.done(ep, 0.010)  # equal latencies: P2C must fall back to the weighted draw
    total = sum(weights)
    for ep, w in zip(endpoints, weights, strict=True):
        assert abs(counts[ep] / n - w / total) < 0.01, (policy, ep, counts[ep])


def test_round_robin_rotates_evenly_over_endpoints_with_positive_weight() -> None:
    endpoints = eps(100, 300, 0, 1)
    b = balancer("round-robin", endpoints)
    counts = Counter(b.pick() for _ in range(3000))
    assert counts == {endpoints[0]: 1000, endpoints[1]: 1000, endpoints[3]: 1000}


def test_round_robin_never_picks_the_same_endpoint_twice_in_a_row() -> None:
    b = balancer("round-robin", eps(1, 1, 1))
    picks = [b.pick() for _ in range(30)]
    assert all(a != c for a, c in itertools.pairwise(picks))


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_weight_zero_endpoint_is_never_picked(policy: str) -> None:
    endpoints = eps(0, 5, 0, 1)
    b = balancer(policy, endpoints)
    for _ in range(2000):
        ep = b.pick()
        assert ep is not None and ep.weight > 0
        b.done(ep, 0.001)


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_no_endpoints_picks_none(policy: str) -> None:
    assert balancer(policy, []).pick() is None


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_only_weight_zero_endpoints_picks_none(policy: str) -> None:
    assert balancer(policy, eps(0, 0)).pick() is None


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_update_from_empty_to_endpoints_starts_picking(policy: str) -> None:
    b = balancer(policy, [])
    b.update(eps(1))
    assert b.pick() == eps(1)[0]


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_update_to_empty_picks_none(policy: str) -> None:
    b = balancer(policy, eps(1, 2))
    b.pick()
    b.update([])
    assert b.pick() is None


def test_unknown_policy_is_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="'fastest'"):
        balancer("fastest", eps(1))


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_state_lists_every_endpoint_with_address_port_and_weight(policy: str) -> None:
    endpoints = eps(3, 0)
    b = balancer(policy, endpoints)
    b.pick()
    rows = b.state()
    assert [(r["address"], r["port"], r["weight"]) for r in rows] == [
        ("10.0.0.1", 15443, 3),
        ("10.0.0.2", 15443, 0),
    ]
    assert b.policy == policy


def test_wrr_state_shows_current_weights_in_endpoint_units() -> None:
    b = balancer("weighted-round-robin", eps(100, 100))
    b.pick()
    assert [r["current"] for r in b.state()] == [-100, 100]


def test_wrr_unchanged_update_continues_the_sequence_without_a_burst() -> None:
    endpoints = eps(5, 3, 2)
    steady = balancer("weighted-round-robin", endpoints)
    updated = balancer("weighted-round-robin", endpoints)
    expected = [steady.pick() for _ in range(37)]
    got = []
    for k in range(37):
        if k % 4 == 0:
            # Same keys and weights, new objects (a pod renamed, a condition flipped): not a change.
            updated.update([Endpoint(e.address, e.port, e.weight, pod=f"renamed-{k}") for e in endpoints])
        ep = updated.pick()
        assert ep is not None
        got.append(ep.key)
    assert got == [e.key for e in expected if e is not None]


def test_wrr_update_adding_an_endpoint_keeps_current_weights_of_the_others() -> None:
    a, b_, c, d = eps(1, 1, 1, 1)
    b = balancer("weighted-round-robin", [a, b_, c])
    assert b.pick() == a
    b.update([a, b_, c, d])
    # A reset would start over at `a`; carried state remembers `a` just had its turn.
    assert b.pick() == b_


def test_wrr_update_keeps_state_of_endpoints_moved_in_the_list() -> None:
    a, b_, c = eps(1, 1, 1)
    wrr = balancer("weighted-round-robin", [a, b_, c])
    assert [wrr.pick(), wrr.pick()] == [a, b_]
    wrr.update([c, b_, a])
    assert wrr.pick() == c


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 50), min_size=1, max_size=5),
    st.lists(st.integers(0, 50), min_size=1, max_size=5),
    st.integers(0, 500),
)
def test_wrr_settles_into_exact_window_counts_within_eight_cycles_after_a_change(
    before: list[int], after: list[int], prefix: int
) -> None:
    b = SmoothWeightedRoundRobin(eps(*before))
    for _ in range(prefix):
        b.pick()
    new = [Endpoint(f"10.0.0.{i + 1}", 15443, weight=w) for i, w in enumerate(after)]
    b.update(new)
    total = sum(after)
    if total == 0:
        assert b.pick() is None
        return
    for _ in range(8 * total):
        b.pick()
    tail = [b.pick() for _ in range(2 * total)]
    index = {e.key: i for i, e in enumerate(new)}
    assert window_counts_exact([index[e.key] for e in tail if e is not None], after)


def test_round_robin_update_continues_after_the_last_picked_endpoint() -> None:
    a, b_, c = eps(1, 1, 1)
    rr = balancer("round-robin", [a, b_, c])
    last = rr.pick()
    assert last is not None
    rest = [e for e in (a, b_, c) if e != last]
    rr.update([*rest, last])  # last now at the end: the next one wraps to the start
    assert rr.pick() == rest[0]


def test_p2c_prefers_a_slower_endpoint_less() -> None:
    clock = FakeClock()
    endpoints = eps(100, 100, 100)
    slow = endpoints[1]
    b = balancer("p2c-ewma", endpoints, clock)
    counts: Counter[Endpoint] = Counter()
    for _ in range(3000):
        ep = b.pick()
        assert ep is not None
        counts[ep] += 1
        clock.now += 0.001
        b.done(ep, 0.100 if ep == slow else 0.002)
    assert counts[slow] < 0.05 * 3000
    assert counts[endpoints[0]] > 0.4 * 3000 and counts[endpoints[2]] > 0.4 * 3000


def teach(p2c: Balancer, latency: dict[Endpoint, float]) -> None:
    """Let every endpoint answer one call with its latency (unmeasured idle endpoints go first)."""
    seen: set[Endpoint] = set()
    while seen != set(latency):
        ep = p2c.pick()
        assert ep is not None and len(seen) < len(latency)
        seen.add(ep)
        p2c.done(ep, latency[ep])


def inflight(p2c: Balancer) -> dict[tuple[object, object], object]:
    return {(r["address"], r["port"]): r["inflight"] for r in p2c.state()}


def test_p2c_counts_a_pick_as_in_flight_until_done() -> None:
    a, b_ = eps(100, 100)
    p2c = balancer("p2c-ewma", [a, b_])
    teach(p2c, {a: 0.010, b_: 0.010})
    first = p2c.pick()
    assert first is not None
    # Equal latency, but `first` now has a call in flight: cost 0.010 x 2 against 0.010 x 1.
    second = p2c.pick()
    assert {first, second} == {a, b_}
    assert inflight(p2c) == {a.key: 1, b_.key: 1}
    p2c.done(first, 0.010)
    assert inflight(p2c)[first.key] == 0


def test_p2c_avoids_an_unmeasured_endpoint_while_its_first_call_is_in_flight() -> None:
    a, b_ = eps(100, 100)
    p2c = balancer("p2c-ewma", [a, b_])
    first = p2c.pick()  # never answers
    other = b_ if first == a else a
    for _ in range(5):
        assert p2c.pick() == other
        p2c.done(other, 0.010)


def test_p2c_probes_a_slow_endpoint_again_once_its_latency_has_decayed() -> None:
    clock = FakeClock()
    fast, slow = eps(100, 100)
    p2c = balancer("p2c-ewma", [fast, slow], clock)
    teach(p2c, {fast: 0.002, slow: 0.500})
    for _ in range(3):
        assert p2c.pick() == fast
        p2c.done(fast, 0.002)
    # Two minutes (twelve decay constants) pass with only `fast` answering: slow's 0.5 s fades
    # below fast's fresh 2 ms, so slow gets a call again.
    clock.now += 120.0
    p2c.done(fast, 0.002)
    assert p2c.pick() == slow


def test_p2c_update_keeps_latency_estimates_of_persisting_endpoints() -> None:
    fast, slow, gone = eps(100, 100, 100)
    p2c = balancer("p2c-ewma", [fast, slow, gone])
    teach(p2c, {fast: 0.002, slow: 0.300, gone: 0.001})
    p2c.update([Endpoint(slow.address, slow.port, 100, pod="renamed"), fast, Endpoint("10.0.0.9", 15443)])
    ewma = {(r["address"], r["port"]): r["ewma_s"] for r in p2c.state()}
    assert ewma == {slow.key: 0.300, fast.key: 0.002, ("10.0.0.9", 15443): None}


def test_p2c_done_for_an_endpoint_no_longer_listed_is_ignored() -> None:
    a, b_ = eps(1, 1)
    p2c = balancer("p2c-ewma", [a, b_])
    ep = p2c.pick()
    assert ep is not None
    p2c.update([e for e in (a, b_) if e != ep])
    p2c.done(ep, 0.1)
    assert [r["address"] for r in p2c.state()] == [e.address for e in (a, b_) if e != ep]


@pytest.mark.parametrize("policy", LB_POLICIES)
def test_an_endpoint_listed_twice_gets_one_share(policy: str) -> None:
    a, b_ = eps(100, 100)
    b = balancer(policy, [a, Endpoint(a.address, a.port, 100, pod="dup"), b_])
    counts: Counter[Endpoint] = Counter()
    for _ in range(6000):
        ep = b.pick()
        assert ep is not None
        counts[ep] += 1
        b.done(ep, 0.001)
    assert abs(counts[a] / 6000 - 0.5) < 0.03 and counts[a] + counts[b_] == 6000
    assert len(b.state()) == 2
