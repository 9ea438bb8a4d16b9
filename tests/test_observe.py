"""The state JSON, its history, the SSE stream and the dashboard app (in memory, fake clock)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.server import Site

from paddler.server.router import NotFoundResource, PrefixRouter
from paddler.observability.dashboard import ObservabilityApp
from paddler.observability.events import FleetEvents
from paddler.observability.snapshot import HISTORY_WINDOW, FleetView, StateHistory
from paddler.observability.stream import ObservabilityService, StateStream, encode_event
from paddler.fleet.pool import UpstreamPool
from paddler.observability.prometheus import PrometheusMetrics
from paddler.simulator.testing import MemoryExchange, MemoryHTTPClient
from paddler.observability.requests import RequestStats
from paddler.fleet.upstream import FailureSeen, SlotsSeen, Upstream, UpstreamState

from .helpers import healthy_upstream, make_pool, mark_unreachable


def fired(d: Deferred) -> Any:
    """The result of a Deferred that must have fired already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class Fleet:
    """A pool, its request figures, a history and the app over them, on a fake clock."""

    def __init__(self, dashboard: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1000.0)
        self.pool: UpstreamPool = make_pool(self.clock, max_buffered=5, timeout=30.0)
        self.stats = RequestStats(self.clock)
        self.history = StateHistory(interval=3.0)
        self.events = FleetEvents(self.clock)
        self.view = FleetView(self.pool, self.stats, self.clock, self.history, self.events)
        self.stream = StateStream(self.clock, self.view)
        self.service = ObservabilityService(
            self.pool, self.stats, self.clock, self.history, self.stream, self.events
        )
        self.metrics = PrometheusMetrics(self.pool, self.stats)
        self.app = ObservabilityApp(self.state, self.stream, self.metrics, dashboard=dashboard)
        self.resource = PrefixRouter(
            [(b"/api/v1/state", self.app.resource()), (b"/dashboard", self.app.resource()),
             (b"/metrics", self.app.resource())],
            NotFoundResource(),
        )
        self.http = StubTreq(self.resource)
        self.site = Site(self.resource, reactor=self.clock)
        self.memory = MemoryHTTPClient(self.site)

    def state(self, with_history: bool) -> dict[str, Any]:
        return self.view.state(with_history)

    def add(self, url: str, total: int = 4, processing: int = 0, name: str | None = None) -> Upstream:
        upstream = healthy_upstream(url, total=total, processing=processing, models=("m.gguf",), clock=self.clock)
        if name is not None:
            upstream.name = name
        upstream.last_probe_at = self.clock.seconds()
        return self.pool.add(upstream)

    def get(self, path: str) -> tuple[Any, bytes]:
        response = fired(self.http.get("http://127.0.0.1:8085" + path))
        body = fired(response.content())
        return response, body

    def get_json(self, path: str) -> tuple[int, Any]:
        response, body = self.get(path)
        assert response.headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
        return response.code, json.loads(body)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """A running fleet; afterwards the service is stopped, connections closed and nothing is left scheduled."""
    fleet = Fleet()
    fleet.service.startService()
    yield fleet
    if fleet.service.running:
        fleet.service.stopService()
    fleet.memory.close()
    fleet.metrics.close()
    assert fleet.clock.getDelayedCalls() == []


def events(exchange: MemoryExchange) -> list[tuple[str, Any]]:
    """The (event, data) pairs received so far on an SSE exchange."""
    out = []
    for block in exchange.pump().body.decode("utf-8").split("\n\n"):
        name = data = None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
        if name is not None:
            out.append((name, data))
    return out


# -- GET /api/v1/state ----------------------------------------------------


def test_state_totals_count_slots_buffer_and_flight(fleet: Fleet) -> None:
    """totals: idle/processing/total slots of usable upstreams, buffered requests and the
    oldest one's wait, our requests in flight, healthy/total upstreams."""
    a = fleet.add("http://10.0.0.1:8080", total=2, processing=1)
    b = fleet.add("http://10.0.0.2:8080", total=3)
    mark_unreachable(b, "connection refused")
    lease = fired(fleet.pool.acquire())
    assert lease.upstream is a
    waiting = fleet.pool.acquire()
    fleet.clock.advance(2.5)

    code, state = fleet.get_json("/api/v1/state")

    assert code == 200
    assert state["totals"] == {
        "slots_idle": 0,
        "slots_processing": 2,
        "slots_total": 2,
        "requests_buffered": 1,
        "oldest_buffered_wait": 2.5,
        "requests_in_flight": 1,
        "upstreams": {"healthy": 1, "total": 2},
    }
    assert state["time"] == fleet.clock.seconds()
    assert state["version"]
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    lease.release()


