"""ProbeService.probe_now: what a registration waits for before it answers."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from paddler.interfaces import IUpstreamProber
from paddler.fleet.probe import ProbeService
from paddler.fleet.upstream import Upstream

from .helpers import make_pool


@implementer(IUpstreamProber)
class HeldProber:
    """Probes finish when the test fires them."""

    def __init__(self) -> None:
        self.calls: list[Deferred[None]] = []

    def probe(self, upstream):
        d: Deferred[None] = Deferred()
        self.calls.append(d)
        return d


def test_probe_now_joins_the_running_probe_and_fires_when_it_ends():
    """A new upstream is probed at once by its loop; probe_now waits for that probe, not a second."""
    clock = Clock()
    pool = make_pool(clock)
    prober = HeldProber()
    service = ProbeService(pool, prober, clock)
    service.startService()
    upstream = pool.add(Upstream("http://a:1", clock=clock))
    assert len(prober.calls) == 1
    done = []
    service.probe_now(upstream).addBoth(done.append)
    assert done == [] and len(prober.calls) == 1
    prober.calls[0].callback(None)
    assert done == [None]
    service.stopService()


def test_cancelling_probe_now_leaves_the_probe_running():
    """A client that stops waiting for its registration does not cancel the probe."""
    clock = Clock()
    pool = make_pool(clock)
    prober = HeldProber()
    service = ProbeService(pool, prober, clock)
    service.startService()
    upstream = pool.add(Upstream("http://a:1", clock=clock))
    waiting = service.probe_now(upstream)
    waiting.addErrback(lambda f: None)
    waiting.cancel()
    assert not prober.calls[0].called
    prober.calls[0].callback(None)
    service.stopService()
    assert clock.getDelayedCalls() == []
