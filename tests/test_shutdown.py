"""Stopping the balancer drains: no new work, buffered requests answered, running streams finish
(up to --shutdown-timeout, then cut); a reload applies the new configuration without a dropped stream."""

from __future__ import annotations

import pytest

from paddler.balancer.reload import Reloader
from paddler.balancer.service import BalancerService
from paddler.config import BalancerConfig, UpstreamSpec

from .proxy_harness import Harness


@pytest.fixture
def harness():
    h = Harness(max_buffered=5)
    yield h
    h.stop()


def balancer(h: Harness, timeout: float = 5.0) -> BalancerService:
    service = BalancerService(BalancerConfig(), h.clock, h.pool, h.proxy.stats, h.proxy, shutdown_timeout=timeout)
    service.startService()
    return service


def test_stop_lets_two_running_streams_finish_and_answers_the_rest_503(harness):
    """Two streams run on two upstreams; a third request waits in the buffer. Stopping answers
    the buffered one 503 at once, refuses new ones, and ends only when both streams have ended."""
    fakes = [harness.add_fake(f"u{i}", slots=1, hold=True) for i in range(2)]
    streams = [harness.open_stream(fake) for fake, _ in fakes]
    buffered = harness.post("/completion", {"prompt": "wait"})
    harness.flush()
    assert harness.pool.requests_buffered == 1
    service = balancer(harness)
    stopped = service.stopService()
    response = harness.result(buffered)
    assert response.code == 503 and "shutting down" in harness.json(response)["error"]["message"]
    late = harness.result(harness.post("/completion", {"prompt": "late"}))
    assert late.code == 503 and late.headers.getRawHeaders(b"retry-after") == [b"1"]
    assert not stopped.called
    for index, (held, _, chunks) in enumerate(streams):
        held.send(b"data: more\n\n")
        held.finish(b"data: [DONE]\n\n")
        body = harness.result(chunks.done)
        assert body.endswith(b"data: [DONE]\n\n")
        if index == 0:
            assert not stopped.called
    harness.result(stopped)
    assert harness.proxy.active == set()


def test_streams_still_running_at_the_shutdown_timeout_are_cut(harness):
    fake, upstream = harness.add_fake("u", slots=2, hold=True)
    streams = [harness.open_stream(fake) for _ in range(2)]
    for _, _, chunks in streams:
        chunks.done.addErrback(lambda _: None)
    service = balancer(harness, timeout=5.0)
    stopped = service.stopService()
    harness.run(4.9)
    assert not stopped.called and len(harness.proxy.active) == 2
    harness.run(0.2)
    harness.result(stopped)
    assert upstream.in_flight == 0
    assert all(held.gone for held in fake.held)


def test_stop_with_nothing_running_is_immediate(harness):
    harness.add_fake("u")
    service = balancer(harness)
    stopped = service.stopService()
    harness.result(stopped)  # no clock time passed
    assert harness.clock.getDelayedCalls() == []


def test_reload_adds_and_drains_upstreams_and_applies_limits_without_cutting_a_stream(harness):
    """Two static upstreams a, b; the new configuration keeps a, drops b (which runs a stream),
    adds c, and changes policy and buffer limits: b drains and leaves when its stream ends."""
    fake_a, a = harness.add_fake("a", slots=2, hold=True)
    fake_b, b = harness.add_fake("b", slots=4, hold=True)  # the most idle slots: the stream goes there
    a.source = b.source = "static"
    held, _, chunks = harness.open_stream(fake_b)
    assert b.in_flight == 1
    service = balancer(harness)
    service.config = BalancerConfig(upstreams=[UpstreamSpec(a.url, "a"), UpstreamSpec(b.url, "b")])
    new = BalancerConfig(
        upstreams=[UpstreamSpec(a.url, "a"), UpstreamSpec("http://127.0.0.1:9", "c")],
        policy="least-connections",
        max_buffered_requests=7,
        listen="tcp:9999",
    )
    changes = Reloader(service, lambda: new, prober=_Prober()).reload()
    assert any("upstream c (http://127.0.0.1:9) added" in line for line in changes)
    assert any("upstream b" in line and "draining" in line for line in changes)
    assert "policy is now least-connections" in changes and "max_buffered_requests is now 7" in changes
    assert any(line.startswith("listen changed") and "next restart" in line for line in changes)
    assert harness.pool.chooser.name == "least-connections" and harness.pool.max_buffered == 7
    assert service.config.listen == BalancerConfig().listen  # not applied
    assert b.draining and b.id in harness.pool.upstreams
    held.send(b"data: still here\n\n")
    held.finish()
    assert b"still here" in harness.result(chunks.done)
    assert b.id not in harness.pool.upstreams
    again = Reloader(service, lambda: new, prober=_Prober()).reload()
    assert again == ["listen changed to tcp:9999; it takes effect at the next restart"]
    service.stopService()


def test_a_reload_that_does_not_parse_changes_nothing(harness):
    from paddler.settings import ConfigError

    service = balancer(harness)

    def broken() -> BalancerConfig:
        raise ConfigError("p.toml: max_retries must be a whole number")

    assert Reloader(service, broken, prober=_Prober()).reload() == []
    assert service.config == BalancerConfig() and harness.pool.max_buffered == 5


class _Prober:
    timeout = 2.0
    mode = "slots"
    unhealthy_after = 2
    api_key = None
