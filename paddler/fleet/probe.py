"""Health and slot probes: every upstream probed from one timer (L{ProbeService}), each probe with a deadline.

A probe reads the upstream's slots (L{paddler.llamacpp.slots.read_slots}:
``/slots``, or ``/props`` when a server has no ``/slots``, or ``/health`` +
``/props`` in ``--probe-mode health``; never ``/metrics``) and hands what it saw to the pool
(L{UpstreamPool.observe}). Agent upstreams are not probed: their agent's
reports play that part.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    ensureDeferred,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import FailureSeen, LoadingSeen, SlotsSeen, Upstream, UpstreamState
from paddler.interfaces import IUpstreamProber
from paddler.llamacpp.errors import Loading, NeedsKey
from paddler.fleet.routers import child_id, children_of, forget_router, observe_router
from paddler.llamacpp.slots import (
    NotRouterMode,
    RouterMode,
    RouterReading,
    SlotReading,
    SlotsCache,
    client_getter,
    read_router,
    read_slots,
)
from paddler.upstream.failures import describe_failure
from paddler.server.instance import THIS_BALANCER, ThisBalancer

if TYPE_CHECKING:
    from paddler.upstream.client import UpstreamClient


@implementer(IUpstreamProber)
class HTTPProber:
    """
    Probes one upstream over HTTP with C{http_client}, a
    L{paddler.upstream.client.UpstreamClient} (kept-alive connections).
    An unchanged C{/slots} answer is not parsed again; the probe's Deferred
    then fires with C{False} (nothing new), else with C{True}.
    """

    log = Logger()

    def __init__(
        self,
        http_client: UpstreamClient,
        clock: IReactorTime,
        pool: UpstreamPool,
        timeout: float = 2.0,
        unhealthy_after: int = 2,
        mode: str = "slots",
        api_key: str | None = None,
        instance_id: str | None = None,
    ) -> None:
        self._http = http_client
        self.instance_id = instance_id
        self._clock = clock
        self._pool = pool
        self.timeout = timeout
        self.unhealthy_after = unhealthy_after
        self.mode = mode
        self.api_key = api_key
        #: Called with (upstream, reading) after each successful read (the shared fleet sends it on).
        self.on_reading: Callable[[Upstream, SlotReading], None] | None = None
        #: Called with (router upstream, RouterReading) after each read of a router-mode server.
        self.on_router_reading: Callable[[Upstream, RouterReading], None] | None = None
        self._caches: dict[str, SlotsCache] = {}

    def probe(self, upstream: Upstream) -> Deferred[Any]:
        reading = ensureDeferred(self._probe(upstream))
        reading.addTimeout(self.timeout, self._clock, onTimeoutCancel=_timed_out)
        return reading.addCallbacks(
            lambda seen: self._succeeded(upstream, seen), lambda f: self._failed(upstream, f)
        )

    def read(self, upstream: Upstream) -> Deferred[SlotReading]:
        """
        Read C{upstream}'s slots with the probe's deadline and report nothing
        to the pool: the check of an agent's report (L{paddler.fleet.registry}).
        Fails with L{ThisBalancer} when the balancer answers itself.
        """
        get = client_getter(self._http, upstream.url, upstream.api_key or self.api_key, self.instance_id)
        reading = ensureDeferred(read_slots(get, method=upstream.probe_method, mode="slots",
                                            want_models=False, mark=upstream.probe_mark))
        reading.addTimeout(self.timeout, self._clock, onTimeoutCancel=_timed_out)
        return reading

    async def _probe(self, upstream: Upstream) -> SlotReading | RouterReading:
        get = client_getter(self._http, upstream.url, upstream.api_key or self.api_key, self.instance_id)
        cache = self._caches.get(upstream.id)
        if cache is None:
            if len(self._caches) > 2 * len(self._pool.upstreams) + 16:
                self._caches = {uid: c for uid, c in self._caches.items() if uid in self._pool.upstreams}
            cache = self._caches[upstream.id] = SlotsCache()
        if upstream.role != "router":
            try:
                return await read_slots(
                    get,
                    method=upstream.probe_method,
                    mode=self.mode,
                    want_models=not upstream.models,
                    mark=upstream.probe_mark,
                    cache=cache,
                )
            except RouterMode:
                pass  # /props says role router, or /slots wants a model: read it as a router
        try:
            return await read_router(get, upstream.probe_mark, lambda model: self._child_mark(upstream, model),
                                     slots=self.mode != "health")
        except NotRouterMode:
            self.log.info("upstream {name} ({url}) is no longer a router-mode llama-server",
                          name=upstream.name, url=upstream.url)
            forget_router(self._pool, upstream)
            return await read_slots(get, mode=self.mode, want_models=True, mark=upstream.probe_mark, cache=cache)

    def _child_mark(self, parent: Upstream, model: str) -> int:
        child = self._pool.upstreams.get(child_id(parent.url, model))
        return child.probe_mark() if child is not None else 0

    def _succeeded(self, upstream: Upstream, reading: SlotReading | RouterReading) -> bool:
        if isinstance(reading, RouterReading):
            observe_router(self._pool, upstream, reading)
            if self.on_router_reading is not None:
                self.on_router_reading(upstream, reading)
            return True
        if self.on_reading is not None:
            self.on_reading(upstream, reading)
        if reading.method == "props" and upstream.probe_method != "props":
            self.log.info(
                "upstream {name}: /slots not available, probing /props instead",
                name=upstream.name,
            )
        self._pool.observe(
            upstream,
            SlotsSeen(
                reading.total,
                reading.processing,
                reading.mark,
                models=reading.models,
                raw_slots=reading.raw_slots,
                method=reading.method,
            ),
        )
        return reading.changed

    def _failed(self, upstream: Upstream, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the probe service stopped it (upstream removed, balancer stopping)
        if failure.check(Loading):
            self._pool.observe(upstream, LoadingSeen())
            return
        if failure.check(ThisBalancer):
            if upstream.last_error != THIS_BALANCER:
                self.log.warn(
                    "upstream {name} ({url}) is this balancer itself: it takes no request",
                    name=upstream.name,
                    url=upstream.url,
                )
            self._pool.observe(upstream, FailureSeen(THIS_BALANCER, unreachable_after=1))
            return
        if failure.check(NeedsKey):
            # the server answers, but not to us: waiting for more failures tells nothing new
            reason = str(failure.value)
            if upstream.last_error != reason:
                self.log.warn("upstream {name} ({url}): {reason}", name=upstream.name, url=upstream.url, reason=reason)
            self._pool.observe(upstream, FailureSeen(reason, unreachable_after=1))
            return
        reason = describe_failure(failure, self.timeout)
        self._pool.observe(upstream, FailureSeen(reason, unreachable_after=self.unhealthy_after))


def _timed_out(result: object, timeout: float) -> None:
    """addTimeout fired: whatever the cancelled HTTP client failed with (ResponseNeverReceived([CancelledError]), ConnectingCancelledError), it is a timeout."""
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    raise DeferredTimeout(f"no answer within {timeout:g} s")


class _Schedule:
    """When one upstream is probed next, and what its last probes said."""

    __slots__ = ("upstream", "due", "running", "quiet", "last_probe", "mark")

    def __init__(self, upstream: Upstream, due: float) -> None:
        self.upstream = upstream
        self.due = due
        self.running: Deferred[Any] | None = None
        self.quiet = 0  # consecutive probes that found nothing new
        self.last_probe = due
        self.mark = -1  # the upstream's probe_mark at the last probe


class ProbeService(Service):
    """
    Probes every probed upstream about every C{interval} seconds, from one
    timer: probes are spread over the interval (never all at once), one
    upstream's probes never overlap, and upstreams come and go with the pool.

    An upstream that is healthy, idle (no request of ours on it, none
    waiting in the buffer, none sent there since its last probe) and whose
    last two readings were unchanged is probed only every C{idle_every}
    intervals; any change, any request to it, any request waiting for a
    slot brings it back to every interval at its next turn. So where the
    picture matters (requests running or waiting, upstreams failing or
    starting) it is never older than one interval.
    """

    log = Logger()
    #: consecutive unchanged readings before an idle upstream is probed less often
    QUIET_AFTER = 2
    #: upstreams whose first probe may start in the same instant; more are spread over the interval
    BURST = 32

    def __init__(
        self,
        pool: UpstreamPool,
        prober: IUpstreamProber,
        clock: IReactorTime,
        interval: float = 1.0,
        idle_every: int = 3,
    ) -> None:
        self._pool = pool
        self._prober = prober
        self._clock = clock
        self.interval = interval
        self.idle_every = idle_every
        self._schedules: dict[str, _Schedule] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._timer: Any = None
        self._burst_at = -1.0
        self._burst = 0
        self._unsubscribe: Any = None
        self.probes_sent = 0
        self.probes_skipped = 0

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self._pool.subscribe(self._on_pool_event)
        for upstream in list(self._pool.upstreams.values()):
            self._start(upstream)

    def _on_pool_event(self, event: str, upstream: Upstream | None) -> None:
        if upstream is None:
            return
        if event == "added":
            self._start(upstream)
        elif event == "removed":
            self._stop(upstream.id)

    # -- scheduling --------------------------------------------------------------

    def _start(self, upstream: Upstream) -> None:
        if not self.running or upstream.source in ("agent", "router") or upstream.id in self._schedules:
            return
        now = self._clock.seconds()
        if now != self._burst_at:
            self._burst_at, self._burst = now, 0
        k = self._burst
        self._burst += 1
        # upstreams added together are spread over the interval (golden-ratio phases); the
        # first BURST of them are probed at once all the same, so that a fleet starts quickly
        phase = (k * 0.6180339887) % 1.0
        schedule = _Schedule(upstream, now + phase * self.interval)
        self._schedules[upstream.id] = schedule
        if k < self.BURST:
            self._run(schedule, now)
            schedule.due = now + self.interval * (1.0 + phase)
        self._push(schedule)

    def _push(self, schedule: _Schedule) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (schedule.due, self._seq, schedule.upstream.id))
        if self._timer is None or schedule.due < self._timer.getTime():
            self._arm(schedule.due)

    def _arm(self, when: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        # probes due within a small slack run together: fewer timer wake-ups
        horizon = now + min(0.01, self.interval / 100)
        heap = self._heap
        while heap and heap[0][0] <= horizon:
            _, _, uid = heapq.heappop(heap)
            schedule = self._schedules.get(uid)
            if schedule is None:
                continue
            try:
                self._due(schedule, now)
            except Exception:
                self.log.failure("probe scheduling of {name} failed", name=schedule.upstream.name)
            schedule.due = max(schedule.due + self.interval, now)
            self._seq += 1
            heapq.heappush(heap, (schedule.due, self._seq, uid))
        if heap and self.running:
            self._arm(heap[0][0])

    def _due(self, schedule: _Schedule, now: float) -> None:
        if schedule.running is not None:
            return  # the last probe still runs: never two at once
        upstream = schedule.upstream
        if (
            schedule.quiet >= self.QUIET_AFTER
            and now - schedule.last_probe < self.idle_every * self.interval - 1e-9
            and upstream.state is UpstreamState.HEALTHY
            and upstream.role != "router"  # its models' slots are on its children
            and upstream.slots_held == 0
            and upstream.probe_mark() == schedule.mark
            and not self._pool.requests_buffered
        ) or self._router_idle(upstream, schedule, now):
            self.probes_skipped += 1
            return
        self._run(schedule, now)

    def _router_idle(self, upstream: Upstream, schedule: _Schedule, now: float) -> bool:
        """A router whose event stream is followed (its status changes come as they happen)
        and that runs nothing of ours: probed only every C{idle_every} intervals, as a check."""
        if upstream.role != "router" or not upstream.events_live or upstream.state is not UpstreamState.HEALTHY:
            return False
        if now - schedule.last_probe >= self.idle_every * self.interval - 1e-9 or self._pool.requests_buffered:
            return False
        return not any(c.slots_held for c in children_of(self._pool.upstreams.values(), upstream))

    def _run(self, schedule: _Schedule, now: float) -> Deferred[Any]:
        upstream = schedule.upstream
        schedule.last_probe = now
        schedule.mark = upstream.probe_mark()
        self.probes_sent += 1
        d = maybeDeferred(self._prober.probe, upstream)
        schedule.running = d

        def done(result: object) -> None:
            if schedule.running is d:
                schedule.running = None
            if isinstance(result, Failure):
                schedule.quiet = 0
                if not result.check(CancelledError):
                    self.log.failure("probe of {name} failed unexpectedly", result, name=upstream.name)
                return
            schedule.quiet = schedule.quiet + 1 if result is False else 0

        d.addBoth(done)
        return d

    # -- control -------------------------------------------------------------------

    def set_interval(self, interval: float) -> None:
        """Probe every C{interval} seconds from each upstream's next probe on."""
        self.interval = interval

    def probe_now(self, upstream: Upstream) -> Deferred[None]:
        """
        Probe C{upstream} at once, or join the probe of it already running.
        The result fires with C{None} when that probe is done; cancelling it
        (a client that stopped waiting) leaves the probe alone.
        """
        schedule = self._schedules.get(upstream.id)
        if schedule is not None and schedule.running is not None:
            running = schedule.running
        elif schedule is not None:
            running = self._run(schedule, self._clock.seconds())
        else:
            running = maybeDeferred(self._prober.probe, upstream)
        done: Deferred[None] = Deferred()

        def finished(result: object) -> object:
            if not done.called:
                done.callback(None)
            return result

        running.addBoth(finished)
        return done

    def _stop(self, upstream_id: str) -> Deferred[Any]:
        schedule = self._schedules.pop(upstream_id, None)
        if schedule is not None and schedule.running is not None:
            running, schedule.running = schedule.running, None
            running.cancel()
            return running
        return succeed(None)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._heap = []
        return DeferredList([self._stop(uid) for uid in list(self._schedules)])
