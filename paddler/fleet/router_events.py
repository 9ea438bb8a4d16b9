"""Following router-mode upstreams' ``GET /models/sse`` (``--router-events``).

A router-mode llama-server streams its models' status changes on
``/models/sse``: ``data: {"model": M, "event": E, "data": {...}}`` events,
E being ``model_status`` (a load starts), ``status_change`` (loaded,
sleeping, unloaded with ``exit_code``), ``download_progress``,
``model_remove`` or ``models_reload`` (``model: "*"``). Polling ``/models``
every probe interval notices a load or a failure up to an interval late;
following the stream, the balancer reads the router again (a probe, the one
source of truth for states and slots) as soon as an event says something
changed.

Each router gets one L{_Follower}, a small state machine (L{StreamState},
moved only through L{STREAM_TRANSITIONS}, drawn in docs/states.md)::

    waiting --connect--> connecting --answered (200)--> streaming --ended (end / idle / bad event)--> waiting
                              \\--refused (timeout / error / not 200)--> waiting
    (any) --stop--> stopped

- connecting has a deadline (C{connect_timeout}); streaming an idle deadline
  (C{idle_timeout} seconds without a byte: the stream is dropped and opened
  again);
- a reconnection waits C{backoff_min} seconds, doubled after each attempt
  that delivered no event, up to C{backoff_max} (a router that does not
  offer the stream, 404/501, is asked again at C{backoff_max});
- an event that is not what llama.cpp sends (not JSON, not an object with a
  string ``event`` and ``model``, a status that is not a string, a line or
  an event over C{max_event} bytes) is logged at warning, and the stream is
  dropped (opened again after the backoff): a hostile or garbled stream
  never reaches the pool;
- polling never stops: while a router's stream is up (C{events_live} on the
  router upstream) the probe service may probe an idle router (no request of
  ours on its models, none buffered) only every C{idle_every} intervals, as a
  check; with requests running or waiting it probes every interval as before.

An event that arrives while a probe of the router runs asks for one more
probe after it (the running one may have been sent before the change). With
``--state`` a balancer follows only the routers it probes (one balancer per
router); the others hear of the changes through the shared store.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.fleet.upstream import Upstream
from paddler.upstream.failures import describe_failure

__all__ = ["STREAM_TRANSITIONS", "RouterEvents", "StreamEvent", "StreamOpener", "StreamState", "sse_opener"]

#: C{open(router)} -> a Deferred firing with the L{paddler.interfaces.IUpstreamBody} of ``GET /models/sse``.
StreamOpener = Callable[[Upstream], "Deferred[Any]"]
ProbeNow = Callable[[Upstream], "Deferred[Any]"]

#: The events that say a model's state may have changed (``download_progress`` does not).
_CHANGES = ("model_status", "status_change", "model_remove", "models_reload")


class StreamState(enum.Enum):
    """Where a router's event stream is."""

    WAITING = "waiting"
    CONNECTING = "connecting"
    STREAMING = "streaming"
    STOPPED = "stopped"


class StreamEvent(enum.Enum):
    """What happens to a router's event stream."""

    CONNECT = "connect"
    ANSWERED = "answered"
    REFUSED = "refused"
    ENDED = "ended"
    STOP = "stop"


_S, _E = StreamState, StreamEvent
#: The only moves of a L{_Follower}'s state.
STREAM_TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (_S.WAITING, _E.CONNECT): _S.CONNECTING,
    (_S.CONNECTING, _E.ANSWERED): _S.STREAMING,
    (_S.CONNECTING, _E.REFUSED): _S.WAITING,
    (_S.STREAMING, _E.ENDED): _S.WAITING,
    **{(state, _E.STOP): _S.STOPPED for state in (_S.WAITING, _S.CONNECTING, _S.STREAMING)},
}


class BadEvent(Exception):
    """An event or line of ``/models/sse`` that is not what llama.cpp sends."""


def parse_event(text: bytes) -> dict[str, Any] | None:
    """One SSE event's lines -> its JSON payload, or None for an event with no ``data:``
    (a comment or keep-alive). @raise BadEvent: anything else than llama.cpp's shape."""
    data: list[bytes] = []
    for line in text.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        if field == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
        elif field not in (b"event", b"id", b"retry"):
            raise BadEvent(f"unknown field {field[:40]!r}")
    if not data:
        return None
    try:
        payload = json.loads(b"\n".join(data))
    except ValueError:
        raise BadEvent("data is not JSON")
    if not isinstance(payload, dict):
        raise BadEvent("data is not a JSON object")
    if not isinstance(payload.get("event"), str) or not isinstance(payload.get("model"), str):
        raise BadEvent("no string event and model")
    body = payload.get("data", {})
    if not isinstance(body, dict):
        raise BadEvent("data.data is not an object")
    if "status" in body and not isinstance(body["status"], str):
        raise BadEvent("data.status is not a string")
    return payload


