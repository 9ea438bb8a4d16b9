"""Placing models across router-mode upstreams (``--model-placement``).

With placement on, paddler loads models itself instead of letting each
router autoload the model of whatever request it is sent: a child upstream of
a model that is not loaded takes no request (L{paddler.fleet.routers}), so
requests for it wait in the buffer, and every C{interval} this service looks
at the models requests wait for:

- a model loaded nowhere (and loading nowhere) is loaded on one router that
  lists it: one with room under its C{max_instances} first (fewest models
  running), else one where a loaded model can be evicted: one that serves and
  waits for nothing, has been loaded for at least C{min_residency} seconds
  (no thrashing), the one idle longest;
- a model loaded everywhere it is, with every slot busy, gets one more copy
  while it has fewer than C{replicas_max};
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
model, upstream, evicted model and how long it was idle, outcome, seconds)
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


class ModelPlacement(Service):
    """Loads the models requests wait for onto router-mode upstreams (see the module docstring).

    @param pool: the L{UpstreamPool}.
    @param clock: the reactor's clock.
    @param post: sends a JSON POST to a router.
    @param probe_now: probes a router at once (the probe service's C{probe_now}).
    @param events: the L{FleetEvents} log, or None.
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

    def _place(self) -> None:
        waiting: dict[str, int] = {}
        for name, count in self.pool.waiting_here_by_model().items():
            # a request may name a model by one of its router's aliases: count it for the model
            served = next((u.router_model for u in self.pool.upstreams.values()
                           if u.router_model is not None and name and u.serves(name)), None)
            if served is not None:
                waiting[served] = waiting.get(served, 0) + count
        for model in sorted(waiting, key=lambda m: -waiting[m]):
            if model in self.loading:
                continue
            copies = [u for u in self.pool.upstreams.values() if u.router_model == model]
            if any(c.model_state == "loading" for c in copies):
                continue  # a router is loading it already (its own autoload, or an operator)
            loaded = [c for c in copies if c.model_state in ("loaded", "sleeping") and c.accepts_requests]
            if loaded and (len(loaded) >= self.replicas_max or any(c.slots_idle > 0 for c in loaded)):
                continue
            choice = self._choose(copies, waiting)
            if choice is None:
                if model not in self._unplaceable:
                    self._unplaceable.add(model)
                    self.log.warn(
                        "{count} requests wait for model {model}, but no router can load it now "
                        "(every one full of models in use or loaded less than {residency:g} s ago)",
                        count=waiting[model], model=model, residency=self.min_residency,
                    )
                continue
            self._unplaceable.discard(model)
            if self.claims is None:
                self._start(model, *choice)
            else:
                self._claim(model, *choice)

    def _choose(
        self, copies: list[Upstream], waiting: dict[str, int]
    ) -> tuple[Upstream, Upstream, Upstream | None] | None:
        """(router, child, victim or None) for a new copy of the model, or None."""
        now = self.clock.seconds()
        best: tuple[tuple[Any, ...], Upstream, Upstream, Upstream | None] | None = None
        for child in copies:
            router = self.pool.upstreams.get(child.parent_id or "")
            if router is None or not router.state.serving or router.draining:
                continue
            if child.model_state in _RUNNING:
                continue
            siblings = children_of(self.pool.upstreams.values(), router)
            running = [s for s in siblings if s.model_state in _RUNNING]
            victim: Upstream | None = None
            if router.max_instances > 0 and len(running) >= router.max_instances:
                victims = [
                    s for s in running
                    if s.model_state in ("loaded", "sleeping") and not s.pinned
                    and s.slots_held == 0 and s.slots_processing == 0
                    and not waiting.get(s.router_model or "", 0)
                    and (s.router_model or "") not in self.loading
                    and now - s.model_since >= self.min_residency
                ]
                if not victims:
                    continue
                victim = min(victims, key=lambda s: s.last_used_at)
                key: tuple[Any, ...] = (1, victim.last_used_at, len(running), router.last_chosen)
            else:
                key = (0, 0.0, len(running), router.last_chosen)
            if best is None or key < best[0]:
                best = (key, router, child, victim)
        return None if best is None else (best[1], best[2], best[3])

    # -- loading ----------------------------------------------------------

    def _claim(self, model: str, router: Upstream, child: Upstream, victim: Upstream | None) -> None:
        """Claim the load in the shared store, then start it (or leave it to the other balancer)."""
        now = self.clock.seconds()
        pending = _Load(model, router, child, victim.router_model if victim else None, None, now)
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
                self._start(model, router, child, victim, claimed=True)
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
            self._start(model, router, child, victim)

        d.addCallbacks(answered, failed)
        d.addErrback(lambda f: self.log.failure("model placement claim", f))

    def _start(self, model: str, router: Upstream, child: Upstream, victim: Upstream | None,
               claimed: bool = False) -> None:
        now = self.clock.seconds()
        idle = None if victim is None else max(0.0, now - victim.last_used_at)
        load = _Load(model, router, child, victim.router_model if victim else None, idle, now, claimed=claimed)
        self.loading[model] = load
        self.log.info(
            "placing model {model} on {upstream}{evicting}",
            model=model, upstream=router.name,
            evicting="" if victim is None else f", evicting {victim.router_model} (idle {idle:.0f} s)",
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
            "" if load.victim is None else f", evicted {load.victim} (idle {load.victim_idle or 0:.0f} s)"
        )
        if outcome == "loaded":
            self.load_seconds.observe(seconds)
            self.log.info("loaded {model} on {upstream}{evicted} in {seconds:.1f} s",
                          model=load.model, upstream=load.router.name, evicted=evicted, seconds=seconds)
        else:
            self.log.warn("loading {model} on {upstream}{evicted}: {outcome}: {reason}",
                          model=load.model, upstream=load.router.name, evicted=evicted,
                          outcome=outcome, reason=reason)
        if self.events is not None:
            self.events.record(
                "model_load", load.router, model=load.model, evicted=load.victim,
                evicted_idle=load.victim_idle, outcome=outcome, reason=reason, seconds=round(seconds, 3),
                text=f"loaded {load.model} on {load.router.name}{evicted}" if outcome == "loaded"
                else f"loading {load.model} on {load.router.name}{evicted}: {outcome}",
            )

    def load_eta(self, model: str) -> float | None:
        """Seconds until the load of C{model} under way should be done (from the load times
        learned for it), or None when none is under way or nothing was learned."""
        load = self.loading.get(model)
        if load is None:
            return None
        learned = [u.load_seconds for u in self.pool.upstreams.values()
                   if u.router_model == model and u.load_seconds is not None]
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
