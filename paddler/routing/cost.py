"""The cost model: which upstream gives a request its first token soonest.

For each candidate upstream (a small L{Candidate} record the pool fills in)::

    wait     = 0 with an idle slot, else the candidate's expected wait
    uncached = max(1, prompt tokens - cached tokens)    (llama.cpp evaluates >= 1)
    prefill  = uncached / prompt speed
    ttft     = wait + prefill
    cost     = ttft + output tokens / generation speed  (output tokens: 0 unless given)

L{rank} orders the candidates that have an idle slot by cost, costs within
L{TIE_SECONDS} (5 ms) of the cheapest counting as equal to it; ties go to the most idle slots,
then the faster generation speed (the whole request ends sooner there: on
a trace without shared prefixes this kept slow servers for overflow, as the
ideal FIFO does, where the lowest load had sent them work first; with an
output term, speeds within L{GENERATION_SPEED_TOLERANCE} of the fastest are
one speed here too), then the fewer resident conversations per slot
(C{Candidate.resident}: a new conversation goes where it will not have to
share slots with more conversations than the others; two 2-slot servers,
replay: 1.031 -> 1.020x the sticky ideal's prompt tokens), then the
lowest load (in flight / slots), then the least recently chosen, then the
order they were given in. With no cache information and equal speeds every cost is the
same and the order is the ``slots`` policy's: most idle slots first.
Candidates without an idle slot follow, by cost: the pool never sends an
upstream more requests than it has slots, so a hot prefix cannot pile up
on one server, whatever its cache holds.

**Pressure.** While requests wait in the buffer (every slot busy), a second
of prefill on a slot is a second the requests behind cannot have it: the
cost then weighs prefill by ``1 + pressure``, where ``pressure`` is the
requests waiting per slot of the fleet (capped at L{MAX_PRESSURE}). With an
empty buffer the weight is 1 and the cost is the time to first token; with
a queue, the choice leans toward upstreams that hold the prompt (fewer
tokens evaluated twice) and the hold-out below toward waiting for them.

**Waiting for a warm server.** When a full candidate's cost beats the best
free one's by more than C{min_gain}, *and* its expected wait is below the
prefill it saves (the best free one's prefill minus its own, weighed by
``1 + pressure``), *and* that wait is at most C{max_wait}, the L{Decision} says "wait for it up to
``wait_up_to`` seconds": the break-even point (the best free one's ttft
minus the warm one's prefill), capped by C{max_wait}. After that the
request takes the best free upstream, so no request waits past the bound
for affinity. Whether the upstream *is* still the best when a slot frees is
the pool's call to L{rank} again.

**Waiting for a faster generator** (the ``cache-aware`` policy passes
C{output_tokens} for a prompt no upstream holds a quarter of). The
generation time a full candidate saves counts in the saving too, as
C{generation_share} (L{GENERATION_HOLD_SHARE}, a quarter) of it divided by
``1 + pressure``, and only while its expected wait is at most
C{generation_max_wait} (L{GENERATION_MAX_WAIT}, 1 s): a 400-token answer
waits a few hundred milliseconds for a 60 tokens/s server instead of
taking 20 s on a free 20 tokens/s one; a short answer does not wait.
Generation speeds within L{GENERATION_SPEED_TOLERANCE} (50 %: a factor
of 2) of the fastest candidate's count as that speed: servers of one kind,
measured with noise, tie and spread by idle slots (at 25 %, two real
llama-servers of one kind measured on shared cores still differed enough
to decide first turns: 1.17 / 1.23 / 1.13x the sticky ideal's prompt
tokens against 0.98 / 0.93 / 1.20 at 50 %); a 3x faster server still wins. (The
whole saving instead of a quarter bought the same end-to-end p99 for a
24 % worse TTFT p99 on the scheduling trace, in ``bench/routesim.py``.)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

#: Costs closer than this (seconds) are ties.
TIE_SECONDS = 0.005
#: Longest a request may wait for a busy warm upstream (seconds).
DEFAULT_MAX_WAIT = 5.0
#: Least ttft saving (seconds) worth waiting for.
DEFAULT_MIN_GAIN = 0.02
#: A request may wait for a busy upstream that generates faster for up to
#: this share of the generation time it saves there ...
GENERATION_HOLD_SHARE = 0.25
#: ... when that upstream's expected wait is at most this (seconds).
GENERATION_MAX_WAIT = 1.0
#: Generation speeds within this share of the fastest candidate's (a factor of 2) count as the same speed.
GENERATION_SPEED_TOLERANCE = 0.5
#: Largest prefill weight beyond 1 (requests waiting per slot).
MAX_PRESSURE = 4.0
_SLOWEST = 1e-6  # tokens/s used in place of a speed that is zero or not a number


@dataclass(slots=True)
class Candidate:
    """What the cost model needs to know about one eligible upstream.

    @ivar id: the upstream's id (any hashable).
    @ivar slots_idle: slots free now (the pool dispatches only to these).
    @ivar slots_total: the upstream's slots.
    @ivar in_flight: requests the balancer has running there.
    @ivar expected_wait: seconds until a slot frees when none is idle
        (L{paddler.routing.speed.SpeedTracker.expected_wait}).
    @ivar cached_tokens: prompt tokens of this request it likely holds
        (L{paddler.routing.prefix.PrefixIndex.match}, in tokens).
    @ivar prompt_speed: prompt tokens per second.
    @ivar generation_speed: generated tokens per second.
    @ivar last_chosen: when it was last chosen (a choice counter; ties go to the oldest).
    @ivar resident: prompts it took lately and still holds, per slot
        (L{paddler.routing.router.Router.resident}): among cold ties, the
        upstream with fewer conversations per slot takes a new one.
    """

    id: Hashable
    slots_idle: int
    slots_total: int
    in_flight: int
    expected_wait: float
    cached_tokens: int
    prompt_speed: float
    generation_speed: float
    last_chosen: float = -math.inf
    resident: float = 0.0

    @property
    def free(self) -> bool:
        """Whether a request can be dispatched to it now."""
        return self.slots_idle > 0 and self.in_flight < self.slots_total

    @property
    def load(self) -> float:
        """Share of its slots in use by the balancer's requests."""
        return self.in_flight / self.slots_total if self.slots_total > 0 else 1.0


