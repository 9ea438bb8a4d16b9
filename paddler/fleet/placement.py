"""Placing models across router-mode upstreams (``--model-placement``).

With placement on, paddler loads models itself instead of letting each
router autoload the model of whatever request it is sent: a child upstream of
a model that is not loaded takes no request (L{paddler.fleet.routers}), so
requests for it wait in the buffer, and every C{interval} this service looks
at the models requests wait for, and at each model's demand: the slots its
requests keep busy (L{paddler.fleet.demand.ModelDemand}: arrivals over the
last C{demand_window} seconds times the seconds a request holds a slot):

- a model loaded nowhere (and loading nowhere) is loaded on one router that
  lists it: one with room under its C{max_instances} first (fewest models
  running), else in place of a copy that serves and waits for nothing, has
  been loaded for at least C{min_residency} seconds (no thrashing), and is
  I{surplus}: its model's demand fits in that model's other copies at
  L{SURPLUS_FILL} of their slots (the lowest share first, then the one idle
  longest). Failing that, the copy of a model whose demand is at most
  1/L{LAST_COPY_MARGIN} of the newcomer's (its last copy, possibly);
- a loaded model gets one more copy (up to C{replicas_max}) only while it is
  I{short}: requests wait for it, every slot of its copies is busy and its
  demand passes L{REPLICA_FILL} of their slots, without a break for
  C{replica_after} seconds; the copy goes to a free place or in place of a
  surplus copy, never of a copy its model needs (a request that waited for a
  moment does not add a copy; a model with steady demand is not evicted for
  another's extra copy);
- at most one load per model at a time. A load is ``POST /models/unload`` of
  the victim (when one is needed), ``POST /models/load``, then probes of the
  router until its ``/models`` says ``loaded`` (the waiting requests are then
  handed its slots by the pool) or ``failed``, within C{load_timeout}.

With shared state (C{claims}: the L{paddler.interfaces.ISlotStore} of
``--state``) every load is first claimed in the store: one balancer at a time
places a model (the claim lasts the load, and C{settle} seconds after it, so
the others read the model loaded before they could place it again), and the
store refuses to evict a model placed there, by any balancer, less than
C{min_residency} seconds ago. A refused claim is the other balancer's load:
this one waits. A store that does not answer (within C{claim_timeout}) does
not stop placement: the load goes ahead on this balancer's view alone.

Every decision is logged and goes to the event log (``model_load`` entries:
model, upstream, why (``why``: the requests waiting, or the copy number and
the shortage), the evicted model, how long it was idle and why it could go
(``evicted_why``: its demand and the slots of its other copies), outcome,
seconds)
and to ``paddler_model_loads_total{model,upstream,outcome}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.fleet.routers import children_of
from paddler.fleet.upstream import Upstream
from paddler.llamacpp.errors import error_message
from paddler.upstream.failures import describe_failure

__all__ = ["ModelPlacement", "PlacementError"]

#: C{post(router, path, body)} -> C{(status, body)}.
Poster = Callable[[Upstream, str, dict[str, Any]], "Deferred[tuple[int, bytes]]"]
#: C{probe_now(router)}: a Deferred that fires once a fresh reading was applied.
ProbeNow = Callable[[Upstream], "Deferred[Any]"]

_RUNNING = ("loaded", "loading", "sleeping")
#: A model is short of slots (and, that lasting, gets one more copy) when its demand passes
#: this share of its copies' slots.
REPLICA_FILL = 1.0
#: A copy is surplus, so it may be evicted for another model, when its model's demand fits in
#: its other copies at this share of their slots (below L{REPLICA_FILL}: hysteresis).
SURPLUS_FILL = 0.6
#: A copy that is not surplus is evicted only for a model loaded nowhere, and only when that
#: model's demand is at least this many times its model's (never for one more copy).
LAST_COPY_MARGIN = 2.0
#: A request for a model loaded nowhere that has waited this many of the model's load times
#: (at least L{MIN_PATIENCE} seconds) may have the last copy of a model with less demand
#: evicted for it, whatever the margin: no request waits for ever behind busier models.
PATIENCE_LOADS = 4.0
MIN_PATIENCE = 5.0
#: The load time assumed for a model before any load was seen.
UNKNOWN_LOAD_SECONDS = 10.0
#: Buckets of paddler_model_load_seconds: a tiny model loads in well under a second, a big one in minutes.
LOAD_SECONDS_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class PlacementError(Exception):
    """A load that did not go through (the router refused, the model failed, the deadline passed)."""


@dataclass
class _Load:
    model: str
    router: Upstream
    child: Upstream
    victim: str | None
    victim_idle: float | None
    started: float
    running: Deferred[Any] | None = None
    claimed: bool = False
    #: Why the model is loaded ("copy 2: demand 4.9 slots over 2 for 10 s") and why the victim may go.
    why: str = ""
    victim_why: str = ""


class ModelPlacement(Service):
    """Loads the models requests wait for onto router-mode upstreams (see the module docstring).

    @param pool: the L{UpstreamPool}.
    @param clock: the reactor's clock.
    @param post: sends a JSON POST to a router.
    @param probe_now: probes a router at once (the probe service's C{probe_now}).
    @param events: the L{FleetEvents} log, or None.
    @param demand_window: seconds of arrivals a model's demand is counted over.
    @param replica_after: seconds a model must stay short of slots before it gets one more copy.
    """

    log = Logger()

    def __init__(
        self,
        pool: Any,
        clock: IReactorTime,
        post: Poster,
        probe_now: ProbeNow,
        events: Any = None,
        interval: float = 0.5,
        min_residency: float = 30.0,
        load_timeout: float = 300.0,
        replicas_max: int = 1,
        poll_interval: float = 0.25,
        claims: Any = None,
        settle: float = 5.0,
        claim_timeout: float = 1.0,
        demand_window: float = 30.0,
        replica_after: float = 10.0,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.post = post
        self.probe_now = probe_now
        self.events = events
        self.interval = interval
        self.min_residency = min_residency
        self.load_timeout = load_timeout
        self.replicas_max = replicas_max
        self.poll_interval = poll_interval
        self.claims = claims
        self.settle = settle
        self.claim_timeout = claim_timeout
        self.loading: dict[str, _Load] = {}
        #: (model, upstream name, outcome) -> loads: ``loaded``, ``failed``, ``refused``, ``timeout``.
        self.loads_total: dict[tuple[str, str, str], int] = {}
        from paddler.observability.prometheus import Histogram

        #: How long the loads that went through took.
        self.load_seconds = Histogram(
            "paddler_model_load_seconds", "Seconds from placing a model to the router saying loaded.",
            LOAD_SECONDS_BUCKETS,
        )
        self._loop: LoopingCall | None = None
        self._unplaceable: set[str] = set()
        #: Model -> since when it has been short of slots (see L{_place}).
        self._short_since: dict[str, float] = {}
        self.replica_after = replica_after
        if pool.demand.window != demand_window:
            from paddler.fleet.demand import ModelDemand

            pool.demand = ModelDemand(pool.clock, demand_window)
        pool.model_placement = True  # children of unloaded models wait for our loads
        pool.load_eta = self.load_eta

    # -- lifetime ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.pool.model_placement = True
        loop = self._loop = LoopingCall(self.check)
        loop.clock = self.clock
        loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("model placement loop stopped", f)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for load in list(self.loading.values()):
            if load.running is not None:
                load.running.cancel()
        return None

    # -- deciding ---------------------------------------------------------

    def check(self) -> None:
        """Start the loads the waiting requests call for; never raises (the loop must go on)."""
        try:
            self._place()
        except Exception:
            self.log.failure("model placement check failed")

    def _model_of(self, name: str) -> str | None:
        """The router model a requested name stands for (itself, or one of its aliases)."""
        return next((u.router_model for u in self.pool.upstreams.values()
                     if u.router_model is not None and name and u.serves(name)), None)

    def _slots_per_copy(self, model: str) -> int:
        """Slots a copy of C{model} has: as seen loaded, else any model's, else 1."""
        seen = [u.slots_total or u.slots_when_loaded for u in self.pool.upstreams.values()
                if u.router_model == model and (u.slots_total or u.slots_when_loaded)]
        if not seen:
            seen = [u.slots_total or u.slots_when_loaded for u in self.pool.upstreams.values()
                    if u.router_model is not None and (u.slots_total or u.slots_when_loaded)]
        return max(seen) if seen else 1

    def _running(self, child: Upstream) -> bool:
        """A copy that holds (or is about to hold) a place on its router, not on its way out."""
        if child.model_state not in _RUNNING:
            return False
        return not any(load.victim == child.router_model and load.router.id == child.parent_id
                       for load in self.loading.values())

    def _capacity(self, model: str) -> int:
        """Slots of C{model}'s copies loaded or loading (loads of ours under way included)."""
        copies = [u for u in self.pool.upstreams.values() if u.router_model == model and self._running(u)]
        slots = sum(u.slots_total or self._slots_per_copy(model) for u in copies)
        if model in self.loading and not any(u.id == self.loading[model].child.id for u in copies):
            slots += self._slots_per_copy(model)
        return slots

    def demands(self) -> dict[str, float]:
        """Each router model's demand in slots now (L{paddler.fleet.demand.ModelDemand}), with
        the requests waiting for it counted, its busy slots sampled for the floor."""
        names: dict[str, list[str]] = {}
        busy: dict[str, int] = {}
        for u in self.pool.upstreams.values():
            if u.router_model is None:
                continue
            names.setdefault(u.router_model, []).extend(u.models)
            if u.model_state in ("loaded", "sleeping"):
                busy[u.router_model] = busy.get(u.router_model, 0) + u.slots_processing
        waiting = self._waiting()
        demand = self.pool.demand
        result = {}
        for model, aliases in names.items():
            demand.observe_busy(model, busy.get(model, 0))
            result[model] = demand.slots(model, aliases, waiting.get(model, 0))
        return result

    def _patience(self, model: str) -> float:
        """Seconds a request for C{model}, loaded nowhere, waits before a last copy may go for it."""
        learned = self._learned_loads(model) or self._learned_loads(None)
        expected = max(learned) if learned else UNKNOWN_LOAD_SECONDS
        return max(MIN_PATIENCE, PATIENCE_LOADS * expected)

    def _learned_loads(self, model: str | None) -> list[float]:
        """The load times learned for C{model}'s copies (C{None}: for any router model's)."""
        return [u.load_seconds for u in self.pool.upstreams.values()
                if u.router_model is not None and (model is None or u.router_model == model)
                and u.load_seconds is not None]

    def _waited(self) -> dict[str, float]:
        """Per router model, how long its oldest request buffered here has waited."""
        now = self.clock.seconds()
        waited: dict[str, float] = {}
        for name, since in self.pool.oldest_waiting_since().items():
            served = self._model_of(name)
            if served is not None:
                waited[served] = max(waited.get(served, 0.0), now - since)
        return waited

    def _waiting(self) -> dict[str, int]:
        waiting: dict[str, int] = {}
        for name, count in self.pool.waiting_here_by_model().items():
            # a request may name a model by one of its router's aliases: count it for the model
            served = self._model_of(name)
            if served is not None:
                waiting[served] = waiting.get(served, 0) + count
        return waiting

    def _place(self) -> None:
        now = self.clock.seconds()
        waiting = self._waiting()
        waited = self._waited()
        demand = self.demands()
        # a model is short while requests wait for it, every slot of its copies is busy and its
        # demand passes their slots; only a shortage that lasts replica_after seconds adds a copy
        short: dict[str, tuple[float, int]] = {}
        for model, slots in demand.items():
            loaded = [u for u in self.pool.upstreams.values() if u.router_model == model
                      and u.model_state in ("loaded", "sleeping") and u.accepts_requests]
            capacity = self._capacity(model)
            if (waiting.get(model) and loaded and not any(c.slots_idle > 0 for c in loaded)
                    and slots > REPLICA_FILL * capacity):
                short[model] = (slots, capacity)
                self._short_since.setdefault(model, now)
            else:
                self._short_since.pop(model, None)
        # models loaded nowhere first (their requests can only wait), then the most short of slots
        order = sorted(waiting, key=lambda m: (
            any(u.router_model == m and u.model_state in ("loaded", "sleeping") for u in self.pool.upstreams.values()),
            -(demand.get(m, 0.0) - self._capacity(m)), -waiting[m], m))
        for model in order:
            if model in self.loading:
                continue
            copies = [u for u in self.pool.upstreams.values() if u.router_model == model]
            if any(c.model_state == "loading" for c in copies):
                continue  # a router is loading it already (its own autoload, or an operator)
            loaded = [c for c in copies if c.model_state in ("loaded", "sleeping") and c.accepts_requests]
            if loaded:
                if len(loaded) >= self.replicas_max or model not in short:
                    continue
                if now - self._short_since[model] < self.replica_after:
                    continue
                slots, capacity = short[model]
                why = (f"copy {len(loaded) + 1}: demand {slots:.1f} slots over {capacity} "
                       f"for {now - self._short_since[model]:.0f} s")
            else:
                why = f"{waiting[model]} waiting, demand {demand.get(model, 0.0):.1f} slots"
            choice = self._choose(model, copies, waiting, demand, replica=bool(loaded),
                                  waited=0.0 if loaded else waited.get(model, 0.0))
            if choice is None:
                if model not in self._unplaceable:
                    self._unplaceable.add(model)
                    self.log.warn(
                        "model {model} ({why}): no router can load it now (no free place, and every "
                        "loaded model there is in use, needed by its demand or loaded less than "
                        "{residency:g} s ago)",
                        model=model, why=why, residency=self.min_residency,
                    )
                continue
            self._unplaceable.discard(model)
            self._short_since.pop(model, None)  # a further copy waits for a shortage of its own
            router, child, victim, victim_why = choice
            if self.claims is None:
                self._start(model, router, child, victim, why=why, victim_why=victim_why)
            else:
                self._claim(model, router, child, victim, why, victim_why)

    def _choose(
        self, model: str, copies: list[Upstream], waiting: dict[str, int], demand: dict[str, float],
        replica: bool, waited: float = 0.0,
    ) -> tuple[Upstream, Upstream, Upstream | None, str] | None:
        """(router, child, victim or None, why the victim may go) for a new copy of C{model}, or
        None. A free place first; else a copy whose model's demand its other copies cover at
        L{SURPLUS_FILL} of their slots; for a model loaded nowhere (not a C{replica}), else the
        copy of a model whose demand is at most 1/L{LAST_COPY_MARGIN} of C{model}'s, or, once
        its oldest request C{waited} past L{_patience}, of the model with the least demand."""
        now = self.clock.seconds()
        wanted = demand.get(model, 0.0)
        patience = self._patience(model)
        impatient = not replica and waited >= patience
        best: tuple[tuple[Any, ...], Upstream, Upstream, Upstream | None, str] | None = None
        for child in copies:
            router = self.pool.upstreams.get(child.parent_id or "")
            if router is None or not router.state.serving or router.draining:
                continue
            if child.model_state in _RUNNING:
                continue
            siblings = children_of(self.pool.upstreams.values(), router)
            running = [s for s in siblings if self._running(s)]
            # a load of ours the router has not answered yet holds its place already (else the
            # place its victim leaves looks free and the router refuses: "model limit reached")
            ids = {s.id for s in running}
            started = sum(1 for load in self.loading.values()
                          if load.router.id == router.id and load.child.id not in ids)
            victim: Upstream | None = None
            why = ""
            if router.max_instances > 0 and len(running) + started >= router.max_instances:
                options: list[tuple[tuple[Any, ...], Upstream, str]] = []
                for s in running:
                    name = s.router_model or ""
                    if (s.model_state not in ("loaded", "sleeping") or s.pinned
                            or s.slots_held or s.slots_processing or waiting.get(name, 0)
                            or name in self.loading or now - s.model_since < self.min_residency):
                        continue
                    has = demand.get(name, 0.0)
                    others = self._capacity(name) - (s.slots_total or self._slots_per_copy(name))
                    if has <= SURPLUS_FILL * others:
                        rank: tuple[Any, ...] = (0, has / others if others else 0.0)
                        reason = (f"demand {has:.1f} slots, {others} on its other copies" if others
                                  else "no demand")
                    elif not replica and wanted >= LAST_COPY_MARGIN * has:
                        rank = (1, has)
                        reason = f"demand {has:.1f} slots, at most half of {model}'s {wanted:.1f}"
                    elif impatient:
                        rank = (2, has)
                        reason = (f"demand {has:.1f} slots; a request for {model} waited {waited:.0f} s, "
                                  f"past {patience:.0f} s")
                    else:
                        continue
                    options.append(((*rank, s.last_used_at), s, reason))
                if not options:
                    continue
                rank_key, victim, why = min(options, key=lambda o: o[0])
                key: tuple[Any, ...] = (1, *rank_key, len(running) + started, router.last_chosen)
            else:
                key = (0, 0, 0.0, 0.0, len(running) + started, router.last_chosen)
            if best is None or key < best[0]:
                best = (key, router, child, victim, why)
        return None if best is None else (best[1], best[2], best[3], best[4])

    # -- loading ----------------------------------------------------------

    def _claim(self, model: str, router: Upstream, child: Upstream, victim: Upstream | None,
               why: str = "", victim_why: str = "") -> None:
        """Claim the load in the shared store, then start it (or leave it to the other balancer)."""
        now = self.clock.seconds()
        pending = _Load(model, router, child, victim.router_model if victim else None, None, now,
                        why=why, victim_why=victim_why)
        self.loading[model] = pending  # no second claim from here meanwhile
        d = self.claims.claim_placement(
            model, child.id, victim.id if victim is not None else None,
            self.load_timeout + self.settle, self.min_residency,
        )
        d.addTimeout(self.claim_timeout, self.clock)
        pending.running = d

        def answered(granted: bool) -> None:
            if self.loading.get(model) is pending:
                del self.loading[model]
            if granted:
                self._start(model, router, child, victim, claimed=True, why=why, victim_why=victim_why)
                return
            self.log.info(
                "model {model}: not placing it on {upstream}: another balancer places it now{victim}",
                model=model, upstream=router.name,
                victim="" if victim is None else
                f", or {victim.router_model} was placed there less than {self.min_residency:g} s ago",
            )

        def failed(failure: Failure) -> None:
            if self.loading.get(model) is pending:
                del self.loading[model]
            if failure.check(CancelledError):
                return  # the service stopped
            self.log.warn("model {model}: the shared store did not answer the placement claim ({why}); "
                          "placing it on this balancer's view alone", model=model, why=describe_failure(failure))
            self._start(model, router, child, victim, why=why, victim_why=victim_why)

        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: self.log.failure("model placement claim", f))

    def _start(self, model: str, router: Upstream, child: Upstream, victim: Upstream | None,
               claimed: bool = False, why: str = "", victim_why: str = "") -> None:
        now = self.clock.seconds()
        idle = None if victim is None else max(0.0, now - victim.last_used_at)
        load = _Load(model, router, child, victim.router_model if victim else None, idle, now, claimed=claimed,
                     why=why, victim_why=victim_why)
        self.loading[model] = load
        self.log.info(
            "placing model {model} on {upstream}{because}{evicting}",
            model=model, upstream=router.name, because=f" ({why})" if why else "",
            evicting="" if victim is None else
            f", evicting {victim.router_model} (idle {idle:.0f} s, {victim_why or 'no demand'})",
        )
        d = ensureDeferred(self._load(load))
        d.addTimeout(self.load_timeout, self.clock)
        load.running = d
        d.addCallbacks(lambda _: self._done(load, "loaded", None), lambda f: self._failed(load, f))

    async def _load(self, load: _Load) -> None:
        if load.victim is not None:
            victim = next((c for c in children_of(self.pool.upstreams.values(), load.router)
                           if c.router_model == load.victim), None)
            if victim is not None:
                victim.model_state = "unloaded"  # no new request for it meanwhile
                victim.model_since = self.clock.seconds()
            code, body = await self.post(load.router, "/models/unload", {"model": load.victim})
            if code != 200 and error_message(body) != "model is not running":
                raise PlacementError(f"unloading {load.victim} answered {code}: {error_message(body)}")
        code, body = await self.post(load.router, "/models/load", {"model": load.model})
        if code != 200 and error_message(body) != "model is already running":
            raise PlacementError(f"/models/load answered {code}: {error_message(body)}")
        if load.child.model_state != "loading":
            load.child.model_state = "loading"  # until the next reading says more
            load.child.model_since = self.clock.seconds()
        unloaded_readings = 0
        while True:
            await self.probe_now(load.router)
            child = self.pool.upstreams.get(load.child.id)
            if child is None:
                raise PlacementError("the router no longer lists the model")
            if child.model_state == "loaded":
                return
            if child.model_state == "failed":
                raise PlacementError(f"the load failed (exit code {child.exit_code})")
            # the first reading may come from a probe sent before the load: two in a row
            unloaded_readings = unloaded_readings + 1 if child.model_state == "unloaded" else 0
            if unloaded_readings >= 2:
                raise PlacementError("the model went back to unloaded")
            await deferLater(self.clock, self.poll_interval, lambda: None)

    def _failed(self, load: _Load, failure: Failure) -> None:
        if failure.check(DeferredTimeout):
            outcome, reason = "timeout", f"not loaded within {self.load_timeout:g} s"
        elif failure.check(CancelledError):  # the service stopped
            self.loading.pop(load.model, None)
            if load.claimed and self.claims is not None:
                self.claims.finish_placement(load.model, 0.0).addErrback(lambda _: None)
            return
        elif failure.check(PlacementError):
            outcome = "failed" if "load failed" in str(failure.value) else "refused"
            reason = str(failure.value)
        else:
            outcome, reason = "refused", describe_failure(failure)
        self._done(load, outcome, reason)

    def _done(self, load: _Load, outcome: str, reason: str | None) -> None:
        self.loading.pop(load.model, None)
        if load.claimed and self.claims is not None:
            # loaded: held a little longer, so the others read it loaded first; else free at once
            finished = self.claims.finish_placement(load.model, self.settle if outcome == "loaded" else 0.0)
            finished.addTimeout(self.claim_timeout, self.clock)
            finished.addErrback(lambda f: self.log.warn(
                "model {model}: ending the placement claim failed: {why}", model=load.model,
                why=describe_failure(f)))
        seconds = self.clock.seconds() - load.started
        key = (load.model, load.router.name, outcome)
        self.loads_total[key] = self.loads_total.get(key, 0) + 1
        evicted = (
            "" if load.victim is None else
            f", evicted {load.victim} (idle {load.victim_idle or 0:.0f} s, {load.victim_why or 'no demand'})"
        )
        because = f" ({load.why})" if load.why else ""
        if outcome == "loaded":
            self.load_seconds.observe(seconds)
            self.log.info("loaded {model} on {upstream}{because}{evicted} in {seconds:.1f} s",
                          model=load.model, upstream=load.router.name, because=because, evicted=evicted,
                          seconds=seconds)
        else:
            self.log.warn("loading {model} on {upstream}{because}{evicted}: {outcome}: {reason}",
                          model=load.model, upstream=load.router.name, because=because, evicted=evicted,
                          outcome=outcome, reason=reason)
        if self.events is not None:
            self.events.record(
                "model_load", load.router, model=load.model, evicted=load.victim,
                evicted_idle=load.victim_idle, evicted_why=load.victim_why or None, why=load.why or None,
                outcome=outcome, reason=reason, seconds=round(seconds, 3),
                text=f"loaded {load.model} on {load.router.name}{because}{evicted}" if outcome == "loaded"
                else f"loading {load.model} on {load.router.name}{because}{evicted}: {outcome}",
            )

    def load_eta(self, model: str) -> float | None:
        """Seconds until the load of C{model} under way should be done (from the load times
        learned for it), or None when none is under way or nothing was learned."""
        load = self.loading.get(model)
        if load is None:
            return None
        learned = self._learned_loads(model)
        if not learned:
            return None
        expected = load.child.load_seconds if load.child.load_seconds is not None else max(learned)
        return max(1.0, load.started + expected - self.clock.seconds())

    # -- figures ----------------------------------------------------------

    def metrics(self) -> Any:
        """paddler_model_loads_total{model,upstream,outcome} (a Prometheus collector's collect())."""
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(
            "paddler_model_loads", "Model loads paddler placed, by outcome (loaded, failed, refused, timeout).",
            labels=["model", "upstream", "outcome"],
        )
        for (model, upstream, outcome), count in sorted(self.loads_total.items()):
            family.add_metric([model, upstream, outcome], count)
        yield family
        yield self.load_seconds.family()


def json_poster(client: Any, api_key: str | None = None) -> Poster:
    """A L{Poster} over an L{paddler.interfaces.IUpstreamClient} (kept-alive connections)."""
    from paddler.upstream.client import _read_whole

    def post(router: Upstream, path: str, body: dict[str, Any]) -> Deferred[tuple[int, bytes]]:
        origin = router.url.encode("ascii")
        headers = [(b"Host", origin.partition(b"://")[2]), (b"Content-Type", b"application/json")]
        key = router.api_key or api_key
        if key:
            headers.append((b"Authorization", b"Bearer " + key.encode("utf-8")))
        d = client.send(b"POST", origin, path.encode("ascii"), headers, json.dumps(body).encode("utf-8"))
        return d.addCallback(_read_whole, 64 * 1024)

    return post
