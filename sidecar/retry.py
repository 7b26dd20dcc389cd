"""Whether a failed call may be tried again: a Service's retryable status codes and its retry budget.

Pure decisions with an injected clock: no I/O, no knowledge of streams (the relay replays, this decides).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sidecar.policy import GRPC_CODES

# Linkerd's default budget shape: retries may add 20 % to the calls of the last 10 s, plus 10 per second
# whatever the traffic, so that a quiet Service can still retry its rare failures.
DEFAULT_MIN_PER_S = 10.0
BUDGET_WINDOW_S = 10
# Attempts of one call in all: gRPC's retry design (A6) caps maxAttempts at 5. The budget, not this, is
# what keeps retries from multiplying load; 5 makes an app failing 10 % of calls lose 1 in 100,000.
MAX_ATTEMPTS = 5
# A request is replayed only when all of it fits here (linkerd2-proxy buffers 64 KiB too): larger or
# still-streaming requests are not retried, and counted as such.
MAX_REPLAY_BYTES = 64 << 10

CODE_NAMES: Mapping[int, str] = {code: name.replace("-", "_") for name, code in GRPC_CODES.items()}


class RetryBudget:
    """Retries allowed over the last `window_s` seconds: `ratio` x calls + `min_per_s` x `window_s`.

    Counted in one-second slots, so a burst of failures cannot spend more than the budget the preceding
    traffic earned, and the budget refills as old slots age out.
    """

    __slots__ = ("_calls", "_clock", "_reserve", "_retries", "_second", "_slots", "ratio", "total_calls", "total_retries")

    def __init__(
        self,
        ratio: float,
        *,
        clock: Callable[[], float],
        min_per_s: float = DEFAULT_MIN_PER_S,
        window_s: int = BUDGET_WINDOW_S,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be from 0 to 1, not {ratio!r}")
        if min_per_s < 0 or window_s < 1:
            raise ValueError(f"min_per_s must be >= 0 and window_s >= 1, not {min_per_s!r}, {window_s!r}")
        self.ratio = ratio
        self._clock = clock
        self._reserve = min_per_s * window_s
        self._slots = window_s
        self._calls = [0] * window_s
        self._retries = [0] * window_s
        self._second = int(clock())
        self.total_calls = 0  # within the window
        self.total_retries = 0

    def _advance(self) -> int:
        now = int(self._clock())
        gone = now - self._second
        if gone > 0:
            for k in range(1, min(gone, self._slots) + 1):
                i = (self._second + k) % self._slots
                self.total_calls -= self._calls[i]
                self.total_retries -= self._retries[i]
                self._calls[i] = self._retries[i] = 0
            self._second = now
        return now % self._slots

    def deposit(self) -> None:
        """One call was made (its first attempt)."""
        self._calls[self._advance()] += 1
        self.total_calls += 1

    def withdraw(self) -> bool:
        """Spend one retry if the budget allows it; False when it is exhausted."""
        i = self._advance()
        if self.total_retries + 1 > self.ratio * self.total_calls + self._reserve:
            return False
        self._retries[i] += 1
        self.total_retries += 1
        return True


class RetryPolicy:
    """A Service's `kuberpc.io/retry` codes and its budget, shared by all of its calls."""

    __slots__ = ("budget", "codes")

    def __init__(self, codes: frozenset[int], budget: RetryBudget) -> None:
        self.codes = codes
        self.budget = budget

    @classmethod
    def of(cls, names: frozenset[str], ratio: float, *, clock: Callable[[], float]) -> RetryPolicy | None:
        """The policy for annotation values (code names as policy.py parsed them); None when nothing retries."""
        if not names:
            return None
        return cls(frozenset(GRPC_CODES[n] for n in names), RetryBudget(ratio, clock=clock))

    def decide(self, status: int, *, attempts: int, remaining_s: float | None, replayable: str) -> str:
        """Why a call that ended with `status` is not retried, or "" to retry it.

        `replayable` is "" when the whole request is buffered, else why not ("body_too_large",
        "request_incomplete"). Only a call that would be retried spends budget.
        """
        if status not in self.codes:
            return "not_retryable"
        if replayable:
            return replayable
        if attempts >= MAX_ATTEMPTS:
            return "attempts_exhausted"
        if remaining_s is not None and remaining_s <= 0.001:
            return "deadline"
        if not self.budget.withdraw():
            return "budget_exhausted"
        return ""


def decide_refused(*, placements: int, limit: int, remaining_s: float | None, replayable: str) -> str:
    """Why a call its endpoint refused unprocessed is not placed again, or "" to place it elsewhere.

    Refused unprocessed (RST_STREAM REFUSED_STREAM, RFC 9113 §8.7): no app saw the request, so placing it
    again is as safe as placing it the first time, whatever the Service's retry codes, and spends no budget
    (gRPC's transparent retries do not either). Bounded by `limit` placements and by the deadline.
    """
    if replayable:
        return replayable
    if placements >= limit:
        return "attempts_exhausted"
    if remaining_s is not None and remaining_s <= 0.001:
        return "deadline"
    return ""


def retry_headers(headers: list[tuple[bytes, bytes]], *, timeout: bytes | None, previous: int) -> list[tuple[bytes, bytes]]:
    """The request headers of a new attempt: the remaining deadline and `grpc-previous-rpc-attempts` (A6),
    left out while no attempt has reached an app (`previous` 0)."""
    out = [(k, v) for k, v in headers if k != b"grpc-timeout" and k != b"grpc-previous-rpc-attempts"]
    if timeout is not None:
        out.append((b"grpc-timeout", timeout))
    if previous:
        out.append((b"grpc-previous-rpc-attempts", str(previous).encode()))
    return out
