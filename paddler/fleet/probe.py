"""Health and slot probes: one ``LoopingCall`` per upstream, each probe with a deadline.

A probe reads the upstream's slots (L{paddler.llamacpp.slots.read_slots}:
``/slots``, or ``/props`` + ``/metrics``, or ``/health`` + ``/props`` in
``--probe-mode health``) and hands what it saw to the pool
(L{UpstreamPool.observe}). Agent upstreams are not probed: their agent's
reports play that part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import FailureSeen, LoadingSeen, SlotsSeen, Upstream
from paddler.interfaces import IUpstreamProber
from paddler.llamacpp.errors import Loading
from paddler.llamacpp.slots import SlotReading, http_getter, read_slots
from paddler.web.failures import describe_failure


@implementer(IUpstreamProber)
class HTTPProber:
    """Probes one upstream over HTTP with C{http_client} (a treq C{HTTPClient})."""

    log = Logger()

    def __init__(
        self,
        http_client: Any,
        clock: IReactorTime,
        pool: UpstreamPool,
        timeout: float = 2.0,
        unhealthy_after: int = 2,
        mode: str = "slots",
        api_key: str | None = None,
    ) -> None:
        self._http = http_client
        self._clock = clock
        self._pool = pool
        self.timeout = timeout
        self.unhealthy_after = unhealthy_after
        self.mode = mode
        self.api_key = api_key
        #: Called with (upstream, reading) after each successful read (the shared fleet sends it on).
        self.on_reading: Callable[[Upstream, SlotReading], None] | None = None

    def probe(self, upstream: Upstream) -> Deferred[None]:
        reading = ensureDeferred(self._probe(upstream))
        reading.addTimeout(self.timeout, self._clock, onTimeoutCancel=_timed_out)
        return reading.addCallbacks(
            lambda seen: self._succeeded(upstream, seen), lambda f: self._failed(upstream, f)
        )

    async def _probe(self, upstream: Upstream) -> SlotReading:
        get = http_getter(self._http, upstream.url, upstream.api_key or self.api_key)
        return await read_slots(
            get,
            method=upstream.probe_method,
            mode=self.mode,
            want_models=not upstream.models,
            mark=upstream.probe_mark,
        )

    def _succeeded(self, upstream: Upstream, reading: SlotReading) -> None:
        if self.on_reading is not None:
            self.on_reading(upstream, reading)
        if reading.method == "props" and upstream.probe_method != "props":
            self.log.info(
                "upstream {name}: /slots not available, probing /props and /metrics instead",
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

    def _failed(self, upstream: Upstream, failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the probe service stopped it (upstream removed, balancer stopping)
        if failure.check(Loading):
            self._pool.observe(upstream, LoadingSeen())
            return
        reason = describe_failure(failure, self.timeout)
        self._pool.observe(upstream, FailureSeen(reason, unreachable_after=self.unhealthy_after))


def _timed_out(result: object, timeout: float) -> None:
    """addTimeout fired: whatever the cancelled HTTP client failed with (ResponseNeverReceived([CancelledError]), ConnectingCancelledError), it is a timeout."""
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    raise DeferredTimeout(f"no answer within {timeout:g} s")


class ProbeService(Service):
    """Runs one probe loop per probed upstream; loops come and go with the pool."""

    log = Logger()

    def __init__(
        self, pool: UpstreamPool, prober: IUpstreamProber, clock: IReactorTime, interval: float = 1.0
    ) -> None:
        self._pool = pool
        self._prober = prober
        self._clock = clock
        self.interval = interval
        self._loops: dict[str, LoopingCall] = {}
        self._in_flight: dict[str, Deferred[None]] = {}
        self._unsubscribe: Any = None

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

    def _start(self, upstream: Upstream) -> None:
        if upstream.source == "agent" or upstream.id in self._loops:
            return
        loop = LoopingCall(self._probe_once, upstream)
        loop.clock = self._clock
        self._loops[upstream.id] = loop
        loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("probe loop for {name} died", f, name=upstream.name)
        )

    def _probe_once(self, upstream: Upstream) -> Deferred[None]:
        d = maybeDeferred(self._prober.probe, upstream)
        self._in_flight[upstream.id] = d

        def done(result: object) -> None:
            if self._in_flight.get(upstream.id) is d:
                del self._in_flight[upstream.id]
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("probe of {name} failed unexpectedly", result, name=upstream.name)

        d.addBoth(done)
        return d

    def set_interval(self, interval: float) -> None:
        """Probe every C{interval} seconds from each loop's next run on."""
        self.interval = interval
        for loop in self._loops.values():
            loop.interval = interval

    def probe_now(self, upstream: Upstream) -> Deferred[None]:
        """
        Probe C{upstream} at once, or join the probe of it already running.
        The result fires with C{None} when that probe is done; cancelling it
        (a client that stopped waiting) leaves the probe alone.
        """
        running = self._in_flight.get(upstream.id)
        if running is None:
            running = self._probe_once(upstream)
        done: Deferred[None] = Deferred()

        def finished(result: object) -> object:
            if not done.called:
                done.callback(None)
            return result

        running.addBoth(finished)
        return done

    def _stop(self, upstream_id: str) -> Deferred[Any]:
        loop = self._loops.pop(upstream_id, None)
        if loop is not None and loop.running:
            loop.stop()
        in_flight = self._in_flight.pop(upstream_id, None)
        if in_flight is not None:
            in_flight.cancel()
            return in_flight
        return succeed(None)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        return DeferredList([self._stop(uid) for uid in set(self._loops) | set(self._in_flight)])