class _Follower:
    """The stream of one router (see the module docstring)."""

    def __init__(self, owner: RouterEvents, router: Upstream) -> None:
        self.owner = owner
        self.router = router
        self.state = StreamState.WAITING
        self.backoff = owner.backoff_min
        self.connecting: Deferred[Any] | None = None
        self.body: Any = None
        self.timer: IDelayedCall | None = None
        self.buffer = b""
        self.events = 0  # events of the current stream
        self.probing = False
        self.probe_again = False
        self.stopped = False

    # -- lifetime ----------------------------------------------------------

    def _move(self, event: StreamEvent) -> None:
        target = STREAM_TRANSITIONS.get((self.state, event))
        if target is None:
            raise AssertionError(f"router event stream: no move from {self.state.value} on {event.value}")
        self.state = target

    def connect(self) -> None:
        if self.stopped:
            return
        self._move(StreamEvent.CONNECT)
        self.events = 0
        self.buffer = b""
        d = self.connecting = self.owner.open(self.router)
        d.addTimeout(self.owner.connect_timeout, self.owner.clock)
        d.addCallbacks(self._answered, self._not_connected)
        d.addErrback(lambda f: self.owner.log.failure("router event stream of {name}", f, name=self.router.name))

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._move(StreamEvent.STOP)
        self.router.events_live = False
        self._cancel_timer()
        if self.connecting is not None:
            d, self.connecting = self.connecting, None
            d.cancel()
        if self.body is not None:
            body, self.body = self.body, None
            body.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _answered(self, body: Any) -> None:
        self.connecting = None
        if self.stopped:
            body.abort()
            return
        if body.code != 200:
            if body.code in (404, 501):
                self.backoff = self.owner.backoff_max  # not offered: ask again now and then
                self.owner.log.info("router {name} does not offer /models/sse ({code}): polling /models only",
                                    name=self.router.name, code=body.code)
            else:
                self.owner.log.warn("router {name}: /models/sse answered {code}; polling /models meanwhile",
                                    name=self.router.name, code=body.code)
            body.abort()
            self._move(StreamEvent.REFUSED)
            self._retry()
            return
        self._move(StreamEvent.ANSWERED)
        self.body = body
        self.router.events_live = True
        self._arm_idle()
        body.deliver(self)
        # a change between our last reading and the stream's start would be missed: read now
        self._probe()

    def _not_connected(self, failure: Failure) -> None:
        self.connecting = None
        if self.stopped:
            return
        self.owner.log.info("router {name}: /models/sse not reached ({why}); polling /models meanwhile",
                            name=self.router.name, why=describe_failure(failure))
        self._move(StreamEvent.REFUSED)
        self._retry()

    def _retry(self) -> None:
        self.router.events_live = False
        if self.stopped:
            return
        self._cancel_timer()
        wait = self.backoff
        # an attempt that delivered no event backs off further; one that did starts again low
        self.backoff = min(self.owner.backoff_max, self.backoff * 2) if self.events == 0 else self.owner.backoff_min
        if self.events:
            wait = self.owner.backoff_min
        self.timer = self.owner.clock.callLater(wait, self._reconnect)

    def _reconnect(self) -> None:
        self.timer = None
        self.connect()

    def _arm_idle(self) -> None:
        self._cancel_timer()
        self.timer = self.owner.clock.callLater(self.owner.idle_timeout, self._idle)

    def _idle(self) -> None:
        self.timer = None
        self.owner.log.info("router {name}: /models/sse silent for {idle:g} s; opening it again",
                            name=self.router.name, idle=self.owner.idle_timeout)
        self._drop()

    def _drop(self) -> None:
        body, self.body = self.body, None
        self._move(StreamEvent.ENDED)
        self._retry()
        if body is not None:
            body.abort()

    # -- the body (L{paddler.interfaces.IUpstreamBody} consumer) -------------

    def body_data(self, data: bytes) -> None:
        if self.body is None or self.stopped:
            return
        self._arm_idle()
        self.buffer = (self.buffer + data).replace(b"\r\n", b"\n")
        while True:
            end = self.buffer.find(b"\n\n")
            if end < 0:
                break
            text, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            if len(text) > self.owner.max_event:
                return self._bad(f"an event of {len(text)} bytes (over {self.owner.max_event})")
            try:
                event = parse_event(text)
            except BadEvent as e:
                return self._bad(str(e))
            if event is not None:
                self._event(event)
            if self.body is None:
                return
        if len(self.buffer) > self.owner.max_event:
            self._bad(f"over {self.owner.max_event} bytes without an event's end")

    def body_done(self, failure: Failure | None) -> None:
        if self.body is None or self.stopped:
            return  # we dropped it
        self.body = None
        self.owner.log.info("router {name}: /models/sse ended{why}; opening it again",
                            name=self.router.name,
                            why="" if failure is None else f" ({describe_failure(failure)})")
        self._move(StreamEvent.ENDED)
        self._retry()

    def _bad(self, why: str) -> None:
        self.owner.bad_events += 1
        self.owner.log.warn("router {name}: bad /models/sse event ({why}): dropping the stream, "
                            "polling /models goes on", name=self.router.name, why=why)
        self.events = 0  # back off as for a failed attempt
        self._drop()

    def _event(self, event: dict[str, Any]) -> None:
        self.events += 1
        self.owner.events_seen += 1
        if event["event"] in _CHANGES:
            self._probe()

    # -- reading the router -------------------------------------------------

    def _probe(self) -> None:
        if self.probing:
            self.probe_again = True
            return
        self.probing = True
        self.probe_again = False
        self.owner.probes += 1
        d = self.owner.probe_now(self.router)

        def done(result: object) -> None:
            self.probing = False
            if self.probe_again and not self.stopped:
                self._probe()

        d.addBoth(done)


