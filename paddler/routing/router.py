"""The cost-aware chooser's state, in one object the pool drives.

Per request::

    request = router.prepare(body, path, headers)     # once, when it arrives
    decision = router.rank(request, views)            # each time it could be dispatched
    router.dispatched(request, upstream_id)           # when sent
    router.finished(request, upstream_id, timings)    # when it ends (timings may be None)

and per upstream ``router.forget(upstream_id)`` when it leaves, restarts or
reports a cache reset. L{UpstreamView} is what the pool knows of an eligible
upstream at that moment. Explicit conversations (``X-Session-ID`` or
``user``) stay on the upstream that served their last turn while it is
eligible: first when it has an idle slot, else waited for (up to
C{max_wait}) when its expected wait is within the bound, else ranked like
any request (and re-pinned wherever it goes).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.interfaces import IReactorTime

from paddler.routing.cost import (
    DEFAULT_MAX_WAIT,
    DEFAULT_MIN_GAIN,
    Candidate,
    Decision,
    rank,
)
from paddler.routing.prefix import DEFAULT_MAX_BLOCKS, PrefixIndex, block_hashes, blocks_to_tokens
from paddler.routing.prompt import PromptInfo, prompt_info
from paddler.routing.speed import SpeedTracker

#: Ticket numbers of dispatched requests, unique across Routers: after a reload
#: (a new Router), requests sent by the old one must not match the new one's tickets.
_TICKETS = itertools.count(1)

#: Conversations remembered (least recently used dropped first).
DEFAULT_MAX_CONVERSATIONS = 100_000
#: A request is warm when an upstream holds at least this share of its prompt:
#: then the cache decides and generation speed only breaks ties.
WARM_SHARE = 0.25
#: Prompts an upstream took within this many seconds and still holds count as resident there.
RESIDENT_SECONDS = 60.0
#: A running request past its expected end is taken to need this share of
#: its expected duration again.
OVERRUN_SHARE = 0.1


@dataclass(frozen=True)
class UpstreamView:
    """An eligible upstream as the pool sees it when ranking.

    @ivar waiting_ahead: requests already waiting for this upstream in particular.
    """

    id: Hashable
    slots_idle: int
    slots_total: int
    in_flight: int
    waiting_ahead: int = 0


@dataclass(frozen=True)
class RoutedRequest:
    """A request prepared for routing: its prompt and block hashes, and what was predicted."""

    info: PromptInfo
    blocks: tuple[int, ...]
    predicted: tuple[tuple[Hashable, int], ...] = ()
    ticket: int = 0

    def predicted_blocks(self, upstream_id: Hashable) -> int:
        for key, blocks in self.predicted:
            if key == upstream_id:
                return blocks
        return 0


class Router:
    """Prefix index, speeds, conversations and the cost model, for one pool.

    @param clock: the clock speeds, drain rates and tie-breaks run on.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        max_wait: float = DEFAULT_MAX_WAIT,
        min_gain: float = DEFAULT_MIN_GAIN,
        max_conversations: int = DEFAULT_MAX_CONVERSATIONS,
        weigh_output: bool = False,
    ) -> None:
        self.clock = clock
        self.index = PrefixIndex(max_blocks)
        self.speeds = SpeedTracker(clock)
        self.max_wait = max_wait
        self.min_gain = min_gain
        self.max_conversations = max_conversations
        self.weigh_output = weigh_output
        self._conversations: OrderedDict[str, Hashable] = OrderedDict()
        self._last_chosen: dict[Hashable, float] = {}
        #: Per upstream, the requests sent there and not finished: ticket -> (start, expected end).
        self._running: dict[Hashable, dict[int, tuple[float, float]]] = {}
        #: Slots of each upstream as last ranked (what its newest prefix entries stand for).
        self._slots: dict[Hashable, int] = {}
        #: Per upstream, the prefix entries recorded there (last block hash) and when, oldest first.
        self._recorded: dict[Hashable, OrderedDict[int, float]] = {}
        self._choices = 0

    def prepare(self, body: Any, path: str | bytes, headers: Any = None) -> RoutedRequest:
        """Derive a request's prompt and block hashes (never raises)."""
        info = prompt_info(body, path, headers)
        return RoutedRequest(info, tuple(block_hashes(info.text)) if info.text else ())

    def candidates(self, request: RoutedRequest, views: Sequence[UpstreamView]) -> list[Candidate]:
        """The cost model's records for these upstreams."""
        out = []
        for view in views:
            self._slots[view.id] = view.slots_total
            matched = self.index.match(view.id, request.blocks) if request.blocks else 0
            full = view.slots_idle <= 0 or view.in_flight >= view.slots_total
            out.append(Candidate(
                id=view.id,
                slots_idle=view.slots_idle,
                slots_total=view.slots_total,
                in_flight=view.in_flight,
                expected_wait=self.expected_wait(view) if full else 0.0,
                cached_tokens=min(blocks_to_tokens(matched), request.info.tokens),
                prompt_speed=self.speeds.prompt_speed(view.id),
                generation_speed=self.speeds.generation_speed(view.id),
                last_chosen=self._last_chosen.get(view.id, -math.inf),
                resident=self.resident(view.id) / view.slots_total if view.slots_total > 0 else 0.0,
            ))
        return out

    def resident(self, upstream_id: Hashable) -> int:
        """Prompts recorded on the upstream in the last L{RESIDENT_SECONDS} that its index still
        holds as entries: about the conversations living there (a conversation's next turn
        replaces its entry, so it counts once)."""
        recorded = self._recorded.get(upstream_id)
        if not recorded:
            return 0
        horizon = self.clock.seconds() - RESIDENT_SECONDS
        while recorded:
            key, when = next(iter(recorded.items()))
            if when >= horizon:
                break
            del recorded[key]
        return sum(1 for key in recorded if self.index.holds_entry(upstream_id, key))

    def expected_wait(self, view: UpstreamView) -> float:
        """Seconds until a slot of a full upstream is free for a request with
        C{view.waiting_ahead} requests already waiting for it.

        When every slot runs a request of ours, from the expected end of each
        (L{expected_duration}, noted at dispatch): the (ahead + 1)-th soonest,
        plus a mean duration per lap beyond the slots. Otherwise (other
        clients use the server too) from the measured drain rate
        (L{SpeedTracker.expected_wait}).
        """
        running = self._running.get(view.id)
        if running and view.slots_total > 0 and len(running) >= view.slots_total:
            now = self.clock.seconds()
            remaining = sorted(
                max(end - now, OVERRUN_SHARE * (end - start)) for start, end in running.values()
            )
            lap, position = divmod(max(0, view.waiting_ahead), len(remaining))
            if not lap:
                return remaining[position]
            mean = sum(end - start for start, end in running.values()) / len(running)
            return remaining[position] + lap * mean
        return self.speeds.expected_wait(view.id, view.slots_total, view.waiting_ahead)

    def expected_duration(self, request: RoutedRequest, upstream_id: Hashable, cached_tokens: int = 0) -> float:
        """Seconds the request is expected to hold a slot of the upstream:
        its uncached prompt at the upstream's prompt speed, then its expected
        output (L{SpeedTracker.expected_output}) at its generation speed."""
        speeds = self.speeds
        uncached = max(1, request.info.tokens - max(0, cached_tokens))
        output = speeds.expected_output(upstream_id, request.info.max_tokens)
        return uncached / speeds.prompt_speed(upstream_id) + output / speeds.generation_speed(upstream_id)

    def rank(self, request: RoutedRequest, views: Sequence[UpstreamView], waiting: int = 0) -> Decision:
        """Rank the eligible upstreams for a request (see L{paddler.routing.cost.rank});
        C{waiting}: requests waiting in the buffer besides this one."""
        candidates = self.candidates(request, views)
        slots = sum(max(0, view.slots_total) for view in views)
        output = 0.0
        if self.weigh_output and not self.warm_somewhere(request, candidates):
            output = self.speeds.expected_output(None, request.info.max_tokens)
        decision = rank(
            candidates, request.info.tokens, output_tokens=output, max_wait=self.max_wait,
            min_gain=self.min_gain, pressure=waiting / slots if slots and waiting > 0 else 0.0,
        )
        pinned = self.conversation_upstream(request)
        if pinned is None:
            return decision
        mine = next((e for e in decision.ranked if e.id == pinned), None)
        if mine is None:
            return decision  # not eligible now: rank like any request
        others = tuple(e for e in decision.ranked if e.id != pinned)
        if mine.free:
            return Decision((mine, *others))
        if mine.wait <= self.max_wait and decision.best is not None:
            return Decision(decision.ranked, pinned, self.max_wait, 0.0)
        return decision

    def warm_somewhere(self, request: RoutedRequest, candidates: Sequence[Candidate]) -> bool:
        """Whether some candidate holds at least L{WARM_SHARE} of the request's prompt."""
        need = max(1, int(request.info.tokens * WARM_SHARE))
        return any(c.cached_tokens >= need for c in candidates)

    def conversation_upstream(self, request: RoutedRequest) -> Hashable | None:
        """The upstream a request's conversation is pinned to, if any."""
        key = request.info.conversation
        return self._conversations.get(key) if key is not None else None

    def dispatched(self, request: RoutedRequest, upstream_id: Hashable) -> RoutedRequest:
        """The request was sent to C{upstream_id}: index its prefix there, pin its
        conversation, note the choice. Returns the request with the prediction
        to check in L{finished}."""
        predicted = self.index.match(upstream_id, request.blocks) if request.blocks else 0
        now = self.clock.seconds()
        if request.blocks:
            self.index.record(upstream_id, request.blocks, self._slots.get(upstream_id, 0))
            recorded = self._recorded.setdefault(upstream_id, OrderedDict())
            newest = self.index.newest_entry(upstream_id)
            if newest is not None:
                recorded[newest] = now
                recorded.move_to_end(newest)
        key = request.info.conversation
        if key is not None:
            self._conversations[key] = upstream_id
            self._conversations.move_to_end(key)
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        self._choices += 1
        # a counter, not the clock: several choices in one reactor turn must still rotate
        self._last_chosen[upstream_id] = self._choices
        ticket = next(_TICKETS)
        duration = self.expected_duration(request, upstream_id, blocks_to_tokens(predicted))
        self._running.setdefault(upstream_id, {})[ticket] = (now, now + duration)
        return replace(request, predicted=((upstream_id, predicted),), ticket=ticket)

    def finished(self, request: RoutedRequest, upstream_id: Hashable, timings: Any = None) -> None:
        """The request ended on C{upstream_id} (its slot is free again); learn from the
        response's ``timings`` object when there is one."""
        running = self._running.get(upstream_id)
        if running is not None:
            running.pop(request.ticket, None)
            if not running:
                del self._running[upstream_id]
        self.speeds.slot_released(upstream_id)
        sample = (
            self.speeds.observe(upstream_id, timings, request.info.max_tokens) if timings is not None else None
        )
        if sample is not None and request.blocks:
            self.index.verify(
                upstream_id, request.blocks, request.predicted_blocks(upstream_id), sample.cache_n
            )

    def track(self, upstream_id: Hashable) -> None:
        """An upstream joined (starts its drain-rate window)."""
        self.speeds.track(upstream_id)

    def forget(self, upstream_id: Hashable, speeds: bool = False) -> None:
        """Drop what the index knows of an upstream (left, restarted, cache reset);
        with C{speeds}, its measured speeds too."""
        self.index.forget(upstream_id)
        if speeds:
            self.speeds.forget(upstream_id)
        for key in [k for k, v in self._conversations.items() if v == upstream_id]:
            del self._conversations[key]
        self._last_chosen.pop(upstream_id, None)
        self._slots.pop(upstream_id, None)
        self._recorded.pop(upstream_id, None)

    def stats(self, upstream_id: Hashable) -> dict[str, Any]:
        """Per-upstream figures for ``/api/v1/state``, Prometheus and StatsD."""
        prefix = self.index.stats(upstream_id)
        speed = self.speeds.stats(upstream_id)
        return {
            "prefix_blocks": prefix.blocks,
            "prefix_capacity": prefix.capacity,
            "prefix_recorded": prefix.recorded,
            "prefix_hits": prefix.verified_hits,
            "prefix_misses": prefix.verified_misses,
            "tokens_saved": prefix.tokens_saved,
            "prompt_tokens_per_second": speed.prompt_speed,
            "generation_tokens_per_second": speed.generation_speed,
            "speeds_measured": speed.prompt_measured and speed.generation_measured,
            "slots_freed_per_second": speed.drain_rate,
        }


__all__ = ["RoutedRequest", "Router", "UpstreamView"]