@dataclass(slots=True)
class Estimate:
    """The cost model's figures for one candidate (seconds)."""

    candidate: Candidate
    wait: float
    prefill: float
    ttft: float
    cost: float
    generation: float = 0.0

    @property
    def id(self) -> Hashable:
        return self.candidate.id

    @property
    def free(self) -> bool:
        return self.candidate.free


@dataclass(frozen=True)
class Decision:
    """The ranking of one request's candidates, best first.

    @ivar ranked: every candidate once: those with an idle slot by cost, then
        the full ones by cost.
    @ivar wait_for: a full upstream worth waiting for, or None.
    @ivar wait_up_to: how long to wait for it (seconds; 0 when C{wait_for} is None).
    """

    ranked: tuple[Estimate, ...]
    wait_for: Hashable | None = None
    wait_up_to: float = 0.0
    saving: float = field(default=0.0)

    @property
    def best(self) -> Estimate | None:
        """The best candidate with an idle slot, or None."""
        if self.ranked and self.ranked[0].free:
            return self.ranked[0]
        return None

    @property
    def order(self) -> list[Hashable]:
        """The candidates' ids, best first."""
        return [estimate.id for estimate in self.ranked]


def _speed(value: float) -> float:
    return value if value > 0 and math.isfinite(value) else _SLOWEST


def estimate(
    candidate: Candidate, prompt_tokens: int, output_tokens: float = 0.0, pressure: float = 0.0
) -> Estimate:
    """The cost model's figures for one candidate (C{cost} weighs prefill by 1 + C{pressure})."""
    prompt_tokens = max(0, prompt_tokens)
    cached = min(max(0, candidate.cached_tokens), max(0, prompt_tokens - 1))
    uncached = prompt_tokens - cached
    prefill = uncached / _speed(candidate.prompt_speed)
    if candidate.free:
        wait = 0.0
    else:
        wait = candidate.expected_wait
        if not (wait >= 0 and math.isfinite(wait)):
            wait = math.inf
    ttft = wait + prefill
    generation = max(0.0, output_tokens) / _speed(candidate.generation_speed)
    weight = 1.0 + _pressure(pressure)
    return Estimate(candidate, wait, prefill, ttft, wait + prefill * weight + generation, generation)


