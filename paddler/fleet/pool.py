"""The fleet: upstreams, slot leases and the buffer of requests waiting for a slot."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.config import BalancerConfig
from paddler.errors import BufferFull, BufferingDisabled, BufferTimeout, ShuttingDown
from paddler.interfaces import ISlotChooser, ISlotSource
from paddler.fleet.routers import children_of, prefer_loaded
from paddler.fleet.upstream import Observation, SlotsSeen, Upstream, UpstreamState
from paddler.fleet.demand import ModelDemand
from paddler.rates import DecayingRate

#: The longest Retry-After the balancer advises, in seconds.
MAX_RETRY_AFTER = 300


def _retry_after(wait: float) -> bytes:
    """A C{Retry-After} value: C{wait} in whole seconds, from 1 to L{MAX_RETRY_AFTER}."""
    return str(max(1, min(MAX_RETRY_AFTER, math.ceil(wait)))).encode("ascii")


def _expected(wait: float | None) -> str:
    if wait is None:
        return "no slot was freed lately"
    return f"a request buffered now would wait about {wait:.0f} s at the rate slots free"


class Lease:
    """One slot held on one upstream for one request; C{release} gives it back once."""

    __slots__ = ("pool", "upstream", "number", "waited", "demand", "released", "on_release", "granted")

    def __init__(
        self,
        pool: UpstreamPool,
        upstream: Upstream,
        number: int,
        waited: float,
        demand: Any,
        on_release: Callable[[bool], object] | None = None,
    ) -> None:
        self.pool = pool
        self.upstream = upstream
        self.number = number
        self.waited = waited
        self.demand = demand
        self.released = False
        self.on_release = on_release  # the shared store's side of the lease; called with still_running
        self.granted = pool.clock.seconds()

    def release(self, timings: Any = None, still_running: bool = False) -> None:
        """
        The request ended: give the slot back, and tell the policy (with
        llama.cpp's C{timings} when the answer had them). C{still_running}:
        the client left but llama.cpp goes on with the request, so the slot
        stays busy until a probe reads the server's own figure.
        """
        if self.released:
            return
        self.released = True
        if still_running:
            self.upstream.ghost_lease(self.number)
        else:
            self.upstream.return_lease(self.number)
            self.pool.slot_freed()
        if self.on_release is not None:
            self.on_release(still_running)
        self.pool.chooser.finished(self.upstream, self.demand, timings)
        if self.upstream.router_model is not None:
            self.pool.demand.served(self.upstream.router_model, self.pool.clock.seconds() - self.granted)
        self.pool.lease_returned(self.upstream)


class _Waiter:
    __slots__ = ("model", "exclude", "demand", "deferred", "enqueued_at", "timeout_call", "elsewhere")

    def __init__(
        self,
        model: str | None,
        exclude: frozenset[str],
        demand: Any,
        enqueued_at: float,
        on_cancel: Callable[[_Waiter], None],
    ) -> None:
        self.model = model
        self.exclude = exclude
        self.demand = demand
        self.enqueued_at = enqueued_at
        self.deferred: Deferred[Lease] = Deferred(lambda _: on_cancel(self))
        self.timeout_call: IDelayedCall | None = None
        #: where it waits now when it was handed over (L{UpstreamPool.hand_waiters_over})
        self.elsewhere: Deferred[Lease] | None = None


def _settle_waiter(result: Any, waiter: _Waiter) -> None:
    """The outcome of a waiter handed over, given to its own Deferred (a lease nobody wants goes back)."""
    waiter.elsewhere = None
    if not waiter.deferred.called:
        if isinstance(result, Failure):
            waiter.deferred.errback(result)
        else:
            waiter.deferred.callback(result)
    elif not isinstance(result, Failure):
        result.release()


@implementer(ISlotSource)
class LocalSlotSource:
    """The slots of a pool that shares them with no other balancer: its own view, its own buffer."""

    requests_waiting = 0

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    def acquire(
        self, model: str | None, exclude: frozenset[str], demand: Any, since: float | None = None
    ) -> Deferred[Lease]:
        return self.pool.acquire_locally(model, exclude, demand, since)

    def admits(self, upstream: Upstream) -> bool:
        return True

    def taken_locally(self, lease: Lease) -> None:
        pass

    def describe(self) -> dict[str, Any] | None:
        return None

    def stop_waiting(self, error: Exception) -> None:
        pass


class UpstreamPool:
    """
    The upstreams the balancer knows, and the FIFO buffer of requests waiting
    for a slot. A freed slot (a lease returned, a probe or agent report, a new
    or undrained upstream) is handed to the oldest waiter that can use it in
    the same reactor turn: L{capacity_changed} is called synchronously.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        chooser: ISlotChooser,
        max_buffered: int = BalancerConfig.max_buffered_requests,
        buffer_timeout: float = BalancerConfig.buffered_request_timeout,
        no_upstream_timeout: float | None = None,
    ) -> None:
        self.clock = clock
        self.chooser = chooser
        self.max_buffered = max_buffered
        self.buffer_timeout = buffer_timeout
        #: How long a request waits while nothing can serve (paddler.fleet.unserved); None: no
        #: such limit (the buffer timeout, answered 504 like a busy fleet).
        self.no_upstream_timeout = no_upstream_timeout
        #: Agents registered that have not reported yet (they count as "registering").
        self.registering: Callable[[], int] = lambda: 0
        #: Seconds until the balancer can learn that an upstream came back (the probe interval).
        self.recheck_interval = 1.0
        self.upstreams: dict[str, Upstream] = {}
        self._waiters: deque[_Waiter] = deque()
        self._choices = 0
        self._handing_out = False
        self._again = False
        self._listeners: list[Callable[[str, Upstream | None], None]] = []
        self._removals: dict[str, list[Deferred[Upstream | None]]] = {}
        self._recheck: IDelayedCall | None = None
        #: Slots our requests gave back, per second (decaying): how fast the buffer can drain.
        self.slots_freed = DecayingRate(clock, min_window=1.0)
        self._observers: list[Callable[[Upstream, Observation, bool], None]] = []
        #: Where leases and waiters live: this process (L{LocalSlotSource}), or with --state the
        #: shared slot store's side (L{paddler.sharedstate.fleet.SharedFleet}).
        self.slots: ISlotSource = LocalSlotSource(self)
        #: C{load_eta(model)}: seconds until a load of C{model} under way is expected done, else
        #: None (set by L{paddler.fleet.placement.ModelPlacement}); a timed-out waiter's Retry-After.
        self.load_eta: Callable[[str], float | None] | None = None
        #: True with --model-placement: routers' unloaded models wait for paddler's loads.
        self.model_placement = False
        #: Each model's demand in slots (arrivals and lease seconds), read by model placement.
        self.demand = ModelDemand(clock)

    # -- membership -------------------------------------------------------

    def subscribe(self, listener: Callable[[str, Upstream | None], None]) -> Callable[[], None]:
        """Call C{listener(event, upstream)} on "added", "removed" and "changed"; return an unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def subscribe_observations(
        self, listener: Callable[[Upstream, Observation, bool], None]
    ) -> Callable[[], None]:
        """Call C{listener(upstream, observation, state_changed)} after each observation; return an unsubscriber."""
        self._observers.append(listener)
        return lambda: self._observers.remove(listener)

    def notify(self, event: str, upstream: Upstream | None = None) -> None:
        for listener in list(self._listeners):
            try:
                listener(event, upstream)
            except Exception:
                self.log.failure("pool listener failed on {event}", event=event)

    def add(self, upstream: Upstream) -> Upstream:
        """Add C{upstream}, or return the one already registered at its URL."""
        existing = self.upstreams.get(upstream.id)
        if existing is not None:
            return existing
        self.upstreams[upstream.id] = upstream
        self.log.info(
            "upstream {name} ({url}) added from {source}",
            name=upstream.name,
            url=upstream.url,
            source=upstream.source,
        )
        self.notify("added", upstream)
        self.capacity_changed()
        return upstream

    def remove(self, upstream_id: str) -> Upstream | None:
        """Remove the upstream now, whatever it is doing; settle a pending removal."""
        upstream = self.upstreams.pop(upstream_id, None)
        if upstream is not None:
            self.log.info(
                "upstream {name} ({url}) removed", name=upstream.name, url=upstream.url
            )
            self.chooser.forget(upstream)
            self.notify("removed", upstream)
            for child in children_of(list(self.upstreams.values()), upstream):
                self.remove(child.id)  # a router's models go with it
            if self._waiters:
                self._cut_waits_short()
        for waiting in self._removals.pop(upstream_id, []):
            waiting.callback(upstream)
        return upstream

    # -- what is learnt about an upstream ----------------------------------

    def observe(self, upstream: Upstream, observation: Observation) -> None:
        """
        The one place where an upstream's health and slots change: a probe,
        an agent report or the proxy hands over what it saw; the upstream
        applies its transition table, listeners hear of it and freed
        capacity goes to waiters now. Observations of an upstream no longer
        in the pool (removed while a probe ran) are dropped.
        """
        if self.upstreams.get(upstream.id) is not upstream:
            return
        slots_before = upstream.slots_total
        changed = upstream.record(observation, self.clock.seconds())
        if changed and not upstream.state.serving:
            self.chooser.forget(upstream)  # restarting or gone: its prompt cache is not to be trusted
        elif upstream.slots_total != slots_before and slots_before:
            self.chooser.forget(upstream)  # a server with another slot count was restarted
        for observer in list(self._observers):
            try:
                observer(upstream, observation, changed)
            except Exception:
                self.log.failure("pool observer failed")
        if upstream.role == "router" and not isinstance(observation, SlotsSeen):
            for child in children_of(list(self.upstreams.values()), upstream):
                self.observe(child, observation)  # a router that fails fails for all its models
        self.notify("changed", upstream)
        self.capacity_changed()
        if changed and self._waiters:
            self._cut_waits_short()

    # -- draining ---------------------------------------------------------
    #
    # Draining lives here, not in the management API, so that it works the
    # same whoever asks (an operator, an agent shutting down, agent expiry).
    # A draining upstream takes no new request (``accepts_requests``); its
    # leases stay valid. ``remove_when_idle`` removes it when its last lease
    # is returned (``lease_returned``), or at once when none is out.

    def drain(self, upstream_id: str, requested: bool = False) -> Upstream | None:
        """
        Send no new request to the upstream; return it, or C{None} if unknown.
        C{requested}: an operator (or an agent stopping) asked for it, so an
        agent's next report does not undo it.
        """
        upstream = self.upstreams.get(upstream_id)
        if upstream is None:
            return None
        if requested:
            upstream.drain_requested = True
        for child in children_of(list(self.upstreams.values()), upstream):
            self.drain(child.id, requested)  # a router drains with all its models
        if not upstream.draining:
            upstream.draining = True
            self.log.info(
                "upstream {name} ({url}) draining, {in_flight} requests in flight",
                name=upstream.name,
                url=upstream.url,
                in_flight=upstream.in_flight,
            )
            self.notify("changed", upstream)
        return upstream

    def undrain(self, upstream_id: str) -> Upstream | None:
        """Take traffic again (cancelling a pending removal); free slots go to waiters now."""
        upstream = self.upstreams.get(upstream_id)
        if upstream is None:
            return None
        self.cancel_removal(upstream_id)
        for child in children_of(list(self.upstreams.values()), upstream):
            self.undrain(child.id)
        upstream.drain_requested = False
        if upstream.draining:
            upstream.draining = False
            self.log.info("upstream {name} ({url}) undrained", name=upstream.name, url=upstream.url)
            self.notify("changed", upstream)
            self.capacity_changed()
        return upstream

    def remove_when_idle(self, upstream_id: str) -> Deferred[Upstream | None] | None:
        """
        Drain the upstream and remove it once no request of ours runs on it.
        Return C{None} if the id is unknown, else a Deferred that fires with
        the upstream when it is removed, or with C{None} if the removal is
        cancelled (L{undrain}, L{cancel_removal}).
        """
        upstream = self.drain(upstream_id)
        if upstream is None:
            return None
        removed: Deferred[Upstream | None] = Deferred()
        self._removals.setdefault(upstream_id, []).append(removed)
        self._remove_if_idle(upstream)
        return removed

    def removal_pending(self, upstream_id: str) -> bool:
        return upstream_id in self._removals

    def cancel_removal(self, upstream_id: str) -> bool:
        """Forget a pending removal (the upstream stays draining); return whether one was pending."""
        waiting = self._removals.pop(upstream_id, None)
        if waiting is None:
            return False
        for removed in waiting:
            removed.callback(None)
        return True

    def _remove_if_idle(self, upstream: Upstream) -> None:
        if upstream.id in self._removals and upstream.in_flight == 0:
            if any(c.in_flight for c in children_of(list(self.upstreams.values()), upstream)):
                return  # a router: when its models' requests are done
            if self.upstreams.get(upstream.id) is upstream:
                self.remove(upstream.id)

    def lease_returned(self, upstream: Upstream) -> None:
        """A request on C{upstream} ended: finish a pending removal, hand the slot on."""
        self._remove_if_idle(upstream)
        parent = self.upstreams.get(upstream.parent_id) if upstream.parent_id is not None else None
        if parent is not None:
            self._remove_if_idle(parent)
        self.capacity_changed()

    def find(self, key: str) -> Upstream | None:
        """The upstream with id, name or URL C{key}."""
        if key in self.upstreams:
            return self.upstreams[key]
        for upstream in self.upstreams.values():
            if key in (upstream.name, upstream.url):
                return upstream
        return None

    @property
    def shared(self) -> Any:
        """The shared slot store's side (L{paddler.sharedstate.fleet.SharedFleet}) with --state, else None.
        Setting it makes it the pool's slot source (None: back to the local one)."""
        return None if isinstance(self.slots, LocalSlotSource) else self.slots

    @shared.setter
    def shared(self, source: ISlotSource | None) -> None:
        self.slots = LocalSlotSource(self) if source is None else source

    # -- choosing ---------------------------------------------------------

    def eligible(self, model: str | None, exclude: Iterable[str] = ()) -> list[Upstream]:
        """Upstreams that may take a request for C{model} now.

        When some upstream of the fleet serves C{model}, only those do;
        otherwise the model name is ignored, as llama.cpp ignores it.
        """
        excluded = set(exclude)
        candidates = [
            u for u in self.upstreams.values() if u.accepts_requests and u.id not in excluded
        ]
        if model is not None and any(u.serves(model) for u in self.upstreams.values()):
            candidates = prefer_loaded([u for u in candidates if u.serves(model)])
        return [u for u in candidates if self.slots.admits(u)]

    def ranked(self, model: str | None, exclude: Iterable[str] = (), demand: Any = None) -> list[Upstream]:
        """The upstreams that may take the request, best first by the policy (full ones included)."""
        return list(self.chooser.rank(self.eligible(model, exclude), model, demand))

    def mark_chosen(self, upstream: Upstream) -> None:
        """Note that C{upstream} was just given a request (ties go to the least recently chosen)."""
        self._choices += 1
        upstream.last_chosen = self._choices

    def _try_lease(self, model: str | None, exclude: frozenset[str], waited: float, demand: Any) -> Lease | None:
        upstream = self.chooser.choose(self.eligible(model, exclude), model, demand)
        if upstream is None:
            return None
        lease = self.grant(upstream, waited, demand)
        self.slots.taken_locally(lease)
        return lease

    def grant(
        self,
        upstream: Upstream,
        waited: float,
        demand: Any,
        on_release: Callable[[bool], object] | None = None,
    ) -> Lease:
        """
        Give a request a slot on C{upstream}: the one rule for granting, used
        for a local lease and for the local mirror of a shared one. It notes
        the choice, takes the slot, tells the policy and the listeners.
        C{on_release}: the shared store's side of the lease, if any.
        """
        self.mark_chosen(upstream)
        lease = Lease(self, upstream, upstream.take_lease(), waited, demand, on_release=on_release)
        self.chooser.dispatched(upstream, demand)
        self.notify("changed", upstream)
        return lease

    def pick_any(
        self, exclude: Iterable[str] = (), model: str | None = None, routers_only: bool = False
    ) -> Upstream | None:
        """An upstream for a request that takes no slot (``/v1/models``, ``/tokenize``...), one
        serving C{model} when it names one; with C{routers_only}, a router-mode server itself."""
        candidates = [] if routers_only else self.eligible(model, exclude)
        if model is None:
            # A router answers what names no model itself (/props, /models, CORS preflights,
            # /tools): it is a candidate too, and the only one while it lists no model.
            excluded = set(exclude)
            candidates += [
                u for u in self.upstreams.values()
                if u.role == "router" and u.state is UpstreamState.HEALTHY and not u.draining
                and u.id not in excluded
            ]
        if not candidates:
            return None
        upstream = max(candidates, key=lambda u: (u.slots_idle, -u.last_chosen))
        self.mark_chosen(upstream)
        return upstream

    def acquire(
        self, model: str | None = None, exclude: Iterable[str] = (), demand: Any = None, since: float | None = None
    ) -> Deferred[Lease]:
        """
        A lease on a free slot, now or when one frees up. Fails with
        L{BufferingDisabled} when buffering is off, L{BufferFull} when the
        buffer is full, L{BufferTimeout} when the wait runs out. Cancelling the
        Deferred (the client left) takes the request out of the buffer.
        C{demand} is what the policy's C{prepare} made of the request;
        C{since}, when it already waited elsewhere (the shared buffer), the
        time it began waiting: its deadline stays the same. A request that names a model
        counts as one arrival for it (L{demand}) unless it is a retry (C{exclude} or C{since}).
        """
        if model and since is None and not exclude:
            self.demand.arrived(model)
        return self.slots.acquire(model, frozenset(exclude), demand, since)  # type: ignore[no-any-return]

    def acquire_locally(
        self, model: str | None, excluded: frozenset[str], demand: Any = None, since: float | None = None
    ) -> Deferred[Lease]:
        """L{acquire} from this process's own view of the fleet and its own buffer (what a slot source
        without a store, or with its store down, does)."""
        now = self.clock.seconds()
        started = now if since is None else since
        if not self._waiters:
            lease = self._try_lease(model, excluded, now - started, demand)
            if lease is not None:
                return succeed(lease)
        if self.max_buffered == 0:
            return fail(BufferingDisabled("no free slot on any upstream and buffering is disabled"))
        if len(self._waiters) >= self.max_buffered and not self._make_room_for(model):
            return fail(self.buffer_full_error())
        remaining = self.buffer_timeout - (now - started)
        if remaining <= 0:
            return fail(self.buffer_timeout_error())
        if self.no_upstream_timeout is not None and self.nothing_can_serve():
            remaining = min(remaining, self.no_upstream_timeout - (now - started))
            if remaining <= 0:
                return fail(self.no_healthy_upstream_error(now - started))
        waiter = _Waiter(model, excluded, demand, started, self._leave)
        waiter.timeout_call = self.clock.callLater(remaining, self._expire, waiter)
        self._waiters.append(waiter)
        self.notify("changed")
        self.capacity_changed()
        return waiter.deferred

    def _make_room_for(self, model: str | None) -> bool:
        """
        The buffer is full: in a multi-model fleet each model has its own FIFO inside the
        shared limit, so a request for a model with fewer waiters than the most-waited-for
        model takes the place of that model's newest waiter (answered 503 "buffer full"):
        a cold model's burst cannot keep a hot model's requests out. Return whether room
        was made.
        """
        if not any(u.role == "router" for u in self.upstreams.values()):
            return False
        counts = self.buffered_by_model(local_only=True)
        mine = counts.get(model or "", 0)
        crowded = max(counts, key=lambda m: counts[m])
        if counts[crowded] <= mine + 1:
            return False
        victim = next(w for w in reversed(self._waiters) if (w.model or "") == crowded)
        self._leave(victim)
        self.log.info(
            "buffer full: a request for {model} takes the place of the newest of {count} waiting for {crowded}",
            model=model, count=counts[crowded], crowded=crowded,
        )
        victim.deferred.errback(self.buffer_full_error(f", {counts[crowded]} of them for model {crowded}"))
        return True

    def buffered_by_model(self, local_only: bool = False) -> dict[str, int]:
        """Requests waiting for a slot per model ("" for those naming none, and for the
        shared buffer's, which are not told apart)."""
        counts: dict[str, int] = {}
        for waiter in self._waiters:
            key = waiter.model or ""
            counts[key] = counts.get(key, 0) + 1
        elsewhere = 0 if local_only else self.slots.requests_waiting
        if elsewhere:
            counts[""] = counts.get("", 0) + elsewhere
        return counts

    def oldest_waiting_since(self) -> dict[str, float]:
        """When the oldest of this process's buffered requests for each named model began
        waiting (a model named by no request is absent)."""
        oldest: dict[str, float] = {}
        for waiter in self._waiters:  # oldest first
            if waiter.model and waiter.model not in oldest:
                oldest[waiter.model] = waiter.enqueued_at
        return oldest

    def waiting_here_by_model(self) -> dict[str, int]:
        """This process's requests waiting for a slot per model: in its buffer and, with
        shared state, through the store (its FIFO, or for an upstream that may take them)."""
        counts = self.buffered_by_model(local_only=True)
        if self.shared is not None:
            for key, waiting in self.shared.waiting_by_model().items():
                counts[key] = counts.get(key, 0) + waiting
        return counts

    def hand_waiters_over(self, acquire: Callable[[str | None, frozenset[str], Any, float], Deferred[Lease]]) -> int:
        """
        Give the requests waiting here to C{acquire} (the shared store answers
        again: they wait in its FIFO instead), oldest first; each keeps its
        Deferred, its deadline (C{acquire} gets the time it began waiting) and
        its client's cancel. Returns how many.
        """
        waiters = list(self._waiters)
        for waiter in waiters:
            if waiter not in self._waiters or waiter.deferred.called:
                continue  # served meanwhile, by a slot an earlier one gave back at once
            self._leave(waiter)
            elsewhere = acquire(waiter.model, waiter.exclude, waiter.demand, waiter.enqueued_at)
            waiter.elsewhere = elsewhere
            elsewhere.addBoth(_settle_waiter, waiter)
        return len(waiters)

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.elsewhere is not None:
            elsewhere, waiter.elsewhere = waiter.elsewhere, None
            if not elsewhere.called:
                elsewhere.cancel()
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            self.notify("changed")
        if waiter.timeout_call is not None and waiter.timeout_call.active():
            waiter.timeout_call.cancel()

    def _expire(self, waiter: _Waiter) -> None:
        waiter.timeout_call = None
        waited = self.clock.seconds() - waiter.enqueued_at
        if self.no_upstream_timeout is not None and self.nothing_can_serve():
            self._leave(waiter)
            waiter.deferred.errback(self.no_healthy_upstream_error(waited))
            return
        left = self.buffer_timeout - waited
        if left > 1e-9:  # cut short while nothing could serve; something can now
            waiter.timeout_call = self.clock.callLater(left, self._expire, waiter)
            return
        self._leave(waiter)
        error = self.buffer_timeout_error()
        eta = self.load_eta(waiter.model) if waiter.model and self.load_eta is not None else None
        if eta is not None:
            # its model is being loaded: retry once the load is expected to be done
            error.headers[b"retry-after"] = _retry_after(eta)
            error.headers[b"x-should-retry"] = b"true"
            error.message += f"; model {waiter.model} is loading, expected in about {eta:.0f} s"
        waiter.deferred.errback(error)

    def nothing_can_serve(self) -> bool:
        """No upstream healthy, loading or just added, and no agent registering (L{paddler.fleet.unserved})."""
        from paddler.fleet.unserved import nothing_can_serve

        return nothing_can_serve(self.upstreams.values(), self.registering())

    def no_healthy_upstream_error(self, waited: float = 0.0) -> Any:
        """The 503 saying why nothing can serve."""
        from paddler.fleet.unserved import no_healthy_upstream

        return no_healthy_upstream(
            list(self.upstreams.values()), waited, self.no_upstream_timeout or 0.0, self.recheck_interval
        )

    def _cut_waits_short(self) -> None:
        """Nothing can serve any more: the waiters wait at most --no-upstream-timeout from now."""
        if self.no_upstream_timeout is None or not self.nothing_can_serve():
            return
        latest = self.clock.seconds() + self.no_upstream_timeout
        for waiter in self._waiters:
            call = waiter.timeout_call
            if call is not None and call.active() and call.getTime() > latest:
                call.reset(max(0.0, self.no_upstream_timeout))

    def buffer_full_error(self, where: str = "") -> BufferFull:
        """The 503 for a full buffer, with a Retry-After from the rate at which slots free."""
        wait = self.expected_wait()
        return BufferFull(
            f"the request buffer is full ({self.max_buffered} requests waiting for a slot{where}); "
            + _expected(wait),
            # With no slot freed lately there is nothing to go by: 1 s.
            headers={b"retry-after": _retry_after(1.0 if wait is None else wait)},
        )

    def buffer_timeout_error(self) -> BufferTimeout:
        """The 504 for a request that waited --buffered-request-timeout, saying whether a retry is useful."""
        wait = self.expected_wait()
        # A retry joins the back of the buffer: useful only if it can get a
        # slot before it times out in turn (the OpenAI SDKs read x-should-retry).
        useful = wait is not None and wait < self.buffer_timeout
        headers = {b"x-should-retry": b"true" if useful else b"false"}
        if wait is not None and useful:
            headers[b"retry-after"] = _retry_after(wait)
        return BufferTimeout(
            f"no slot became free within {self.buffer_timeout:g} s (--buffered-request-timeout); "
            + _expected(wait)
            + ("" if useful else "; retrying now would most likely time out again"),
            headers=headers,
        )

    def slot_freed(self) -> None:
        """One of our requests gave its slot back."""
        if self.slots_freed.rate() < 0.01:
            # Nothing freed for minutes (idle, or just started): measure afresh,
            # so the first busy seconds are not averaged with the quiet ones.
            self.slots_freed = DecayingRate(self.clock, min_window=1.0)
        self.slots_freed.event()

    def expected_wait(self) -> float | None:
        """
        Seconds until a request buffered now would get a slot: the requests
        ahead of it, plus one, over the rate at which slots free (decaying
        over about a minute); C{None} when no slot was freed lately.
        """
        rate = self.slots_freed.rate()
        if rate <= 1e-6:
            return None
        return (len(self._waiters) + 1) / rate

    def capacity_changed(self) -> None:
        """
        Hand free slots to waiters, oldest first, now. A waiter the policy
        holds back for a busy upstream (C{demand.recheck_at}) lets the ones
        behind it take free slots meanwhile, and is asked again at that time.
        """
        if self._handing_out:
            self._again = True
            return
        self._handing_out = True
        try:
            self._again = True
            while self._again:
                self._again = False
                for waiter in list(self._waiters):
                    if waiter not in self._waiters:
                        continue
                    lease = self._try_lease(
                        waiter.model,
                        waiter.exclude,
                        self.clock.seconds() - waiter.enqueued_at,
                        waiter.demand,
                    )
                    if lease is None:
                        continue
                    self._leave(waiter)
                    waiter.deferred.callback(lease)
        finally:
            self._handing_out = False
        self._schedule_recheck()

    def _schedule_recheck(self) -> None:
        due = [
            w.demand.recheck_at
            for w in self._waiters
            if w.demand is not None and getattr(w.demand, "recheck_at", None) is not None
        ]
        when = min(due) if due else None
        current = self._recheck
        if current is not None and current.active():
            if when is not None and current.getTime() <= when:
                return
            current.cancel()
        self._recheck = None
        if when is not None:
            self._recheck = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None
        self.capacity_changed()

    # -- figures ----------------------------------------------------------

    @property
    def requests_buffered(self) -> int:
        """Requests of this process waiting for a slot (in its own buffer or the shared one)."""
        return len(self._waiters) + self.slots.requests_waiting

    def oldest_buffered_wait(self) -> float:
        if not self._waiters:
            return 0.0
        return max(0.0, self.clock.seconds() - self._waiters[0].enqueued_at)

    def totals(self) -> dict[str, Any]:
        usable = [u for u in self.upstreams.values() if u.accepts_requests]
        return {
            "slots_idle": sum(u.slots_idle for u in usable),
            "slots_processing": sum(u.slots_processing for u in self.upstreams.values()),
            "slots_total": sum(u.slots_total for u in usable),
            "requests_buffered": self.requests_buffered,
            "oldest_buffered_wait": self.oldest_buffered_wait(),
            "requests_in_flight": sum(u.in_flight for u in self.upstreams.values()),
            "upstreams": {"healthy": len(usable), "total": len(self.upstreams)},
        }

    def health(self) -> tuple[int, dict[str, Any]]:
        """The aggregated C{/health}: 200 while a request can be served or buffered."""
        totals = self.totals()
        body: dict[str, Any] = {
            "status": "ok",
            "slots_idle": totals["slots_idle"],
            "slots_processing": totals["slots_processing"],
            "requests_buffered": totals["requests_buffered"],
            "upstreams": totals["upstreams"],
        }
        shared_state = self.slots.describe()
        if shared_state is not None:
            body["shared_state"] = shared_state
        if any(u.role == "router" for u in self.upstreams.values()):
            body["models"] = self._health_by_model()
        if totals["upstreams"]["healthy"]:
            return 200, body
        if self.max_buffered and self.requests_buffered < self.max_buffered:
            return 200, body
        body["status"] = "error"
        body["message"] = (
            "no healthy upstream and the request buffer is "
            + ("disabled" if not self.max_buffered else "full")
        )
        return 503, body

    def _health_by_model(self) -> dict[str, dict[str, Any]]:
        """Per model served (multi-model fleets): idle slots where it is loaded, upstreams where
        it is loaded, and requests waiting for it."""
        buffered = self.buffered_by_model()
        models: dict[str, dict[str, Any]] = {}
        for upstream in self.upstreams.values():
            if upstream.role == "router" or not upstream.models:
                continue
            model = upstream.router_model or upstream.models[0]
            entry = models.setdefault(model, {"slots_idle": 0, "loaded_on": 0, "requests_buffered": 0})
            if upstream.accepts_requests and upstream.loaded:
                entry["slots_idle"] += upstream.slots_idle
                entry["loaded_on"] += 1
        for model, count in buffered.items():
            if model in models:
                models[model]["requests_buffered"] = count
        return dict(sorted(models.items()))

    def stop(self) -> None:
        """Fail every waiter (the balancer is stopping)."""
        if self._recheck is not None and self._recheck.active():
            self._recheck.cancel()
        self._recheck = None
        shutting_down = ShuttingDown("the balancer is shutting down", headers={b"retry-after": b"1"})
        while self._waiters:
            waiter = self._waiters[0]
            self._leave(waiter)
            waiter.deferred.errback(shutting_down)
        self.slots.stop_waiting(shutting_down)