def test_state_describes_every_field_of_every_upstream(fleet: Fleet) -> None:
    """upstreams[]: name, URL, state and status, slots, model, ages of the last probe and
    report, last error, requests served and failed, connections dropped for unexpected bytes; sorted by name."""
    b = fleet.add("http://10.0.0.2:8080", total=2, name="beta")
    a = fleet.add("http://10.0.0.1:8080", total=4, processing=1, name="alpha")
    a.state_since = 990.0
    fleet.clock.advance(1.5)
    b.last_report_at = fleet.clock.seconds() - 0.5
    mark_unreachable(b, "connection refused")
    a.requests_served = 7
    a.requests_failed = 2

    _, state = fleet.get_json("/api/v1/state")

    assert [u["name"] for u in state["upstreams"]] == ["alpha", "beta"]
    alpha, beta = state["upstreams"]
    assert alpha == {
        "id": a.id,
        "name": "alpha",
        "url": "http://10.0.0.1:8080",
        "source": "static",
        "state": "healthy",
        "status": "healthy",
        "draining": False,
        "slots_idle": 3,
        "slots_processing": 1,
        "slots_total": 4,
        "requests_in_flight": 0,
        "model": "m.gguf",
        "models": ["m.gguf"],
        "role": "single",
        "parent_id": None,
        "model_state": None,
        "load_seconds": None,
        "pinned": False,
        "probe_method": "slots",
        "last_update_age": 1.5,
        "last_probe_age": 1.5,
        "last_report_age": None,
        "last_error": None,
        "consecutive_failures": 0,
        "requests_served": 7,
        "requests_failed": 2,
        "connections_dropped": 0,
        "has_api_key": False,
        "last_update_at": 1000.0,
        "last_probe_at": 1000.0,
        "last_report_at": None,
        "state_since": 990.0,
        "time_in_state": 11.5,
        "draining_since": None,
        "removal_pending": False,
        "recent": {
            "requests": 0, "requests_per_second": 0.0, "ttft_p50": None, "ttft_p95": None,
            "duration_p50": None, "duration_p95": None, "responses_4xx": 0, "responses_5xx": 0,
        },
        "routing": {},
    }
    assert beta["state"] == "unreachable"
    assert beta["last_error"] == "connection refused"
    assert beta["last_report_age"] == 0.5
    assert beta["last_update_age"] == 0.5


def test_state_status_shows_busy_and_draining(fleet: Fleet) -> None:
    """status: "busy" for a healthy upstream with no idle slot, "draining" while draining."""
    busy = fleet.add("http://10.0.0.1:8080", total=1, processing=1, name="a")
    draining = fleet.add("http://10.0.0.2:8080", name="b")
    draining.draining = True
    _, state = fleet.get_json("/api/v1/state")
    assert [u["status"] for u in state["upstreams"]] == ["busy", "draining"]
    assert busy.state is UpstreamState.HEALTHY


def test_state_recent_figures_cover_the_last_minute(fleet: Fleet) -> None:
    """recent: requests per second and TTFT / duration p50, p95, p99 of the last 60 s;
    requests: totals by status class since start."""
    fleet.stats.record(200, 10.0, ttfb=5.0)
    fleet.clock.advance(61)
    for i in range(1, 21):
        fleet.stats.record(200, i * 0.5, ttfb=i * 0.1)
    fleet.stats.record(502, 0.2)
    fleet.stats.record(0, 3.0)

    _, state = fleet.get_json("/api/v1/state")

    recent = state["recent"]
    assert recent["window_seconds"] == 60.0
    assert recent["requests"] == 22
    assert recent["requests_per_second"] == pytest.approx(22 / 60)
    assert recent["ttft_p50"] == pytest.approx(1.0)
    assert recent["ttft_p95"] == pytest.approx(1.9)
    assert recent["ttft_p99"] == pytest.approx(2.0)
    assert recent["duration_p50"] == pytest.approx(4.5)  # 11th of 22, with 0.2 and 3.0
    assert recent["duration_p95"] == pytest.approx(9.5)
    assert recent["duration_p99"] == pytest.approx(10.0)
    assert state["requests"]["total"] == 23
    assert state["requests"]["by_status"] == {"2xx": 21, "5xx": 1, "cancelled": 1}


