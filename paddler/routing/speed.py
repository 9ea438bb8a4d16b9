"""How fast each upstream evaluates prompts, generates tokens and frees slots.

**Speeds** come from llama.cpp's own ``timings`` (the last chunk of a
stream, or a whole response): prompt speed = ``prompt_n`` / ``prompt_ms``
(else ``prompt_per_second``), generation speed = ``predicted_n`` /
``predicted_ms`` (else ``predicted_per_second``). Each is smoothed per
upstream by an exponentially weighted mean with a half-life of
L{HALF_LIFE_SAMPLES} = 8 full-weight samples; the first samples are
averaged (bias-corrected start), so one good sample replaces the prior. A
sample's weight grows with its size up to 1 at L{FULL_WEIGHT_PROMPT_TOKENS}
prompt tokens (64) or L{FULL_WEIGHT_GENERATED_TOKENS} generated tokens
(16): a cache hit that evaluated one token says little about prompt speed.
Zeros, negatives, NaN, infinities, strings and speeds above L{MAX_SPEED}
are ignored.

**Before an upstream is measured** its speed is the mean of the measured
upstreams, else the prior (L{PRIOR_PROMPT_SPEED} 1000 tokens/s,
L{PRIOR_GENERATION_SPEED} 30 tokens/s: a mid-range GPU serving a
7-8B-parameter model; only the ratios between upstreams steer the choice).

**Output length.** The share of its ``max_tokens`` (or ``n_predict``) a
request really generates is learnt fleet-wide (an EWMA of ``predicted_n`` /
bound, at most 1): L{SpeedTracker.expected_output} is the bound times that
share (until measured: the bound, at most the mean generated tokens), or
the upstream's mean generated tokens for a request without a bound.

**Drain rate**: slots freed per second, per upstream and fleet-wide, as an
exponentially decaying event count with a half-life of
L{DRAIN_HALF_LIFE_SECONDS} = 30 s on the injected clock (bias-corrected
while younger than that, over at least L{paddler.rates.MIN_DRAIN_WINDOW_SECONDS}).
L{SpeedTracker.expected_wait} turns it into the expected time until a slot
frees on a full upstream with C{ahead} requests already waiting for it:
``(ahead + 1) / rate``; with no release seen yet, the mean request time
(mean prompt / prompt speed + mean generated / generation speed) times
``(ahead + 1) / slots``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from paddler.rates import DRAIN_HALF_LIFE_SECONDS, DecayingRate

PRIOR_PROMPT_SPEED = 1000.0
PRIOR_GENERATION_SPEED = 30.0
#: Prior request shape until measured: prompt and generated tokens.
PRIOR_PROMPT_TOKENS = 500.0
PRIOR_GENERATED_TOKENS = 200.0
HALF_LIFE_SAMPLES = 8.0
FULL_WEIGHT_PROMPT_TOKENS = 64
FULL_WEIGHT_GENERATED_TOKENS = 16
#: Speeds above this (tokens/s) are taken for garbage.
MAX_SPEED = 1e7


def _number(value: Any) -> float | None:
    """A finite float, or None (bools, strings, NaN and infinities are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _speed(count: Any, ms: Any, per_second: Any) -> tuple[float | None, float]:
    """A speed from a count and milliseconds (else a per-second figure), and the count."""
    n = _number(count)
    t = _number(ms)
    speed: float | None = None
    if n is not None and t is not None and n > 0 and t > 0:
        speed = n * 1000.0 / t
    else:
        speed = _number(per_second)
    if speed is None or not 0 < speed <= MAX_SPEED:
        return None, 0.0
    return speed, n if n is not None and n > 0 else 0.0


@dataclass(frozen=True)
class TimingSample:
    """What one llama.cpp ``timings`` object says (None where it says nothing usable)."""

    prompt_speed: float | None
    prompt_tokens: float
    generation_speed: float | None
    generated_tokens: float
    cache_n: int


def parse_timings(timings: Any) -> TimingSample | None:
    """A L{TimingSample} from a ``timings`` JSON object, or None for anything else."""
    if not isinstance(timings, Mapping):
        return None
    prompt_speed, prompt_n = _speed(
        timings.get("prompt_n"), timings.get("prompt_ms"), timings.get("prompt_per_second")
    )
    generation_speed, predicted_n = _speed(
        timings.get("predicted_n"), timings.get("predicted_ms"), timings.get("predicted_per_second")
    )
    cache_n = _number(timings.get("cache_n"))
    if prompt_speed is None and generation_speed is None and cache_n is None:
        return None
    return TimingSample(
        prompt_speed, prompt_n, generation_speed, predicted_n,
        int(cache_n) if cache_n is not None and cache_n > 0 else 0,
    )


class Ewma:
    """An exponentially weighted mean over weighted samples, bias-corrected at the start.

    @param half_life: samples of weight 1 after which an old value counts half.
    """

    def __init__(self, half_life: float = HALF_LIFE_SAMPLES) -> None:
        self.alpha = 1.0 - 0.5 ** (1.0 / half_life)
        self.value: float | None = None
        self.weight = 0.0

    def add(self, sample: float, weight: float = 1.0) -> None:
        """Fold in a sample with a weight in (0, 1]."""
        if not weight > 0:
            return
        weight = min(1.0, weight)
        self.weight += weight
        if self.value is None:
            self.value = sample
            return
        rate = min(1.0, max(self.alpha, 1.0 / self.weight) * weight)
        mixed = (1.0 - rate) * self.value + rate * sample
        # A convex mix; clamp away rounding at extreme magnitudes.
        self.value = min(max(mixed, min(self.value, sample)), max(self.value, sample))


@dataclass(frozen=True)
class SpeedStats:
    """One upstream's figures, for ``/api/v1/state`` and metrics."""

    prompt_speed: float
    generation_speed: float
    prompt_measured: bool
    generation_measured: bool
    samples: int
    drain_rate: float
    mean_request_seconds: float


class _Upstream:
    def __init__(self, clock: IReactorTime, half_life: float, drain_half_life: float) -> None:
        self.prompt = Ewma(half_life)
        self.generation = Ewma(half_life)
        self.prompt_tokens = Ewma(half_life)
        self.generated_tokens = Ewma(half_life)
        self.drain = DecayingRate(clock, drain_half_life)
        self.samples = 0


class SpeedTracker:
    """Per-upstream prompt and generation speeds and slot drain rates.

    @param clock: the clock drain rates run on.
    """

    def __init__(
        self,
        clock: IReactorTime,
        prior_prompt_speed: float = PRIOR_PROMPT_SPEED,
        prior_generation_speed: float = PRIOR_GENERATION_SPEED,
        half_life_samples: float = HALF_LIFE_SAMPLES,
        drain_half_life: float = DRAIN_HALF_LIFE_SECONDS,
    ) -> None:
        self.clock = clock
        self.prior_prompt_speed = prior_prompt_speed
        self.prior_generation_speed = prior_generation_speed
        self.half_life_samples = half_life_samples
        self.drain_half_life = drain_half_life
        self._upstreams: dict[Hashable, _Upstream] = {}
        self._fleet: dict[str, float | None] = {}
        #: Share of its output bound a request generates (fleet-wide).
        self.output_share = Ewma(half_life_samples)

    def _get(self, upstream_id: Hashable) -> _Upstream:
        entry = self._upstreams.get(upstream_id)
        if entry is None:
            entry = self._upstreams[upstream_id] = _Upstream(
                self.clock, self.half_life_samples, self.drain_half_life
            )
        return entry

    def track(self, upstream_id: Hashable) -> None:
        """Start the drain-rate window of an upstream now (when it joins)."""
        self._get(upstream_id)

    def forget(self, upstream_id: Hashable) -> None:
        """Drop an upstream's figures (it left, or restarted on other hardware)."""
        self._upstreams.pop(upstream_id, None)
        self._fleet.clear()

    def observe(self, upstream_id: Hashable, timings: Any, max_tokens: int | None = None) -> TimingSample | None:
        """Learn from one response's ``timings`` object (and the request's output
        bound, when it had one); returns what was understood."""
        sample = parse_timings(timings)
        if sample is None:
            return None
        if max_tokens is not None and max_tokens > 0 and sample.generated_tokens:
            self.output_share.add(min(1.0, sample.generated_tokens / max_tokens))
        entry = self._get(upstream_id)
        entry.samples += 1
        self._fleet.clear()
        if sample.prompt_speed is not None:
            weight = min(1.0, sample.prompt_tokens / FULL_WEIGHT_PROMPT_TOKENS) or 0.25
            entry.prompt.add(sample.prompt_speed, weight)
        if sample.generation_speed is not None:
            weight = min(1.0, sample.generated_tokens / FULL_WEIGHT_GENERATED_TOKENS) or 0.25
            entry.generation.add(sample.generation_speed, weight)
        if sample.prompt_tokens or sample.cache_n:
            entry.prompt_tokens.add(sample.prompt_tokens + sample.cache_n)
        if sample.generated_tokens:
            entry.generated_tokens.add(sample.generated_tokens)
        return sample

    def slot_released(self, upstream_id: Hashable) -> None:
        """A slot of the upstream became free (a request to it ended)."""
        self._get(upstream_id).drain.event()

    def _fleet_mean(self, attribute: str) -> float | None:
        if attribute in self._fleet:
            return self._fleet[attribute]
        values = [
            getattr(entry, attribute).value for entry in self._upstreams.values()
            if getattr(entry, attribute).value is not None
        ]
        mean = sum(values) / len(values) if values else None
        self._fleet[attribute] = mean
        return mean

    def prompt_speed(self, upstream_id: Hashable) -> float:
        """Prompt tokens per second: measured, else the fleet's mean, else the prior."""
        entry = self._upstreams.get(upstream_id)
        if entry is not None and entry.prompt.value is not None:
            return entry.prompt.value
        fleet = self._fleet_mean("prompt")
        return fleet if fleet is not None else self.prior_prompt_speed

    def generation_speed(self, upstream_id: Hashable) -> float:
        """Generated tokens per second: measured, else the fleet's mean, else the prior."""
        entry = self._upstreams.get(upstream_id)
        if entry is not None and entry.generation.value is not None:
            return entry.generation.value
        fleet = self._fleet_mean("generation")
        return fleet if fleet is not None else self.prior_generation_speed

    def mean_request_seconds(self, upstream_id: Hashable) -> float:
        """How long a typical request holds a slot on this upstream."""
        entry = self._upstreams.get(upstream_id)
        prompt_tokens = PRIOR_PROMPT_TOKENS
        generated = PRIOR_GENERATED_TOKENS
        if entry is not None:
            if entry.prompt_tokens.value is not None:
                prompt_tokens = entry.prompt_tokens.value
            if entry.generated_tokens.value is not None:
                generated = entry.generated_tokens.value
        return (
            prompt_tokens / self.prompt_speed(upstream_id)
            + generated / self.generation_speed(upstream_id)
        )

    def mean_generated(self, upstream_id: Hashable) -> float:
        """Tokens a request generates on this upstream, on average (None: on the fleet's
        upstreams; the prior until measured)."""
        entry = self._upstreams.get(upstream_id)
        if entry is not None and entry.generated_tokens.value is not None:
            return entry.generated_tokens.value
        if upstream_id is None:
            fleet = self._fleet_mean("generated_tokens")
            if fleet is not None:
                return fleet
        return PRIOR_GENERATED_TOKENS

    def expected_output(self, upstream_id: Hashable, max_tokens: int | None) -> float:
        """Tokens a request with this output bound (None: none) is expected to generate."""
        if max_tokens is None or max_tokens <= 0:
            return self.mean_generated(upstream_id)
        share = self.output_share.value
        if share is None:
            return min(float(max_tokens), self.mean_generated(upstream_id))
        return max_tokens * share

    def drain_rate(self, upstream_id: Hashable) -> float:
        """Slots this upstream frees per second (0 before the first release)."""
        entry = self._upstreams.get(upstream_id)
        return entry.drain.rate() if entry is not None else 0.0

    def fleet_drain_rate(self) -> float:
        """Slots the whole fleet frees per second."""
        return sum(entry.drain.rate() for entry in self._upstreams.values())

    def expected_wait(self, upstream_id: Hashable, slots_total: int, ahead: int = 0) -> float:
        """Seconds until a slot of a full upstream is free for a request with C{ahead}
        requests already waiting for it."""
        rate = self.drain_rate(upstream_id)
        if rate > 0:
            return (ahead + 1) / rate
        return self.mean_request_seconds(upstream_id) * (ahead + 1) / max(1, slots_total)

    def stats(self, upstream_id: Hashable) -> SpeedStats:
        """One upstream's figures."""
        entry = self._upstreams.get(upstream_id)
        return SpeedStats(
            prompt_speed=self.prompt_speed(upstream_id),
            generation_speed=self.generation_speed(upstream_id),
            prompt_measured=entry is not None and entry.prompt.value is not None,
            generation_measured=entry is not None and entry.generation.value is not None,
            samples=entry.samples if entry is not None else 0,
            drain_rate=self.drain_rate(upstream_id),
            mean_request_seconds=self.mean_request_seconds(upstream_id),
        )
