"""Following routers' ``GET /models/sse`` (L{paddler.fleet.router_events}), on a fake clock:
events make the balancer read the router at once; the stream has deadlines, reconnects with
backoff, and a garbled or hostile stream is dropped (a warning) while polling goes on."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

from paddler.fleet.router_events import BadEvent, RouterEvents, parse_event, sse_opener
from paddler.fleet.upstream import Upstream

from .helpers import FakeUpstreamBody


class Pool:
    def __init__(self) -> None:
        self.upstreams: dict[str, Upstream] = {}


def router(url: str = "http://10.0.0.1:8080") -> Upstream:
    upstream = Upstream(url)
    upstream.role = "router"
    return upstream


class World:
    """A RouterEvents over a fake opener (one pending Deferred per attempt) and a probe_now
    that records its calls (each one a Deferred the test fires)."""

    def __init__(self, **settings: Any) -> None:
        self.clock = Clock()
        self.pool = Pool()
        self.attempts: list[tuple[Upstream, Deferred[Any]]] = []
        self.probes: list[Deferred[Any]] = []
        self.logged: list[dict[str, Any]] = []
        settings.setdefault("backoff_min", 1.0)
        settings.setdefault("backoff_max", 8.0)
        settings.setdefault("connect_timeout", 5.0)
        settings.setdefault("idle_timeout", 30.0)
        self.events = RouterEvents(self.pool, self.clock, self.open, self.probe_now, **settings)
        self.events.log = Logger(observer=self.logged.append)

    def open(self, upstream: Upstream) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((upstream, d))
        return d

    def probe_now(self, upstream: Upstream) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.probes.append(d)
        return d

    def finish_probes(self) -> None:
        for d in list(self.probes):
            if not d.called:
                d.callback(None)

    def add(self, upstream: Upstream) -> Upstream:
        self.pool.upstreams[upstream.id] = upstream
        return upstream

    def start(self) -> None:
        self.events.startService()

    def connect(self, code: int = 200) -> FakeUpstreamBody:
        body = FakeUpstreamBody()
        body.code = code
        _, d = self.attempts[-1]
        d.callback(body)
        return body

    def warnings(self) -> list[str]:
        return [e["why"] for e in self.logged if e["log_level"].name == "warn" and "why" in e]

    def stop(self) -> None:
        self.events.stopService()
        self.finish_probes()
        assert self.clock.getDelayedCalls() == []


def event(name: str, model: str = "alpha", **data: Any) -> bytes:
    import json

    return b"data: " + json.dumps({"model": model, "event": name, "data": data}).encode() + b"\n\n"


@pytest.fixture
def world():
    w = World()
    yield w
    w.stop()


def test_status_events_read_the_router_at_once(world: World) -> None:
    """A router of the pool gets its stream; once it answers 200 it is live and read once
    (a change before the stream began would be missed); each status event reads it again,
    one arriving during a read asks for one more read after it, download progress none."""
    r = world.add(router())
    world.start()
    assert [u for u, _ in world.attempts] == [r]
    body = world.connect()
    assert r.events_live and world.events.state() == {r.name: "streaming"}
    assert len(world.probes) == 1
    world.finish_probes()
    body.consumer.body_data(event("model_status", status="loading"))
    assert len(world.probes) == 2
    body.consumer.body_data(event("status_change", status="loaded") + event("status_change", status="sleeping"))
    assert len(world.probes) == 2, "both arrived during the read: one more read after it"
    world.finish_probes()
    assert len(world.probes) == 3
    world.finish_probes()
    body.consumer.body_data(event("download_progress", **{"https://x/m.gguf": {"done": 1, "total": 2}}))
    body.consumer.body_data(b": keep-alive\n\n")
    assert len(world.probes) == 3
    body.consumer.body_data(event("models_reload", model="*"))
    assert len(world.probes) == 4
    assert world.events.events_seen == 5 and world.warnings() == []


def test_an_event_split_across_reads_and_crlf_lines_are_one_event(world: World) -> None:
    """Bytes may arrive in any pieces, lines may end in CRLF: one event, one read."""
    world.add(router())
    world.start()
    body = world.connect()
    world.finish_probes()
    whole = event("status_change", status="loaded").replace(b"\n", b"\r\n")
    for i in range(len(whole)):
        body.consumer.body_data(whole[i:i + 1])
    assert len(world.probes) == 2 and world.events.events_seen == 1


@pytest.mark.parametrize("garbage, why", [
    (b"data: {not json\n\n", "not JSON"),
    (b"data: [1, 2]\n\n", "not a JSON object"),
    (b'data: {"event": "status_change"}\n\n', "no string event and model"),
    (b'data: {"event": "status_change", "model": "a", "data": "loaded"}\n\n', "not an object"),
    (b'data: {"event": "status_change", "model": "a", "data": {"status": 3}}\n\n', "not a string"),
    (b"bogus: x\n\n", "unknown field"),
    (b"data: " + b"x" * 70_000, "without an event's end"),
])
def test_a_garbled_stream_is_dropped_with_a_warning_and_opened_again_later(
    world: World, garbage: bytes, why: str
) -> None:
    """A bad event (or an endless line): logged at warning, the stream aborted, the router no
    longer live (so probed every interval again), no read for it; the stream is opened again
    after the backoff and, if it misbehaves again, after twice that."""
    r = world.add(router())
    world.start()
    body = world.connect()
    world.finish_probes()
    body.consumer.body_data(garbage)
    assert body.stopped and not r.events_live
    assert len(world.probes) == 1
    [warning] = world.warnings()
    assert why in warning
    assert world.events.bad_events == 1
    world.clock.advance(0.99)
    assert len(world.attempts) == 1
    world.clock.advance(0.01)
    assert len(world.attempts) == 2
    again = world.connect()
    world.finish_probes()
    again.consumer.body_data(garbage)
    world.clock.advance(1.99)
    assert len(world.attempts) == 2
    world.clock.advance(0.01)
    assert len(world.attempts) == 3


def test_connecting_has_a_deadline_and_failures_back_off_up_to_the_maximum(world: World) -> None:
    """An attempt that gets no answer head within connect_timeout (5 s) is cancelled; the next
    comes 1 s later, then 2, 4, 8, 8 (backoff_max); a stream that then delivers an event and
    ends is opened again after backoff_min."""
    world.add(router())
    world.start()
    times = []
    for _ in range(5):
        _, d = world.attempts[-1]
        world.clock.advance(5.0)
        assert d.called  # cancelled by the deadline
        start = world.clock.seconds()
        count = len(world.attempts)
        while len(world.attempts) == count:
            world.clock.advance(0.5)
        times.append(world.clock.seconds() - start)
    assert times == [1.0, 2.0, 4.0, 8.0, 8.0]
    body = world.connect()
    world.finish_probes()
    body.consumer.body_data(event("status_change", status="loaded"))
    body.consumer.body_done(None)
    world.finish_probes()
    count = len(world.attempts)
    world.clock.advance(1.0)
    assert len(world.attempts) == count + 1


def test_a_silent_stream_is_dropped_after_the_idle_deadline(world: World) -> None:
    """No byte for idle_timeout (30 s): the stream is aborted and opened again; any byte
    (a keep-alive comment too) restarts the deadline."""
    r = world.add(router())
    world.start()
    body = world.connect()
    world.finish_probes()
    world.clock.advance(29.0)
    body.consumer.body_data(b": ping\n\n")
    world.clock.advance(29.0)
    assert not body.stopped and r.events_live
    world.clock.advance(1.0)
    assert body.stopped and not r.events_live
    world.clock.advance(1.0)
    assert len(world.attempts) == 2


def test_a_router_without_the_stream_is_asked_again_only_now_and_then(world: World) -> None:
    """/models/sse answered 404 (an older llama-server): info logged, polling only, asked
    again after backoff_max (8 s); a 500 backs off like a failure (1 s)."""
    r = world.add(router())
    world.start()
    world.connect(404)
    assert not r.events_live and world.warnings() == []
    world.clock.advance(7.9)
    assert len(world.attempts) == 1
    world.clock.advance(0.1)
    assert len(world.attempts) == 2
    world.events.backoff_max = 8.0
    follower = world.events.followers[r.id]
    follower.backoff = 1.0
    world.connect(500)
    world.clock.advance(1.0)
    assert len(world.attempts) == 3


def test_routers_that_leave_or_stop_being_routers_lose_their_stream(world: World) -> None:
    """Two routers, two streams; one removed from the pool and the other restarted as a
    single-model server: both streams are aborted within a sync interval; stopping the
    service cancels an attempt under way and leaves nothing scheduled."""
    a, b = world.add(router("http://10.0.0.1:8080")), world.add(router("http://10.0.0.2:8080"))
    single = world.add(Upstream("http://10.0.0.3:8080"))
    world.start()
    assert sorted(u.url for u, _ in world.attempts) == [a.url, b.url]
    bodies = [world.attempts[0][1], world.attempts[1][1]]
    first, second = FakeUpstreamBody(), FakeUpstreamBody()
    bodies[0].callback(first)
    bodies[1].callback(second)
    world.finish_probes()
    del world.pool.upstreams[a.id]
    b.role = "single"
    world.clock.advance(1.0)
    assert first.stopped and second.stopped and not b.events_live
    assert world.events.followers == {}
    single.role = "router"
    world.clock.advance(1.0)
    assert world.attempts[-1][0] is single and not world.attempts[-1][1].called


def test_parse_event_reads_llama_cpps_shapes() -> None:
    """data: lines joined, comments and event/id/retry fields ignored, no data is no event."""
    assert parse_event(b'event: x\nid: 3\ndata: {"model": "a",\ndata:  "event": "model_remove"}') == {
        "model": "a", "event": "model_remove"}
    assert parse_event(b": comment") is None
    with pytest.raises(BadEvent):
        parse_event(b"data: 1")


def test_sse_opener_asks_the_router_with_its_key() -> None:
    """GET /models/sse on the router's origin, Accept text/event-stream, its API key."""
    sent: list[tuple[Any, ...]] = []

    class Client:
        def send(self, *args: Any) -> Deferred[Any]:
            sent.append(args)
            return succeed(None)

    upstream = router("http://10.0.0.1:8080")
    upstream.api_key = "k"
    sse_opener(Client())(upstream)
    [(method, origin, target, headers, body)] = sent
    assert (method, origin, target, body) == (b"GET", b"http://10.0.0.1:8080", b"/models/sse", None)
    assert (b"Authorization", b"Bearer k") in headers and (b"Accept", b"text/event-stream") in headers


def test_only_the_routers_this_balancer_probes_are_followed() -> None:
    """With --state one balancer probes each router: the others do not open its stream (they
    hear of its changes through the store); when the probing moves, the stream moves too."""
    owned: set[str] = set()
    world = World(follows=lambda u: u.url in owned)
    a, b = world.add(router("http://10.0.0.1:8080")), world.add(router("http://10.0.0.2:8080"))
    owned.add(a.url)
    world.start()
    assert [u for u, _ in world.attempts] == [a]
    body = world.connect()
    world.finish_probes()
    owned.clear()
    owned.add(b.url)
    world.clock.advance(1.0)
    assert body.stopped and [u for u, _ in world.attempts] == [a, b]
    world.stop()
