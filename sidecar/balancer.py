"""Choosing one endpoint of a Service per call: smooth WRR, P2C-EWMA, round robin, weighted random.

Pure decisions with injected rng and clock: no I/O, no logging, no knowledge of connections. Health is
only what callers report through `FailureAccrual.done` (consecutive failures eject an endpoint for a while).
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import reduce
from math import exp
from typing import Protocol

from sidecar.model import LB_POLICIES, Endpoint

# Peak-EWMA decay time constant (linkerd2-proxy and Finagle use 10 s): a slow endpoint's remembered
# latency fades over ~10 s without new samples, so it is probed again rather than shunned forever.
EWMA_DECAY_S = 10.0
# Cost of an endpoint that has calls in flight but has never answered (Finagle's idea): it stays
# out of the way until its first response tells us what it is worth. Idle unknown endpoints cost 0,
# so new pods get their first call quickly.
UNOBSERVED_PENALTY_S = 1_000_000.0
# Smooth WRR is replayed from a recorded cycle once the sequence is known to repeat; bounded so the
# recording (and the replay needed on update) stays small. Larger cycles stay on the O(n) step.
MAX_CYCLE_WORK = 65_536


class Balancer(Protocol):
    policy: str

    def pick(self) -> Endpoint | None:
        """An endpoint for the next call; None when no endpoint has weight > 0."""
        ...

    def done(self, ep: Endpoint, latency_s: float) -> None:
        """The call sent to `ep` finished (any outcome), after `latency_s` seconds."""
        ...

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the endpoint list, keeping per-endpoint state for keys that persist."""
        ...

    def state(self) -> list[dict[str, object]]:
        """Per-endpoint view for /debug: address, port, weight and the policy's own state."""
        ...


def smooth_wrr_step(weights: Sequence[int], current: list[int]) -> int:
    """One pick of nginx's smooth weighted round robin; returns the chosen index, -1 if all weights are 0.

    Every current value grows by its weight, the largest (first on ties) is chosen and loses the total.
    From all-zero `current`, any window of sum(weights) consecutive picks chooses index i exactly
    weights[i] times, spread out rather than in runs. Mutates `current`.
    """
    total = 0
    best = -1
    best_value = 0
    for i, w in enumerate(weights):
        if w <= 0:
            continue
        v = current[i] + w
        current[i] = v
        total += w
        if best < 0 or v > best_value:
            best, best_value = i, v
    if best >= 0:
        current[best] -= total
    return best


