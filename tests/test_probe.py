"""Probes on the production upstream client: /slots parsing, fallbacks, loading, failures, the probe schedule."""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from zope.interface.verify import verifyObject

from paddler.interfaces import IUpstreamProber
from paddler.fleet.probe import HTTPProber, ProbeService
from paddler.llamacpp.errors import ProbeError
from paddler.llamacpp.metrics import metric_value as parse_metric
from paddler.llamacpp.slots import count_processing
from paddler.fleet.upstream import Upstream, UpstreamState

from .fake_llama import FakeLlama
from .helpers import MemoryUpstreams, make_pool, mark_healthy


def setup(fake: FakeLlama, mode: str = "slots", unhealthy_after: int = 2, api_key=None):
    """A prober on the production client (as paddler.tap builds it), C{fake} serving at http://llama:8080."""
    upstreams = MemoryUpstreams(connect_timeout=2, max_idle_per_host=1)
    upstreams.serve(fake, "http://llama:8080")
    clock = upstreams.clock
    pool = make_pool(clock)
    prober = HTTPProber(
        upstreams.client, clock, pool, timeout=2, unhealthy_after=unhealthy_after, mode=mode, api_key=api_key
    )
    upstream = pool.add(Upstream("http://llama:8080", name="llama", clock=clock))
    return clock, pool, upstreams, prober, upstream


def run(upstreams, d):
    upstreams.flush()
    results = []
    d.addBoth(results.append)
    assert results, "probe did not finish"
    return results[0]


def test_prober_provides_the_interface():
    _, _, _, prober, _ = setup(FakeLlama())
    assert verifyObject(IUpstreamProber, prober)


def test_slots_probe_reads_idle_and_busy_slots_and_the_model():
    fake = FakeLlama(slots=4, model="qwen.gguf")
    fake.busy = 3
    clock, pool, upstreams, prober, upstream = setup(fake)
    assert run(upstreams, prober.probe(upstream)) is True  # a first reading is news
    assert upstream.state is UpstreamState.HEALTHY
    assert (upstream.slots_total, upstream.slots_processing, upstream.slots_idle) == (4, 3, 1)
    assert upstream.models == ("qwen.gguf",)
    assert upstream.last_probe_at == clock.seconds()
    assert [s["id"] for s in upstream.raw_slots] == [0, 1, 2, 3]


def test_old_state_form_of_slots_is_understood():
    assert count_processing([{"id": 0, "state": 0}, {"id": 1, "state": 1}]) == 1
    assert count_processing([{"is_processing": True}, {"is_processing": False}]) == 1
    with pytest.raises(ProbeError):
        count_processing([{"id": 0}])


def test_metrics_parsing():
    text = "# HELP x\nllamacpp:requests_processing 3\nllamacpp:requests_deferred 1\n"
    assert parse_metric(text, "llamacpp:requests_processing") == 3
    assert parse_metric(text, "llamacpp:missing") is None


def test_slots_disabled_falls_back_to_props_never_metrics():
    """/props for the slot count; /metrics is never scraped (its windows belong to its owner)."""
    fake = FakeLlama(slots=2)
    fake.slots_status = 501
    fake.busy = 1
    _, _, upstreams, prober, upstream = setup(fake)
    run(upstreams, prober.probe(upstream))
    assert upstream.probe_method == "props"
    assert upstream.state is UpstreamState.HEALTHY
    assert (upstream.slots_total, upstream.slots_processing) == (2, 0)
    fake.seen.clear()
    run(upstreams, prober.probe(upstream))
    assert [uri for _, uri, _, _ in fake.seen] == [b"/props"]


def test_health_mode_never_asks_slots_so_idle_servers_can_sleep():
    fake = FakeLlama(slots=3)
    _, _, upstreams, prober, upstream = setup(fake, mode="health")
    run(upstreams, prober.probe(upstream))
    assert [uri for _, uri, _, _ in fake.seen] == [b"/health", b"/props"]
    assert upstream.state is UpstreamState.HEALTHY and upstream.slots_total == 3


def test_loading_model_is_loading_not_a_failure():
    fake = FakeLlama()
    fake.slots_status = 503
    _, _, upstreams, prober, upstream = setup(fake)
    for _ in range(3):
        run(upstreams, prober.probe(upstream))
    assert upstream.state is UpstreamState.LOADING
    assert upstream.consecutive_failures == 0 and not upstream.accepts_requests