def test_state_has_the_history_unless_asked_not_to(fleet: Fleet) -> None:
    """history: interval, window and the samples taken so far; ?history=0 leaves it out."""
    fleet.add("http://10.0.0.1:8080", total=4, processing=1)
    fleet.clock.advance(3.0)

    _, state = fleet.get_json("/api/v1/state")
    _, lean = fleet.get_json("/api/v1/state?history=0")

    assert state["history"]["interval"] == 3.0
    assert state["history"]["window"] == HISTORY_WINDOW
    assert [s["time"] for s in state["history"]["samples"]] == [1000.0, 1003.0]
    assert state["history"]["samples"][-1]["slots_processing"] == 1
    assert "history" not in lean


def test_state_keeps_hostile_names_as_data(fleet: Fleet) -> None:
    """An upstream named <script> is reported verbatim in JSON (escaping is the page's job)."""
    fleet.add("http://10.0.0.1:8080", name="<script>alert(1)</script>")
    _, state = fleet.get_json("/api/v1/state")
    assert state["upstreams"][0]["name"] == "<script>alert(1)</script>"


def test_unknown_paths_and_methods_get_json_errors(fleet: Fleet) -> None:
    """Below the mounted prefixes an unknown path is a JSON 404 and POST a JSON 405."""
    code, body = fleet.get_json("/api/v1/state/nope")
    assert code == 404 and body["error"]["type"] == "not_found_error"
    response = fired(fleet.http.post("http://127.0.0.1:8085/api/v1/state", data=b"{}"))
    assert response.code == 405
    assert json.loads(fired(response.content()))["error"]["code"] == 405


# -- history --------------------------------------------------------------


def test_history_rate_is_requests_between_samples_and_the_ring_is_bounded() -> None:
    """A sample's requests/s counts the requests since the previous sample; the ring keeps
    window / interval samples."""
    clock = Clock()
    pool = make_pool(clock)
    stats = RequestStats(clock)
    history = StateHistory(interval=2.0, window=10.0)
    first = history.take(pool, stats, clock.seconds())
    for _ in range(6):
        stats.record(200, 0.1, ttfb=0.05)
    clock.advance(2.0)
    second = history.take(pool, stats, clock.seconds())
    assert first["requests_per_second"] is None
    assert second["requests_per_second"] == 3.0
    assert second["ttft_p95"] == 0.05
    for _ in range(10):
        clock.advance(2.0)
        history.take(pool, stats, clock.seconds())
    assert len(history.samples) == 5
    assert history.samples[-1]["time"] == clock.seconds()


def test_service_samples_at_start_and_every_interval_and_stops_clean() -> None:
    """The history service takes a sample at start and one per interval; stop leaves nothing scheduled."""
    fleet = Fleet()
    fleet.service.startService()
    assert len(fleet.history.samples) == 1
    fleet.clock.advance(3.0)
    fleet.clock.advance(3.0)
    assert len(fleet.history.samples) == 3
    fleet.service.stopService()
    assert fleet.clock.getDelayedCalls() == []
    fleet.clock.advance(30.0)
    assert len(fleet.history.samples) == 3


