"""Retry decisions as pure code: the budget (ratio of recent calls + a reserve per second), the attempt limit, the
deadline, what is replayable, and the headers of a new attempt (gRPC A6's `grpc-previous-rpc-attempts`); and when a
call refused unprocessed (REFUSED_STREAM) is placed again, whatever the policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.retry import MAX_ATTEMPTS, RetryBudget, RetryPolicy, decide_refused, retry_headers

UNAVAILABLE = 14


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def spend_all(budget: RetryBudget) -> int:
    spent = 0
    while budget.withdraw():
        spent += 1
        assert spent < 100_000
    return spent


@given(
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(min_value=0.0, max_value=20.0),
    st.integers(min_value=0, max_value=2000),
)
@settings(max_examples=200)
def test_retries_within_the_window_never_exceed_the_ratio_of_calls_plus_the_reserve(
    ratio: float, min_per_s: float, calls: int
) -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio, clock=clock, min_per_s=min_per_s, window_s=10)
    for _ in range(calls):
        budget.deposit()

    spent = spend_all(budget)

    assert spent <= ratio * calls + min_per_s * 10
    assert spent >= int(ratio * calls + min_per_s * 10 - 1e-6)


def test_the_default_shape_allows_20_percent_plus_10_per_second() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, clock=clock)
    for _ in range(1000):
        budget.deposit()

    assert spend_all(budget) == 200 + 100


def test_the_budget_refills_as_the_window_moves_on() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.0, clock=clock, min_per_s=1.0, window_s=10)
    assert spend_all(budget) == 10

    clock.now += 5
    assert not budget.withdraw()
    clock.now += 5  # the second that held every retry has left the window
    assert spend_all(budget) == 10


def test_calls_older_than_the_window_earn_nothing() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.5, clock=clock, min_per_s=0.0, window_s=10)
    for _ in range(100):
        budget.deposit()

    clock.now += 10

    assert not budget.withdraw()


def policy(clock: FakeClock, ratio: float = 0.2) -> RetryPolicy:
    p = RetryPolicy.of(frozenset({"unavailable"}), ratio, clock=clock)
    assert p is not None
    return p


def test_no_retry_codes_means_no_policy_and_no_buffering() -> None:
    assert RetryPolicy.of(frozenset(), 0.2, clock=FakeClock()) is None


@pytest.mark.parametrize(
    ("status", "attempts", "remaining", "replayable", "why"),
    [
        (UNAVAILABLE, 1, 1.0, "", ""),
        (5, 1, 1.0, "", "not_retryable"),
        (UNAVAILABLE, 1, 1.0, "body_too_large", "body_too_large"),
        (UNAVAILABLE, 1, 1.0, "request_incomplete", "request_incomplete"),
        (UNAVAILABLE, MAX_ATTEMPTS, 1.0, "", "attempts_exhausted"),
        (UNAVAILABLE, 1, 0.0, "", "deadline"),
        (UNAVAILABLE, 1, None, "", ""),
    ],
)
def test_a_retry_is_decided_by_code_replayability_attempts_and_deadline(
    status: int, attempts: int, remaining: float | None, replayable: str, why: str
) -> None:
    p = policy(FakeClock())

    assert p.decide(status, attempts=attempts, remaining_s=remaining, replayable=replayable) == why


def test_an_exhausted_budget_is_the_reason_given() -> None:
    clock = FakeClock()
    p = policy(clock, ratio=0.0)
    spend_all(p.budget)

    assert p.decide(UNAVAILABLE, attempts=1, remaining_s=1.0, replayable="") == "budget_exhausted"


def test_a_new_attempt_carries_the_remaining_deadline_and_the_count_of_previous_attempts() -> None:
    headers = [(b":path", b"/a.B/C"), (b"grpc-timeout", b"2S"), (b"x", b"y"), (b"grpc-previous-rpc-attempts", b"1")]

    out = retry_headers(headers, timeout=b"1500m", previous=2)

    assert out == [(b":path", b"/a.B/C"), (b"x", b"y"), (b"grpc-timeout", b"1500m"), (b"grpc-previous-rpc-attempts", b"2")]


def test_an_attempt_refused_before_any_app_saw_it_adds_no_previous_attempts_header() -> None:
    out = retry_headers([(b":path", b"/a.B/C"), (b"grpc-timeout", b"2S")], timeout=b"1900m", previous=0)

    assert out == [(b":path", b"/a.B/C"), (b"grpc-timeout", b"1900m")]


@pytest.mark.parametrize(
    ("placements", "remaining", "replayable", "why"),
    [
        (0, 1.0, "", ""),
        (2, None, "", ""),
        (3, 1.0, "", "attempts_exhausted"),
        (0, 0.0, "", "deadline"),
        (0, 1.0, "body_too_large", "body_too_large"),
        (0, 1.0, "request_incomplete", "request_incomplete"),
    ],
)
def test_a_refused_call_is_placed_again_within_the_placement_limit_and_the_deadline(
    placements: int, remaining: float | None, replayable: str, why: str
) -> None:
    assert decide_refused(placements=placements, limit=3, remaining_s=remaining, replayable=replayable) == why


@given(st.integers(min_value=0, max_value=50), st.integers(min_value=1, max_value=10))
def test_a_refused_call_is_never_placed_more_than_the_limit(placements: int, limit: int) -> None:
    # No status codes and no budget take part: only the limit and the deadline bound it.
    placed = decide_refused(placements=placements, limit=limit, remaining_s=1.0, replayable="") == ""

    assert placed == (placements < limit)


@pytest.mark.parametrize(("ratio", "min_per_s", "window_s"), [(-0.1, 10.0, 10), (1.1, 10.0, 10), (0.2, -1.0, 10), (0.2, 1.0, 0)])
def test_invalid_budgets_are_refused(ratio: float, min_per_s: float, window_s: int) -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio, clock=FakeClock(), min_per_s=min_per_s, window_s=window_s)