def _pressure(pressure: float) -> float:
    return min(MAX_PRESSURE, pressure) if pressure > 0 else 0.0


def _tie_key(cost: float, cheapest: float) -> float:
    """0 for a cost within L{TIE_SECONDS} of the cheapest of its group (a tie), else the cost.

    Relative to the cheapest, not fixed buckets: two upstreams measured at
    1999.9 and 2000.1 tokens/s are a tie wherever their costs fall.
    """
    if not math.isfinite(cost):
        return math.inf
    return 0.0 if cost <= cheapest + TIE_SECONDS else cost


def rank(
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    *,
    output_tokens: float = 0.0,
    max_wait: float = DEFAULT_MAX_WAIT,
    min_gain: float = DEFAULT_MIN_GAIN,
    pressure: float = 0.0,
    generation_share: float = GENERATION_HOLD_SHARE,
    generation_max_wait: float = GENERATION_MAX_WAIT,
) -> Decision:
    """Rank the candidates for a request of C{prompt_tokens} (estimated) tokens.

    @param output_tokens: tokens the request is expected to generate (0:
        rank by time to first token only).
    @param pressure: requests waiting in the buffer per slot of the fleet.
    @param max_wait: the longest a request may wait for a busy warm upstream.
    @param min_gain: the least ttft saving worth waiting for.
    @param generation_share: the share of the generation time a busy faster
        generator saves that a request may wait for it (L{GENERATION_HOLD_SHARE}).
    @param generation_max_wait: the longest expected wait for which generation
        time saved counts (L{GENERATION_MAX_WAIT}).
    """
    weight = 1.0 + _pressure(pressure)
    # while requests wait, the slot a holder takes is one they cannot have: its own
    # generation time counts less, as prefill counts more
    generation_share = generation_share / weight
    estimates = [estimate(c, prompt_tokens, output_tokens, pressure) for c in candidates]
    if output_tokens > 0 and estimates:
        # generation speeds within GENERATION_SPEED_TOLERANCE of the fastest are one speed:
        # servers of one kind, measured with noise, tie and spread by idle slots
        fastest = min(e.generation for e in estimates)
        for e in estimates:
            if e.generation * (1.0 - GENERATION_SPEED_TOLERANCE) <= fastest:
                e.cost -= e.generation - fastest
                e.generation = fastest
    keys = []
    frees = [e.wait == 0.0 and e.free for e in estimates]
    cheapest = {
        group: min((e.cost for e, f in zip(estimates, frees) if f == group), default=math.inf)
        for group in (True, False)
    }
    for position, e in enumerate(estimates):
        c = e.candidate
        free = frees[position]
        load = c.in_flight / c.slots_total if c.slots_total > 0 else 1.0
        # with an output term, generation speeds were banded above: the band, not noise, decides
        speed = output_tokens / e.generation if output_tokens > 0 and e.generation > 0 else _speed(c.generation_speed)
        keys.append((not free, _tie_key(e.cost, cheapest[free]), -c.slots_idle, -speed, c.resident, load,
                     c.last_chosen, position))
    ranked = tuple(estimates[key[-1]] for key in sorted(keys))
    best = ranked[0] if ranked and ranked[0].free else None
    if best is None or max_wait <= 0:
        return Decision(ranked)
    warm: Estimate | None = None
    for e in ranked[1:]:
        if e.free or not math.isfinite(e.ttft):
            continue
        saved = (best.prefill - e.prefill) * weight
        generation_saved = generation_share * (best.generation - e.generation)
        if generation_saved > 0 and e.wait <= generation_max_wait:
            saved += generation_saved
        gain = best.cost - e.cost
        if e.wait < saved and e.wait <= max_wait and gain > min_gain:
            if warm is None or e.cost < warm.cost:
                warm = e
    if warm is None:
        return Decision(ranked)
    generation_saved = generation_share * (best.generation - warm.generation)
    if generation_saved > 0 and warm.wait <= generation_max_wait:
        wait_up_to = min(max_wait, best.ttft - warm.prefill + generation_saved)
    else:
        wait_up_to = min(max_wait, best.ttft - warm.prefill)
    return Decision(ranked, warm.id, wait_up_to, best.cost - warm.cost)