@pytest.mark.allow_logged_errors
def test_a_failing_sample_is_logged_and_sampling_goes_on(fail_on_logged_errors: list) -> None:
    """An exception while sampling is logged; the next interval samples again."""
    fleet = Fleet()
    real_take = fleet.history.take
    calls = []

    def take(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_take(*args)

    fleet.history.take = take  # type: ignore[method-assign]
    fleet.service.startService()
    fleet.clock.advance(3.0)
    assert len(calls) == 2 and len(fleet.history.samples) == 1
    assert any("sampling the fleet history failed" in e.get("log_format", "") for e in fail_on_logged_errors)
    fleet.service.stopService()


# -- GET /api/v1/state/stream -----------------------------------------------


def test_stream_opens_with_the_full_state_and_history(fleet: Fleet) -> None:
    """The stream is text/event-stream, not cached, sets the retry delay and starts with
    the whole state including the history."""
    fleet.add("http://10.0.0.1:8080")
    exchange = fleet.memory.get("/api/v1/state/stream")
    response = exchange.pump()
    assert response.status == 200
    assert response.header("content-type") == "text/event-stream; charset=utf-8"
    assert response.header("cache-control") == "no-cache"
    assert response.body.startswith(b"retry: 2000\n\n")
    [(name, state)] = events(exchange)
    assert name == "state"
    assert state["totals"]["upstreams"] == {"healthy": 1, "total": 1}
    assert len(state["history"]["samples"]) == 1
    assert len(fleet.stream.clients) == 1


def apply_delta(state: dict[str, Any], delta: dict[str, Any]) -> None:
    """What the page does with a "delta" event (app.js applyDelta), on a state it holds."""
    for key in ("time", "policy", "buffer", "totals", "requests", "recent"):
        if key in delta:  # "recent" comes with the upstreams' changes only
            state[key] = delta[key]
    rows = {u["id"]: u for u in state["upstreams"]}
    for key, changes in delta.get("upstreams", {}).items():
        row = rows.setdefault(key, {})
        for field, value in changes.items():
            if isinstance(value, dict) and isinstance(row.get(field), dict):
                row[field].update(value)
            else:
                row[field] = value
    for key in delta.get("removed", []):
        rows.pop(key, None)
    state["upstreams"] = sorted(rows.values(), key=lambda u: (u["name"], u["url"]))
    seen = {e["seq"] for e in state["events"]}
    state["events"] += [e for e in delta.get("events", []) if e["seq"] not in seen]


def comparable(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The upstreams of a state without the fields the stream leaves to the page (ages, time stamps)."""
    skip = {"last_update_age", "last_probe_age", "last_report_age", "time_in_state",
            "last_update_at", "last_probe_at", "last_report_at"}
    return [{k: v for k, v in u.items() if k not in skip} for u in state["upstreams"]]


def test_stream_sends_a_new_upstream_whole_and_then_only_its_changed_fields(fleet: Fleet) -> None:
    """After the first state, changes come as "delta" events: a new upstream with every field
    and its "added" event, then only the fields that changed (slots, in flight), never the
    history or the unchanged upstreams."""
    quiet = fleet.add("http://10.0.0.9:8080", name="quiet")
    exchange = fleet.memory.get("/api/v1/state/stream")
    fleet.clock.advance(1.0)
    assert len(events(exchange)) == 1

    new = fleet.add("http://10.0.0.1:8080", name="new")
    fleet.clock.advance(0)
    [(name, delta)] = events(exchange)[1:]
    assert name == "delta"
    assert list(delta["upstreams"]) == [new.id]
    assert delta["upstreams"][new.id]["name"] == "new"
    assert delta["upstreams"][new.id]["slots_total"] == 4
    assert [(e["kind"], e["upstream"]) for e in delta["events"]] == [("added", "new")]
    assert delta["removed"] == [] and "history" not in delta

    fleet.clock.advance(1.0)
    lease = fired(fleet.pool.acquire())
    assert lease.upstream is new or lease.upstream is quiet
    fleet.clock.advance(1.0)
    *_, (name, delta) = [e for e in events(exchange) if e[0] == "delta"]
    assert list(delta["upstreams"]) == [lease.upstream.id]
    assert delta["upstreams"][lease.upstream.id] == {
        "slots_idle": 3, "slots_processing": 1, "requests_in_flight": 1
    }
    assert delta["totals"]["slots_processing"] == 1
    lease.release()


def test_stream_sends_fleet_figures_at_once_and_upstream_changes_at_most_once_a_second(
    fleet: Fleet,
) -> None:
    """A finished request is in the next push (0.25 s later); a change of an upstream's
    figures waits for the next rows send, at most one a second."""
    upstream = fleet.add("http://10.0.0.1:8080")
    exchange = fleet.memory.get("/api/v1/state/stream")
    fleet.clock.advance(0.5)
    fleet.stats.record(200, 1.0, ttfb=0.2, upstream=upstream)
    fleet.clock.advance(PUSH := fleet.stream.min_interval)
    [(name, delta)] = events(exchange)[1:]
    assert PUSH == 0.25
    assert delta["requests"]["total"] == 1 and "upstreams" not in delta and "recent" not in delta
    fleet.clock.advance(0.2)
    assert len(events(exchange)) == 2
    fleet.clock.advance(0.05)  # a second after the first state
    *_, (name, delta) = events(exchange)
    assert delta["upstreams"][upstream.id]["recent"]["requests"] == 1
    assert delta["upstreams"][upstream.id]["requests_served"] == 1
    assert delta["recent"]["requests"] == 1


def test_stream_sends_state_changes_and_drains_at_once_and_removals_by_id(fleet: Fleet) -> None:
    """An upstream turning unreachable, a drain and a removal reach the stream at the next push
    (not a second later), with their event log entries; a removed upstream is listed by id."""
    a = fleet.add("http://10.0.0.1:8080", name="a")
    b = fleet.add("http://10.0.0.2:8080", name="b")
    exchange = fleet.memory.get("/api/v1/state/stream")
    fleet.clock.advance(0.25)

    fleet.pool.observe(a, FailureSeen("connection refused"))
    fleet.pool.drain(b.id, requested=True)
    fleet.clock.advance(0)
    [(name, delta)] = events(exchange)[1:]
    assert delta["upstreams"][a.id]["state"] == "unreachable"
    assert delta["upstreams"][a.id]["last_error"] == "connection refused"
    assert delta["upstreams"][b.id]["draining"] is True
    assert [(e["kind"], e["upstream"], e.get("state")) for e in delta["events"]] == [
        ("state", "a", "unreachable"), ("draining", "b", None)
    ]

    fleet.clock.advance(0.1)
    fleet.pool.remove(b.id)
    fleet.clock.advance(0.15)
    *_, (name, delta) = events(exchange)
    assert delta["removed"] == [b.id]
    assert [e["kind"] for e in delta["events"]] == ["removed"]


def test_stream_sends_time_stamps_again_only_after_five_seconds(fleet: Fleet) -> None:
    """A probe every second moves last_update_at; the stream sends it again only once the page's
    copy is 5 s old (the page shows ages from it), not on every probe."""
    upstream = fleet.add("http://10.0.0.1:8080")
    exchange = fleet.memory.get("/api/v1/state/stream")
    sent = []
    for _ in range(12):
        fleet.clock.advance(1.0)
        fleet.pool.observe(upstream, SlotsSeen(4, 0, upstream.probe_mark()))
        fleet.clock.advance(0)
    for name, delta in events(exchange)[1:]:
        changes = delta.get("upstreams", {}).get(upstream.id, {})
        if "last_update_at" in changes:
            sent.append(changes["last_update_at"])
    assert sent == [1005.0, 1010.0]


def test_deltas_applied_to_the_first_state_give_the_current_state(fleet: Fleet) -> None:
    """A page that applies every delta to the first state holds the same upstreams, totals and
    event log as a fresh GET /api/v1/state, after upstreams came and went, requests ran,
    states changed and drains happened."""
    ups = [fleet.add(f"http://10.0.0.{i}:8080", total=2, name=f"u{i}") for i in range(1, 5)]
    exchange = fleet.memory.get("/api/v1/state/stream")
    leases: list[Any] = []
    waiting = []
    for step in range(40):
        fleet.clock.advance(0.3)
        if step % 3 == 0:
            waiting.append(fleet.pool.acquire().addCallback(leases.append))
        if step % 4 == 1 and leases:
            lease = leases.pop(0)
            fleet.stats.record(200 if step % 8 else 503, 0.5, 0.1, lease.upstream)
            lease.release()
        if step == 10:
            fleet.pool.observe(ups[0], FailureSeen("connection refused"))
        if step == 15:
            fleet.pool.drain(ups[1].id, requested=True)
        if step == 20:
            fleet.pool.remove(ups[2].id)
        if step == 25:
            fleet.add("http://10.0.0.9:8080", name="late")
        if step == 30:
            fleet.pool.undrain(ups[1].id)
    fleet.clock.advance(1.0)  # the last rows are sent
    received = events(exchange)
    held = received[0][1]
    for name, delta in received[1:]:
        if name == "delta":
            apply_delta(held, delta)
    _, fresh = fleet.get_json("/api/v1/state")
    assert comparable(held) == comparable(fresh)
    assert held["totals"] == fresh["totals"] and held["requests"] == fresh["requests"]
    assert held["recent"] == fresh["recent"]
    assert [e["seq"] for e in held["events"]] == [e["seq"] for e in fresh["events"]]
    for d in waiting:
        d.cancel()
        d.addErrback(lambda _: None)
    for lease in leases:
        lease.release()


def test_stream_pushes_at_most_four_states_a_second(fleet: Fleet) -> None:
    """A burst of changes is coalesced: 100 changes within a second make at most 5 pushes,
    and the last push carries the last change."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    for i in range(100):
        fleet.stats.record(200, 0.1)
        fleet.clock.advance(0.01)
    fleet.clock.advance(0.25)
    pushed = events(exchange)[1:]
    assert 1 <= len(pushed) <= 5
    assert fleet.stream.pushes <= 5
    assert pushed[-1][1]["requests"]["total"] == 100


def test_stream_sends_history_samples_as_they_are_taken(fleet: Fleet) -> None:
    """Each new history sample is sent as a "sample" event."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    fleet.clock.advance(3.0)
    samples = [data for name, data in events(exchange) if name == "sample"]
    assert [s["time"] for s in samples] == [1003.0]


def test_stream_heartbeat_comment_every_15_seconds(fleet: Fleet) -> None:
    """With nothing changing, a heartbeat comment goes out every 15 s."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    exchange.pump()
    fleet.clock.advance(14.9)
    assert b": heartbeat" not in exchange.pump().body
    fleet.clock.advance(0.1)
    assert exchange.pump().body.count(b": heartbeat") == 1
    fleet.clock.advance(15.0)
    assert exchange.pump().body.count(b": heartbeat") == 2


def test_a_slow_client_gets_only_the_latest_state_when_it_catches_up(fleet: Fleet) -> None:
    """While the connection is paused nothing is written or kept but a marker; on resume
    one state with the latest figures goes out."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    before = len(events(exchange))
    exchange.transport.producer.pauseProducing()
    for _ in range(50):
        fleet.stats.record(200, 0.1)
        fleet.clock.advance(0.05)  # 2.5 s: no history sample is due
    assert exchange.writes() == 0
    [client] = fleet.stream.clients
    assert client.pending == "state"

    exchange.transport.producer.resumeProducing()

    received = events(exchange)[before:]
    assert len(received) == 1
    assert received[0][1]["requests"]["total"] == 50
    assert "history" not in received[0][1]


def test_a_slow_client_that_missed_a_sample_gets_the_whole_history(fleet: Fleet) -> None:
    """A sample missed while paused is made up for by a full state (with history) on resume."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    before = len(events(exchange))
    exchange.transport.producer.pauseProducing()
    fleet.clock.advance(3.0)
    fleet.stats.record(200, 0.1)
    fleet.clock.advance(1.0)
    exchange.transport.producer.resumeProducing()
    [(name, state)] = events(exchange)[before:]
    assert name == "state"
    assert [s["time"] for s in state["history"]["samples"]] == [1000.0, 1003.0]


def test_a_client_that_leaves_is_unregistered(fleet: Fleet) -> None:
    """Closing the connection removes the client; later changes write nothing and log nothing."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    assert len(fleet.stream.clients) == 1
    exchange.close()
    assert fleet.stream.clients == []
    fleet.stats.record(200, 0.1)
    fleet.clock.advance(1.0)
    assert fleet.stream.pushes == 0


def test_stopping_the_service_ends_open_streams(fleet: Fleet) -> None:
    """stopService finishes every open stream (the response completes) and cancels timers."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    fleet.stats.record(200, 0.1)
    fleet.service.stopService()
    assert exchange.pump().complete
    assert fleet.stream.clients == []
    fleet.clock.advance(20.0)
    assert fleet.stream.pushes == 0


def test_head_on_the_stream_opens_no_stream(fleet: Fleet) -> None:
    """HEAD /api/v1/state/stream answers with the stream's type and ends at once."""
    exchange = fleet.memory.request(b"HEAD", "/api/v1/state/stream")
    assert exchange.pump().header("content-type") == "text/event-stream; charset=utf-8"
    assert fleet.stream.clients == []


def test_stream_refused_when_not_running() -> None:
    """Before the service starts (or after it stops) the stream answers 503 JSON."""
    fleet = Fleet()
    code, body = fleet.get_json("/api/v1/state/stream")
    assert code == 503 and body["error"]["type"] == "unavailable_error"


def test_encode_event_is_one_data_line() -> None:
    """An event is event:, id:, one data: line of compact JSON and a blank line, even with newlines in data."""
    assert encode_event("state", {"a": "x\ny"}, 7) == b'event: state\nid: 7\ndata: {"a":"x\\ny"}\n\n'


# -- /dashboard -------------------------------------------------------------


def test_dashboard_page_links_its_assets_relative_to_where_it_is(fleet: Fleet) -> None:
    """/dashboard and /dashboard/ serve the page; asset URLs resolve to /dashboard/app.js
    from both; the page is locked down by a Content-Security-Policy."""
    response, page = fleet.get("/dashboard")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert b'src="dashboard/app.js"' in page and b'href="dashboard/style.css"' in page
    csp = response.headers.getRawHeaders("content-security-policy")[0]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    response, page = fleet.get("/dashboard/")
    assert b'src="app.js"' in page and b"{{" not in page


@pytest.mark.parametrize(
    "name, content_type",
    [("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")],
)
def test_dashboard_assets_come_from_package_data(fleet: Fleet, name: str, content_type: str) -> None:
    """/dashboard/app.js and /dashboard/style.css are the package's files with their types."""
    response, body = fleet.get("/dashboard/" + name)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == [content_type]
    assert response.headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    assert body == resources.files("paddler.observability").joinpath("assets", name).read_bytes()


def test_dashboard_serves_no_other_file(fleet: Fleet) -> None:
    """Only the listed assets are served: anything else under /dashboard/ is a JSON 404."""
    for path in ("/dashboard/index.html", "/dashboard/observe.py", "/dashboard/..%2Fobserve.py"):
        code, body = fleet.get_json(path)
        assert code == 404, path


def test_no_dashboard_answers_json_404() -> None:
    """With --no-dashboard the page and its assets are JSON 404s; the state API stays."""
    fleet = Fleet(dashboard=False)
    for path in ("/dashboard", "/dashboard/", "/dashboard/app.js"):
        code, body = fleet.get_json(path)
        assert code == 404
        assert "--no-dashboard" in body["error"]["message"]
    code, _ = fleet.get_json("/api/v1/state")
    assert code == 200


def test_dashboard_script_never_parses_data_as_html() -> None:
    """The page builds its DOM with textContent: no innerHTML, outerHTML,
    insertAdjacentHTML, document.write or eval in app.js."""
    script = resources.files("paddler.observability").joinpath("assets", "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert "textContent" in script


def test_dashboard_script_keeps_the_token_in_memory_only() -> None:
    """app.js never writes to web storage or cookies, and sends the token only as a header."""
    script = resources.files("paddler.observability").joinpath("assets", "app.js").read_text()
    for store in ("localStorage", "sessionStorage", "document.cookie", "indexedDB", "history.pushState"):
        assert store not in script, store
    assert script.count("token") and '"Authorization"' in script
    assert 'credentials: "omit"' in script


def test_dashboard_page_has_no_inline_script_or_external_url() -> None:
    """index.html loads only its own files: no inline script, no CDN."""
    page = resources.files("paddler.observability").joinpath("assets", "index.html").read_text()
    assert re.findall(r"<script[^>]*>", page) == ['<script src="{{assets}}app.js" defer>']
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


# -- /metrics ---------------------------------------------------------------


def test_metrics_route_serves_prometheus_text(fleet: Fleet) -> None:
    """/metrics answers in the Prometheus text format that prometheus_client parses."""
    fleet.add("http://10.0.0.1:8080")
    response, body = fleet.get("/metrics")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version=")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"paddler_slots_idle", "paddler_requests_buffered", "paddler_upstream_slots_idle"} <= names


def test_a_client_paused_past_the_stall_deadline_is_disconnected(fleet: Fleet) -> None:
    """A stream whose client stops reading for 60 s is dropped: every stream has an idle deadline."""
    exchange = fleet.memory.get("/api/v1/state/stream")
    exchange.pump()
    exchange.transport.producer.pauseProducing()
    fleet.clock.advance(59.0)
    assert len(fleet.stream.clients) == 1
    exchange.transport.producer.resumeProducing()
    exchange.transport.producer.pauseProducing()
    fleet.clock.advance(59.0)  # the deadline restarted on resume
    assert len(fleet.stream.clients) == 1
    fleet.clock.advance(1.0)
    assert fleet.stream.clients == []
    assert exchange.transport.disconnecting or getattr(exchange.transport, "disconnected", False)