class RouterEvents(Service):
    """Follows ``GET /models/sse`` of every router-mode upstream of the pool (see the module docstring).

    @param pool: the L{UpstreamPool}.
    @param clock: the reactor's clock.
    @param open: opens a router's event stream (L{sse_opener}).
    @param probe_now: probes a router at once (the probe service's C{probe_now}).
    @param follows: which routers this balancer follows (with ``--state``: those it probes;
        the others hear of their changes through the shared store); None: every one.
    """

    log = Logger()

    def __init__(
        self,
        pool: Any,
        clock: IReactorTime,
        open: StreamOpener,
        probe_now: ProbeNow,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        max_event: int = 64 * 1024,
        sync_interval: float = 1.0,
        follows: Callable[[Upstream], bool] | None = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.open = open
        self.probe_now = probe_now
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_event = max_event
        self.sync_interval = sync_interval
        self.follows = follows
        self.followers: dict[str, _Follower] = {}
        self.events_seen = 0
        self.bad_events = 0
        self.probes = 0
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        loop = self._loop = LoopingCall(self.sync)
        loop.clock = self.clock
        loop.start(self.sync_interval, now=True).addErrback(
            lambda f: self.log.failure("router event streams loop stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        for follower in self.followers.values():
            follower.stop()
        self.followers = {}

    def sync(self) -> None:
        """Follow every router of the pool this balancer follows, and no other upstream; never raises."""
        try:
            routers = {u.id: u for u in self.pool.upstreams.values()
                       if u.role == "router" and (self.follows is None or self.follows(u))}
            for uid in [uid for uid in self.followers if routers.get(uid) is not self.followers[uid].router]:
                self.followers.pop(uid).stop()
            for uid, router in routers.items():
                if uid not in self.followers:
                    follower = self.followers[uid] = _Follower(self, router)
                    follower.connect()
        except Exception:
            self.log.failure("router event streams: sync failed")

    def state(self) -> dict[str, str]:
        """Each followed router's name -> its stream's state (connecting, streaming, waiting)."""
        return {f.router.name: f.state.value for f in self.followers.values()}


def sse_opener(client: Any, api_key: str | None = None) -> StreamOpener:
    """A L{StreamOpener} over an L{paddler.interfaces.IUpstreamClient}."""

    def open(router: Upstream) -> Deferred[Any]:
        origin = router.url.encode("ascii")
        headers = [(b"Host", origin.partition(b"://")[2]), (b"Accept", b"text/event-stream")]
        key = router.api_key or api_key
        if key:
            headers.append((b"Authorization", b"Bearer " + key.encode("utf-8")))
        return client.send(b"GET", origin, b"/models/sse", headers, None)  # type: ignore[no-any-return]

    return open