def test_unreachable_only_after_consecutive_failures_and_one_log_per_change():
    fake = FakeLlama()
    fake.slots_status = 500
    _, _, upstreams, prober, upstream = setup(fake, unhealthy_after=2)
    mark_healthy(upstream)
    with capturedLogs() as events:
        run(upstreams, prober.probe(upstream))
        assert upstream.state is UpstreamState.HEALTHY and upstream.consecutive_failures == 1
        run(upstreams, prober.probe(upstream))
        run(upstreams, prober.probe(upstream))
    assert upstream.state is UpstreamState.UNREACHABLE
    assert "/slots answered 500" in upstream.last_error
    changes = [e for e in events if e.get("state") == "unreachable"]
    assert len(changes) == 1
    fake.slots_status = 200
    run(upstreams, prober.probe(upstream))
    assert upstream.state is UpstreamState.HEALTHY and upstream.consecutive_failures == 0


def test_api_key_is_sent_as_bearer_on_probes():
    fake = FakeLlama()
    _, _, upstreams, prober, upstream = setup(fake, api_key="k1")
    run(upstreams, prober.probe(upstream))
    headers = {k.lower(): v for k, v in fake.seen[0][2].items()}
    assert headers[b"authorization"] == [b"Bearer k1"]
    upstream.api_key = "own"
    run(upstreams, prober.probe(upstream))
    headers = {k.lower(): v for k, v in fake.seen[-1][2].items()}
    assert headers[b"authorization"] == [b"Bearer own"]


def test_probe_that_never_answers_fails_at_its_deadline():
    class Silent(Resource):
        isLeaf = True

        def render(self, request):
            return NOT_DONE_YET

    upstreams = MemoryUpstreams(connect_timeout=2, max_idle_per_host=1)
    upstreams.serve(Silent(), "http://llama:8080")
    clock = upstreams.net
    pool = make_pool(clock)
    upstream = pool.add(Upstream("http://llama:8080", clock=clock))
    prober = HTTPProber(upstreams.client, clock, pool, timeout=2, unhealthy_after=1)
    results = []
    prober.probe(upstream).addBoth(results.append)
    clock.run_for(1.9)
    assert results == []
    clock.run_for(0.1)
    assert results == [None]
    assert upstream.state is UpstreamState.UNREACHABLE and "2 s" in upstream.last_error
    assert clock.getDelayedCalls() == []


@implementer(IUpstreamProber)
class RecordingProber:
    """A fake prober whose probes finish when the test says."""

    def __init__(self):
        self.calls: list[tuple[Upstream, Deferred]] = []

    def probe(self, upstream):
        d = Deferred()
        self.calls.append((upstream, d))
        return d


def test_recording_prober_fake_provides_the_interface():
    assert verifyObject(IUpstreamProber, RecordingProber())


def test_probe_loops_never_overlap_and_follow_the_pool():
    clock = Clock()
    pool = make_pool(clock)
    prober = RecordingProber()
    service = ProbeService(pool, prober, clock, interval=1.0)
    a = pool.add(Upstream("http://a:1", clock=clock))
    service.startService()
    assert [u for u, _ in prober.calls] == [a]
    clock.advance(5)  # the first probe is still running: no second one
    assert len(prober.calls) == 1
    prober.calls[0][1].callback(None)
    clock.advance(1)
    assert len(prober.calls) == 2
    b = pool.add(Upstream("http://b:1", clock=clock))
    assert prober.calls[-1][0] is b
    agent_fed = pool.add(Upstream("http://c:1", source="agent", clock=clock))
    assert all(u is not agent_fed for u, _ in prober.calls)
    pool.remove(b.id)
    assert prober.calls[-1][1].called  # b's running probe was cancelled
    prober.calls[1][1].callback(None)
    stopped = []
    service.stopService().addBoth(stopped.append)
    assert stopped and clock.getDelayedCalls() == []


@pytest.mark.allow_logged_errors
def test_probe_loop_survives_an_unexpected_error():
    clock = Clock()
    pool = make_pool(clock)

    @implementer(IUpstreamProber)
    class Broken:
        calls = 0

        def probe(self, upstream):
            Broken.calls += 1
            if Broken.calls == 1:
                raise RuntimeError("boom")
            return succeed(None)

    service = ProbeService(pool, Broken(), clock, interval=1.0)
    pool.add(Upstream("http://a:1", clock=clock))
    with capturedLogs() as events:
        service.startService()
        clock.advance(1)
        clock.advance(1)
    assert Broken.calls == 3
    assert any("failed unexpectedly" in e.get("log_format", "") for e in events)
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_health_mode_is_shown_as_the_probe_method():
    fake = FakeLlama(slots=2)
    _, _, upstreams, prober, upstream = setup(fake, mode="health")
    run(upstreams, prober.probe(upstream))
    assert upstream.probe_method == "health"
