"""Seeing the fleet: the state JSON, its 15-minute history, the live SSE
stream of it and the Klein app that serves them with the dashboard.

Routes of L{ObservabilityApp} (on the management port; the app sees whole
paths, see L{paddler.mgmtroot.PrefixRouter}):

- C{GET /api/v1/state}: L{build_state} as JSON (C{?history=0} leaves the
  history out);
- C{GET /api/v1/state/stream}: the same as server-sent events (L{StateStream});
- C{GET /dashboard}, C{/dashboard/}, C{/dashboard/app.js},
  C{/dashboard/style.css}: the dashboard, from package data
  C{paddler/observability/assets/};
- C{GET /metrics}: Prometheus text (L{paddler.prometheus.PrometheusMetrics}).

The field list and event format are in C{docs/observability.md}.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from klein import Klein
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from paddler import __version__
from paddler.errors import error_body, json_response
from paddler.fleet.pool import UpstreamPool
from paddler.observability.requests import RequestStats
from paddler.fleet.upstream import Upstream

#: Seconds of history the dashboard charts show.
HISTORY_WINDOW = 900.0
#: Seconds between two history samples.
HISTORY_INTERVAL = 3.0
#: Shortest time between two pushed states on the stream (at most 4 a second).
PUSH_INTERVAL = 0.25
#: Seconds between two heartbeat comments on the stream.
HEARTBEAT_INTERVAL = 15.0
#: Milliseconds an EventSource waits before reconnecting.
RECONNECT_MS = 2000


def _age(at: float | None, now: float) -> float | None:
    return None if at is None else max(0.0, now - at)


def describe_upstream(upstream: Upstream, now: float) -> dict[str, Any]:
    """L{Upstream.describe} plus the ages of the last probe and the last agent report."""
    description = upstream.describe(now)
    description["last_probe_age"] = _age(upstream.last_probe_at, now)
    description["last_report_age"] = _age(upstream.last_report_at, now)
    return description


def build_state(
    pool: UpstreamPool,
    stats: RequestStats,
    clock: IReactorTime,
    history: StateHistory | None = None,
) -> dict[str, Any]:
    """
    The whole fleet at C{clock.seconds()}, JSON-ready: totals, every upstream
    (sorted by name), request counters, last-minute figures and, when
    C{history} is given, its samples.
    """
    now = clock.seconds()
    state: dict[str, Any] = {
        "version": __version__,
        "time": now,
        "totals": pool.totals(),
        "requests": {
            "total": stats.requests_total,
            "by_status": dict(sorted(stats.by_status.items())),
        },
        "recent": stats.recent(),
        "upstreams": [
            describe_upstream(u, now)
            for u in sorted(pool.upstreams.values(), key=lambda u: (u.name, u.url))
        ],
    }
    if history is not None:
        state["history"] = history.describe()
    return state


class StateHistory:
    """
    A ring of fleet samples (the last C{window} seconds, one every
    C{interval}), so the dashboard charts have data as soon as they load.
    """

    def __init__(self, interval: float = HISTORY_INTERVAL, window: float = HISTORY_WINDOW) -> None:
        self.interval = interval
        self.window = window
        self.samples: deque[dict[str, Any]] = deque(maxlen=max(1, int(window / interval)))
        self._previous: tuple[float, int] | None = None
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call C{listener(sample)} for every new sample; return an unsubscriber."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def take(self, pool: UpstreamPool, stats: RequestStats, now: float) -> dict[str, Any]:
        """Add one sample of the fleet at C{now} and tell the listeners."""
        totals = pool.totals()
        recent = stats.recent()
        rate: float | None = None
        if self._previous is not None and now > self._previous[0]:
            rate = (stats.requests_total - self._previous[1]) / (now - self._previous[0])
        self._previous = (now, stats.requests_total)
        sample = {
            "time": now,
            "slots_processing": totals["slots_processing"],
            "slots_total": totals["slots_total"],
            "requests_buffered": totals["requests_buffered"],
            "requests_per_second": rate,
            "ttft_p95": recent["ttft_p95"],
        }
        self.samples.append(sample)
        for listener in list(self._listeners):
            listener(sample)
        return sample

    def describe(self) -> dict[str, Any]:
        return {"interval": self.interval, "window": self.window, "samples": list(self.samples)}


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


def _asset(name: str) -> bytes:
    return resources.files("paddler.observability").joinpath("assets", name).read_bytes()


#: Files of the dashboard (package data C{paddler/observability/assets/}) and their types.
DASHBOARD_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: The page loads only its own files and talks only to its own origin.
DASHBOARD_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class ObservabilityApp:
    """
    The Klein app of the state API, the dashboard and C{/metrics}.

    @param state: builds the state; called with C{True} to include the history.
    @param stream: the live stream (L{StateStream}).
    @param metrics: has C{render() -> bytes} and C{content_type}; C{None}
        answers C{/metrics} with 404.
    @param dashboard: C{False} (C{--no-dashboard}) answers C{/dashboard} with 404.
    """

    app = Klein()

    def __init__(
        self,
        state: Callable[[bool], dict[str, Any]],
        stream: StateStream,
        metrics: Any = None,
        dashboard: bool = True,
    ) -> None:
        self.state = state
        self.stream = stream
        self.metrics = metrics
        self.dashboard = dashboard
        self._assets: dict[str, bytes] = {}

    def resource(self) -> Any:
        return self.app.resource()

    @staticmethod
    def _json(request: Any, status: int, body: bytes) -> bytes:
        return json_response(request, status, body, {b"cache-control": b"no-store"})

    @app.route("/api/v1/state", methods=["GET"])
    def get_state(self, request: Any) -> bytes:
        with_history = request.args.get(b"history", [b"1"])[-1] not in (b"0", b"false", b"no")
        body = json.dumps(self.state(with_history), separators=(",", ":")).encode("utf-8")
        return self._json(request, 200, body)

    @app.route("/api/v1/state/stream", methods=["GET"])
    def get_stream(self, request: Any) -> Any:
        if not self.stream.running:
            return self._json(
                request, 503, error_body(503, "the state stream is not running", "unavailable_error")
            )
        if request.method == b"HEAD":
            request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
            return b""
        return self.stream.attach(request)

    @app.route("/metrics", methods=["GET"])
    def get_metrics(self, request: Any) -> bytes:
        if self.metrics is None:
            return self._json(request, 404, error_body(404, "metrics are off", "not_found_error"))
        request.setHeader(b"content-type", self.metrics.content_type.encode("ascii"))
        return self.metrics.render()

    @app.route("/dashboard", methods=["GET"])
    def get_dashboard(self, request: Any) -> bytes:
        return self._serve_asset(request, "index.html", assets="dashboard/")

    @app.route("/dashboard/", methods=["GET"])
    def get_dashboard_slash(self, request: Any) -> bytes:
        return self._serve_asset(request, "index.html", assets="")

    @app.route("/dashboard/<string:name>", methods=["GET"])
    def get_dashboard_asset(self, request: Any, name: str) -> bytes:
        if name == "index.html" or name not in DASHBOARD_ASSETS:
            return self._json(
                request, 404, error_body(404, f"no such path: /dashboard/{name}", "not_found_error")
            )
        return self._serve_asset(request, name)

    def _serve_asset(self, request: Any, name: str, assets: str = "") -> bytes:
        if not self.dashboard:
            return self._json(
                request,
                404,
                error_body(404, "the dashboard is off (--no-dashboard)", "not_found_error"),
            )
        if name not in self._assets:
            self._assets[name] = _asset(name)
        body = self._assets[name]
        if name == "index.html":
            # Asset URLs relative to where the page was asked for, so the page
            # works at /dashboard and /dashboard/ and behind a path prefix.
            body = body.replace(b"{{assets}}", assets.encode("ascii"))
        request.setHeader(b"content-type", DASHBOARD_ASSETS[name].encode("ascii"))
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", DASHBOARD_CSP.encode("ascii"))
        request.setHeader(b"referrer-policy", b"no-referrer")
        return body

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Failure) -> bytes:
        path = request.path.decode("latin-1")
        return self._json(request, 404, error_body(404, f"no such path: {path}", "not_found_error"))

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: Any, failure: Failure) -> bytes:
        method = request.method.decode("latin-1")
        request.setHeader(b"allow", b"GET, HEAD")
        return self._json(
            request, 405, error_body(405, f"{method} is not allowed here", "invalid_request_error")
        )