def _unique(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """First occurrence of each key: EndpointSlices may list one endpoint twice during a transition,
    and a duplicate would get two shares of traffic and split its state in two."""
    seen: dict[tuple[str, int], Endpoint] = {}
    for e in endpoints:
        seen.setdefault(e.key, e)
    return tuple(seen.values())


def _positive(endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    return tuple(e for e in endpoints if e.weight > 0)


def _base_state(ep: Endpoint) -> dict[str, object]:
    return {"address": ep.address, "port": ep.port, "weight": ep.weight, "pod": ep.pod}


class SmoothWeightedRoundRobin:
    """nginx's smooth WRR with exact per-window counts; steady state replays a recorded cycle.

    Why the cycle: the O(n) step costs ~300 ns for 3 endpoints and grows with n, while replaying a
    recorded cycle is an index bump (~60 ns). Weights are divided by their gcd (same sequence, shorter
    cycle: 100,100,100 repeats every 3 picks). Picks run the real step while recording; once the state
    after one cycle length equals the state before it, the sequence provably repeats and is replayed.
    """

    policy = "weighted-round-robin"

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._listed = _unique(endpoints)
        self._eps: tuple[Endpoint, ...] = ()
        self._weights: list[int] = []  # reduced by gcd
        self._gcd = 1
        self._current: list[int] = []  # reduced units; authoritative while not replaying
        self._cycle_len = 0  # sum of reduced weights
        self._record: bool = False
        self._rec_start: list[int] = []
        self._rec: list[int] = []
        self._replay: list[int] | None = None  # indexes into _eps, one cycle
        self._pos = 0
        self._reset(_positive(self._listed), {})

    def _reset(self, eps: tuple[Endpoint, ...], carried: dict[tuple[str, int], int]) -> None:
        """Start from `carried` absolute current weights (0 for new keys)."""
        self._eps = eps
        g = reduce(math.gcd, (e.weight for e in eps), 0) or 1
        self._gcd = g
        self._weights = [e.weight // g for e in eps]
        # Carried values are rounded to the new unit; the sequence settles into its cycle within a
        # few cycle lengths whatever the starting point (checked by the tests).
        self._current = [(carried.get(e.key, 0) + g // 2) // g for e in eps]
        self._cycle_len = sum(self._weights)
        self._record = 0 < self._cycle_len and self._cycle_len * len(eps) <= MAX_CYCLE_WORK
        self._rec_start = list(self._current)
        self._rec = []
        self._replay = None
        self._pos = 0

    def _current_now(self) -> list[int]:
        if self._replay is None:
            return list(self._current)
        cur = list(self._rec_start)
        for _ in range(self._pos):
            smooth_wrr_step(self._weights, cur)
        return cur

    def pick(self) -> Endpoint | None:
        replay = self._replay
        if replay is not None:
            i = self._pos
            if i >= self._cycle_len:
                i = 0
            self._pos = i + 1
            return self._eps[replay[i]]
        i = smooth_wrr_step(self._weights, self._current)
        if i < 0:
            return None
        if self._record:
            self._rec.append(i)
            if len(self._rec) == self._cycle_len:
                if self._current == self._rec_start:
                    self._replay = self._rec
                    self._pos = 0
                else:
                    self._rec_start = list(self._current)
                    self._rec = []
        return self._eps[i]

    def done(self, ep: Endpoint, latency_s: float) -> None:
        return None

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._listed = _unique(endpoints)
        eps = _positive(self._listed)
        if [(e.key, e.weight) for e in eps] == [(e.key, e.weight) for e in self._eps]:
            # Same keys and weights (only conditions or pod names changed): continue exactly.
            self._eps = eps
            return
        g = self._gcd
        carried = {e.key: c * g for e, c in zip(self._eps, self._current_now(), strict=True)}
        self._reset(eps, carried)

    def state(self) -> list[dict[str, object]]:
        cur = {e.key: c * self._gcd for e, c in zip(self._eps, self._current_now(), strict=True)}
        return [{**_base_state(e), "current": cur.get(e.key, 0)} for e in self._listed]


class RoundRobin:
    """Plain round robin over endpoints with weight > 0: weights only drain (0), they do not skew.

    Users who want weights honoured choose `weighted-round-robin`; this policy exists for those who
    want strict rotation. Starts at a random offset so proxies started together spread their first calls.
    """

    policy = "round-robin"

    def __init__(self, endpoints: Sequence[Endpoint], *, rng: random.Random) -> None:
        self._listed = _unique(endpoints)
        self._eps = _positive(self._listed)
        self._next = rng.randrange(len(self._eps)) if self._eps else 0

    def pick(self) -> Endpoint | None:
        eps = self._eps
        n = len(eps)
        if not n:
            return None
        i = self._next
        if i >= n:
            i = 0
        self._next = i + 1
        return eps[i]

    def done(self, ep: Endpoint, latency_s: float) -> None:
        return None

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        old = self._eps
        listed = _unique(endpoints)
        eps = _positive(listed)
        nxt = 0
        if old:
            # Continue after the endpoint picked last, wherever it now sits.
            last = old[(self._next - 1) % len(old)].key
            keys = [e.key for e in eps]
            nxt = keys.index(last) + 1 if last in keys else min(self._next, len(eps))
        self._listed, self._eps, self._next = listed, eps, nxt

    def state(self) -> list[dict[str, object]]:
        nxt = self._eps[self._next % len(self._eps)].key if self._eps else None
        return [{**_base_state(e), "next": e.key == nxt and e.weight > 0} for e in self._listed]


class WeightedRandom:
    """Independent draws with P(i) = w_i / sum(w): inverse CDF over precomputed cumulative weights."""

    policy = "random"

    def __init__(self, endpoints: Sequence[Endpoint], *, rng: random.Random) -> None:
        self._rng = rng
        self._listed: tuple[Endpoint, ...] = ()
        self._eps: tuple[Endpoint, ...] = ()
        self._cum: list[int] = []
        self._total = 0
        self.update(endpoints)

    def pick(self) -> Endpoint | None:
        n = len(self._eps)
        if not n:
            return None
        i = bisect_right(self._cum, self._rng.random() * self._total)
        # random() < 1, but the product can round up to the total for large totals.
        return self._eps[i if i < n else n - 1]

    def done(self, ep: Endpoint, latency_s: float) -> None:
        return None

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._listed = _unique(endpoints)
        self._eps = _positive(self._listed)
        self._cum = []
        total = 0
        for e in self._eps:
            total += e.weight
            self._cum.append(total)
        self._total = total

    def state(self) -> list[dict[str, object]]:
        total = self._total or 1
        return [{**_base_state(e), "share": e.weight / total} for e in self._listed]


class PeakEwmaP2C:
    """Power of two choices by peak-EWMA latency x (in-flight + 1).

    Two distinct candidates are drawn with probability proportional to weight; the one with the lower
    cost wins, the first drawn on ties. The cost is deliberately NOT divided by weight: weights act
    through the draw only, so equally fast and equally loaded endpoints get traffic in exact weight
    proportion, and latency or load differences shift traffic away from where it is slower.
    Peak EWMA (Finagle, linkerd2-proxy): a slower sample replaces the estimate at once, a faster one
    blends in with weight 1 - exp(-dt/decay). Reading the cost decays the estimate towards 0 with the
    time since the last sample, so an endpoint once slow is tried again after a while. The clock must be
    monotonic (time.monotonic in production).
    """

    policy = "p2c-ewma"

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        rng: random.Random,
        clock: Callable[[], float],
        decay_s: float = EWMA_DECAY_S,
    ) -> None:
        self._rng = rng
        self._clock = clock
        if not decay_s > 0:
            raise ValueError(f"decay_s must be positive, not {decay_s!r}")
        self._inv_decay = 1.0 / decay_s
        # Parallel lists indexed like `_listed` (weight-0 endpoints included, so a drained endpoint's
        # in-flight calls are still counted when they finish).
        self._listed: tuple[Endpoint, ...] = ()
        self._index: dict[tuple[str, int], int] = {}
        self._ewma: list[float] = []
        self._stamp: list[float] = []
        self._observed: list[bool] = []
        self._inflight: list[int] = []
        self._cand: list[int] = []  # indexes of weight > 0 endpoints, drawn from
        self._cum: list[int] = []
        self._total = 0
        self.update(endpoints)

    def _cost(self, i: int, now: float) -> float:
        inflight = self._inflight[i]
        if not self._observed[i]:
            return UNOBSERVED_PENALTY_S * inflight
        age = now - self._stamp[i]
        ewma = self._ewma[i] * math.exp(-age * self._inv_decay) if age > 0 else self._ewma[i]
        return ewma * (inflight + 1)

    def pick(self) -> Endpoint | None:
        cand = self._cand
        n = len(cand)
        if n > 1:
            cum = self._cum
            total = self._total
            rnd = self._rng.random
            a = bisect_right(cum, rnd() * total)
            if a >= n:
                a = n - 1
            lo = cum[a - 1] if a else 0
            wa = cum[a] - lo
            # Second draw over the weights with `a` removed, mapped back past a's interval.
            y = rnd() * (total - wa)
            if y >= lo:
                y += wa
            b = bisect_right(cum, y)
            if b >= n or b == a:  # float rounding at interval edges
                b = (a + 1) % n
            i, j = cand[a], cand[b]
            # _cost inlined for both candidates: this is the per-call hot path.
            inflight = self._inflight
            if self._observed[i] and self._observed[j]:
                now = self._clock()
                stamp, ewma, k = self._stamp, self._ewma, self._inv_decay
                ci = ewma[i] * exp((stamp[i] - now) * k) * (inflight[i] + 1)
                cj = ewma[j] * exp((stamp[j] - now) * k) * (inflight[j] + 1)
                if cj < ci:
                    i = j
            else:
                now = self._clock()
                if self._cost(j, now) < self._cost(i, now):
                    i = j
        elif n:
            i = cand[0]
        else:
            return None
        self._inflight[i] += 1
        return self._listed[i]

    def done(self, ep: Endpoint, latency_s: float) -> None:
        i = self._index.get((ep.address, ep.port))
        if i is None:
            return
        inflight = self._inflight
        if inflight[i] > 0:
            inflight[i] -= 1
        now = self._clock()
        ewma = self._ewma
        if latency_s > ewma[i] or not self._observed[i]:
            ewma[i] = latency_s
            self._observed[i] = True
        else:
            age = now - self._stamp[i]
            decay = math.exp(-age * self._inv_decay) if age > 0 else 1.0
            ewma[i] = ewma[i] * decay + latency_s * (1.0 - decay)
        self._stamp[i] = now

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        old = self._index
        self._listed = _unique(endpoints)
        index: dict[tuple[str, int], int] = {}
        ewma: list[float] = []
        stamp: list[float] = []
        observed: list[bool] = []
        inflight: list[int] = []
        for i, e in enumerate(self._listed):
            key = e.key
            index[key] = i
            k = old.get(key)
            ewma.append(self._ewma[k] if k is not None else 0.0)
            stamp.append(self._stamp[k] if k is not None else 0.0)
            observed.append(self._observed[k] if k is not None else False)
            inflight.append(self._inflight[k] if k is not None else 0)
        self._index, self._ewma, self._stamp = index, ewma, stamp
        self._observed, self._inflight = observed, inflight
        self._cand = [i for i, e in enumerate(self._listed) if e.weight > 0]
        self._cum = []
        total = 0
        for i in self._cand:
            total += self._listed[i].weight
            self._cum.append(total)
        self._total = total

    def state(self) -> list[dict[str, object]]:
        now = self._clock()
        out: list[dict[str, object]] = []
        for i, e in enumerate(self._listed):
            cost = self._cost(i, now)
            out.append(
                {
                    **_base_state(e),
                    "ewma_s": self._ewma[i] if self._observed[i] else None,
                    "inflight": self._inflight[i],
                    "cost": cost,
                }
            )
        return out


def make_balancer(
    policy: str,
    endpoints: Sequence[Endpoint],
    *,
    rng: random.Random,
    clock: Callable[[], float],
) -> Balancer:
    """The balancer for a `kuberpc.io/lb` policy name; ValueError naming an unknown one."""
    if policy == "weighted-round-robin":
        return SmoothWeightedRoundRobin(endpoints)
    if policy == "p2c-ewma":
        return PeakEwmaP2C(endpoints, rng=rng, clock=clock)
    if policy == "round-robin":
        return RoundRobin(endpoints, rng=rng)
    if policy == "random":
        return WeightedRandom(endpoints, rng=rng)
    raise ValueError(f"unknown balancing policy {policy!r} (expected one of {', '.join(LB_POLICIES)})")


# ---- failure accrual ------------------------------------------------------------------------------------

# Consecutive failures that eject an endpoint (Envoy's outlier detection uses 5, linkerd2-proxy 7): low
# enough that a dead peer stops taking calls within a handful of them (one lost connection usually fails
# several calls at once), high enough that a rare UNAVAILABLE from a healthy app never ejects it.
CONSECUTIVE_FAILURES = 5
# Ejection backoff: 1 s for a first ejection, doubling per failed probe up to ~1 min (linkerd2-proxy's
# defaults), each delay drawn in [1 - EJECT_JITTER, 1] of its nominal value so that proxies which ejected
# the same peer together do not probe it together.
EJECT_BASE_S = 1.0
EJECT_MAX_S = 60.0
EJECT_JITTER = 0.2


def eject_delay(ejections: int, rng: random.Random, *, base: float = EJECT_BASE_S, cap: float = EJECT_MAX_S) -> float:
    """How long an endpoint stays out after its `ejections`-th ejection in a row (1 for the first)."""
    nominal = min(cap, base * 2.0 ** min(ejections - 1, 64))
    return nominal * (1.0 - EJECT_JITTER * rng.random())


class _Ejected:
    __slots__ = ("count", "probing", "reason", "until")

    def __init__(self, count: int, until: float, reason: str) -> None:
        self.count = count  # ejections in a row: the backoff exponent
        self.until = until
        self.reason = reason
        self.probing = False


class FailureAccrual:
    """A Balancer that takes endpoints failing calls in a row out of another Balancer's choice.

    `done(ep, latency, failure)` with a non-empty `failure` (why the call failed because of the endpoint)
    counts towards ejection; any success resets the count. An ejected endpoint is given weight 0 in the
    inner balancer, which every policy skips, and comes back through one probe call once its backoff has
    passed: success returns it, failure ejects it again for twice as long.

    At most `max_ejected_share` of the endpoints is ejected at once (Envoy's max_ejection_percent): the
    failing ones beyond the cap keep their share, so that a wide outage does not pile every call onto the
    few survivors. With 1.0 all may be ejected, and then the inner balancer gets them all back ("panic
    mode"): a call has a chance anywhere rather than none.

    The healthy path costs one truth test per done and nothing per pick (`pick` is the inner balancer's own
    while nothing is ejected): nothing is tracked while nothing fails.
    """

    def __init__(
        self,
        inner: Balancer,
        endpoints: Sequence[Endpoint],
        *,
        rng: random.Random,
        clock: Callable[[], float],
        threshold: int = CONSECUTIVE_FAILURES,
        max_ejected_share: float,
        base_s: float = EJECT_BASE_S,
        max_s: float = EJECT_MAX_S,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be at least 1, not {threshold!r}")
        if not 0.0 <= max_ejected_share <= 1.0:
            raise ValueError(f"max_ejected_share must be from 0 to 1, not {max_ejected_share!r}")
        self.policy = inner.policy
        self._inner = inner
        self._rng = rng
        self._clock = clock
        self._threshold = threshold
        self._share = max_ejected_share
        self._base = base_s
        self._max = max_s
        self._listed = _unique(endpoints)
        self._failures: dict[tuple[str, int], tuple[int, str]] = {}  # consecutive count, last reason
        self._ejected: dict[tuple[str, int], _Ejected] = {}
        self._wake = math.inf  # earliest end of a backoff not yet probed
        self.panic = False
        self.ejections = 0  # ejections so far (kuberpc_ejections_total)
        # The next endpoint; bound to the inner balancer's pick while nothing is ejected (the per-call path).
        self.pick: Callable[[], Endpoint | None] = inner.pick

    @property
    def ejected(self) -> int:
        """Endpoints out of the inner balancer's choice now (probing ones included; none in panic mode)."""
        return 0 if self.panic else len(self._ejected)

    @property
    def listed(self) -> int:
        return len(self._listed)

    def release(self, ep: Endpoint) -> None:
        """A pick not used after all (another was preferred): undo what picking it counted, nothing else."""
        self._inner.done(ep, 0.0)

    def is_ejected(self, ep: Endpoint) -> bool:
        return ep.key in self._ejected

    def _pick_probing(self) -> Endpoint | None:
        if self._clock() >= self._wake:
            probe = self._start_probe()
            if probe is not None:
                return probe
        return self._inner.pick()

    def done(self, ep: Endpoint, latency_s: float, failure: str = "") -> bool:
        """Record the outcome of a call to `ep`; True when the set of ejected endpoints changed."""
        self._inner.done(ep, latency_s)
        if not failure:
            if self._failures or self._ejected:
                return self._succeeded(ep.key)
            return False
        return self._failed(ep.key, failure)

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._listed = _unique(endpoints)
        keys = {e.key for e in self._listed}
        for key in [k for k in self._failures if k not in keys]:
            del self._failures[key]
        # A drained (weight 0) endpoint takes no calls, so it is not probed either: it starts afresh.
        weighted = {e.key for e in self._listed if e.weight > 0}
        for key in [k for k in self._ejected if k not in weighted]:
            del self._ejected[key]
        self._rewire()

    def state(self) -> list[dict[str, object]]:
        now = self._clock()
        inner = {(s["address"], s["port"]): s for s in self._inner.state()}
        out: list[dict[str, object]] = []
        for e in self._listed:
            row: dict[str, object] = {**inner.get(e.key, {}), **_base_state(e)}
            ej = self._ejected.get(e.key)
            fails, reason = self._failures.get(e.key, (0, ""))
            if ej is None:
                row["state"] = "failing" if fails else "ready"
                row["consecutive_failures"] = fails
                if reason:
                    row["why"] = f"last failure: {reason}"
            else:
                row["state"] = "probing" if ej.probing else "ejected"
                row["why"] = ej.reason + (" (panic mode: every endpoint failing, all in use)" if self.panic else "")
                row["ejections_in_a_row"] = ej.count
                row["back_in_s"] = max(0.0, round(ej.until - now, 3))
            out.append(row)
        return out

    # ---- transitions ------------------------------------------------------------------------------------

    def _succeeded(self, key: tuple[str, int]) -> bool:
        self._failures.pop(key, None)
        ej = self._ejected.get(key)
        # A call placed before the ejection says nothing new; only the probe (or, in panic mode, any
        # call) brings an endpoint back.
        if ej is None or not (ej.probing or self.panic):
            return False
        del self._ejected[key]
        self._rewire()
        return True

    def _failed(self, key: tuple[str, int], failure: str) -> bool:
        ej = self._ejected.get(key)
        if ej is not None:
            if not ej.probing:
                return False  # a call placed before the ejection: the backoff already runs
            self._eject(key, ej.count + 1, f"probe failed: {failure}")
            return True
        count = self._failures.get(key, (0, ""))[0] + 1
        self._failures[key] = (count, failure)
        if count < self._threshold or not self._may_eject():
            return False
        del self._failures[key]
        self._eject(key, 1, f"{count} consecutive failures, last: {failure}")
        self.ejections += 1
        return True

    def _may_eject(self) -> bool:
        positive = sum(1 for e in self._listed if e.weight > 0)
        return len(self._ejected) + 1 <= math.floor(self._share * positive + 1e-9)

    def _eject(self, key: tuple[str, int], count: int, reason: str) -> None:
        until = self._clock() + eject_delay(count, self._rng, base=self._base, cap=self._max)
        self._ejected[key] = _Ejected(count, until, reason)
        self._rewire()

    def _start_probe(self) -> Endpoint | None:
        now = self._clock()
        due = [(ej.until, key) for key, ej in self._ejected.items() if not ej.probing and ej.until <= now]
        if not due:
            self._reset_wake()
            return None
        key = min(due)[1]
        self._ejected[key].probing = True
        self._reset_wake()
        return next(e for e in self._listed if e.key == key)

    def _reset_wake(self) -> None:
        self._wake = min((ej.until for ej in self._ejected.values() if not ej.probing), default=math.inf)

    def _rewire(self) -> None:
        """Give the inner balancer every listed endpoint, ejected ones at weight 0 (none in panic mode)."""
        ejected = self._ejected
        if ejected and all(e.key in ejected for e in self._listed if e.weight > 0):
            self.panic = True
            self._inner.update(self._listed)
        else:
            self.panic = False
            self._inner.update([replace(e, weight=0) if e.key in ejected else e for e in self._listed])
        self._reset_wake()
        self.pick = self._pick_probing if ejected else self._inner.pick
