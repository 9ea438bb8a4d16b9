"""The live state stream (server-sent events on ``/api/v1/state/stream``) and the service
that samples the history and feeds the stream."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler.fleet.pool import UpstreamPool
from paddler.observability.requests import RequestStats
from paddler.observability.snapshot import StateHistory

#: Shortest time between two pushed states on the stream (at most 4 a second).
PUSH_INTERVAL = 0.25
#: Seconds between two heartbeat comments on the stream.
HEARTBEAT_INTERVAL = 15.0
#: Milliseconds an EventSource waits before reconnecting.
RECONNECT_MS = 2000


def encode_event(event: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event: C{event:}, optional C{id:}, one C{data:} line of compact JSON."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


@implementer(IPushProducer)
class _StreamClient:
    """
    One open stream. Registered as the request's streaming producer, so a
    client that does not read pauses it; while paused it keeps no data, only
    what it missed: C{"state"} (send the latest state) or C{"full"} (a sample
    was missed too: send the state with the whole history).
    """

    def __init__(self, stream: StateStream, request: Any) -> None:
        self.stream = stream
        self.request = request
        self.paused = False
        self.stall_call: Any = None
        self.pending: str | None = None
        self.done: Deferred[None] = Deferred(lambda _: stream.detach(self))

    def miss(self, what: str) -> None:
        if self.pending != "full":
            self.pending = what

    def pauseProducing(self) -> None:
        self.paused = True
        if self.stall_call is None:
            self.stall_call = self.stream.clock.callLater(
                self.stream.stall_timeout, self._stalled
            )

    def _stalled(self) -> None:
        """The client stopped reading long ago: drop it (a stream has an idle deadline too)."""
        self.stall_call = None
        self.stream.detach(self)
        transport = getattr(self.request, "transport", None) or getattr(
            getattr(self.request, "channel", None), "transport", None
        )
        if transport is not None:
            transport.abortConnection()

    def _cancel_stall(self) -> None:
        if self.stall_call is not None and self.stall_call.active():
            self.stall_call.cancel()
        self.stall_call = None

    def resumeProducing(self) -> None:
        self.paused = False
        self._cancel_stall()
        pending, self.pending = self.pending, None
        if pending is not None:
            self.stream.catch_up(self, full=pending == "full")

    def stopProducing(self) -> None:
        self.stream.detach(self)


class StateStream:
    """
    Pushes the fleet state to every open C{/api/v1/state/stream}.

    L{changed} is cheap and may be called on every event: pushes are
    coalesced with C{clock.callLater} to at most one per C{min_interval}
    seconds, and one state is built per push for all clients. A heartbeat
    comment goes out every C{heartbeat} seconds. A slow client never makes
    memory grow: while it is paused, intermediate states are dropped (see
    L{_StreamClient}); one that stays paused for C{stall_timeout} seconds is
    disconnected.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        snapshot: Callable[[bool], dict[str, Any]],
        min_interval: float = PUSH_INTERVAL,
        heartbeat: float = HEARTBEAT_INTERVAL,
        stall_timeout: float = 60.0,
    ) -> None:
        self.clock = clock
        self.snapshot = snapshot
        self.stall_timeout = stall_timeout
        self.min_interval = min_interval
        self.heartbeat = heartbeat
        self.clients: list[_StreamClient] = []
        self.pushes = 0
        self._event_id = 0
        self._last_push = float("-inf")
        self._scheduled: IDelayedCall | None = None
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self.running = False

    def start(self) -> None:
        self.running = True
        self._heartbeat.start(self.heartbeat, now=False).addErrback(
            lambda f: self.log.failure("state stream heartbeat stopped", f)
        )

    def stop(self) -> None:
        """Stop pushing and end every open stream."""
        self.running = False
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        for client in list(self.clients):
            self.detach(client)
            client.request.unregisterProducer()
            client.done.callback(None)

    def _next_id(self) -> int:
        self._event_id += 1
        return self._event_id

    def attach(self, request: Any) -> Deferred[None]:
        """Start an event stream on C{request}; the Deferred fires when it ends."""
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        client = _StreamClient(self, request)
        self.clients.append(client)
        request.notifyFinish().addBoth(lambda _: self.detach(client))
        request.registerProducer(client, True)
        request.write(f"retry: {RECONNECT_MS}\n\n".encode("ascii"))
        self.catch_up(client, full=True)
        return client.done

    def detach(self, client: _StreamClient) -> None:
        client._cancel_stall()
        if client in self.clients:
            self.clients.remove(client)

    def catch_up(self, client: _StreamClient, full: bool) -> None:
        """Send C{client} the current state (with the history when C{full})."""
        if client in self.clients:
            client.request.write(encode_event("state", self.snapshot(full), self._next_id()))

    def changed(self, *_: Any) -> None:
        """Something changed: push the state soon (coalesced)."""
        if not self.running or not self.clients or self._scheduled is not None:
            return
        delay = max(0.0, self._last_push + self.min_interval - self.clock.seconds())
        self._scheduled = self.clock.callLater(delay, self._push)

    def _push(self) -> None:
        self._scheduled = None
        self._last_push = self.clock.seconds()
        if not self.clients:
            return
        self.pushes += 1
        payload = encode_event("state", self.snapshot(False), self._next_id())
        for client in list(self.clients):
            if client.paused:
                client.miss("state")
            else:
                client.request.write(payload)

    def sample(self, sample: dict[str, Any]) -> None:
        """A new history sample: send it to every client that keeps up."""
        payload = encode_event("sample", sample)
        for client in list(self.clients):
            if client.paused:
                client.miss("full")
            else:
                client.request.write(payload)

    def _beat(self) -> None:
        payload = f": heartbeat {self.clock.seconds():.0f}\n\n".encode("ascii")
        for client in list(self.clients):
            if not client.paused:
                client.request.write(payload)


class ObservabilityService(Service):
    """
    Samples the history every C{history.interval} seconds (the first sample at
    start) and feeds the state stream from the pool, the request figures and
    the history. Stopping ends every open stream.
    """

    log = Logger()

    def __init__(
        self,
        pool: UpstreamPool,
        stats: RequestStats,
        clock: IReactorTime,
        history: StateHistory,
        stream: StateStream,
    ) -> None:
        self.pool = pool
        self.stats = stats
        self.clock = clock
        self.history = history
        self.stream = stream
        self._loop = LoopingCall(self._sample)
        self._loop.clock = clock
        self._unsubscribers: list[Callable[[], None]] = []

    def startService(self) -> None:
        super().startService()
        self._unsubscribers = [
            self.pool.subscribe(self.stream.changed),
            self.stats.subscribe(self.stream.changed),
            self.history.subscribe(self.stream.sample),
        ]
        self.stream.start()
        self._loop.start(self.history.interval, now=True).addErrback(self._loop_died)

    def _sample(self) -> None:
        try:
            self.history.take(self.pool, self.stats, self.clock.seconds())
        except Exception:
            self.log.failure("sampling the fleet history failed; trying again next time")

    def _loop_died(self, failure: Failure) -> None:
        self.log.failure("fleet history sampling stopped", failure)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        for unsubscribe in self._unsubscribers:
            unsubscribe()
        self._unsubscribers = []
        self.stream.stop()
