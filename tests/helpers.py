"""Shared test helpers: fake upstreams and small builders."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from paddler.interfaces import IUpstreamBody

from paddler.routing.policies import MostIdleSlotsChooser
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import FailureSeen, SlotsSeen, Upstream


def healthy_upstream(
    url: str, total: int = 4, processing: int = 0, models: tuple[str, ...] = (), clock: Clock | None = None
) -> Upstream:
    """An upstream seen healthy with C{total} slots (by the test: no probe or report time is set)."""
    upstream = Upstream(url, clock=clock)
    upstream.record(SlotsSeen(total, processing, upstream.probe_mark(), source="test", models=models), 0.0)
    return upstream


def mark_healthy(upstream: Upstream, total: int | None = None) -> None:
    """Drive C{upstream} (outside a pool) to healthy, keeping or setting its slot count."""
    slots = upstream.slots_total if total is None else total
    upstream.record(SlotsSeen(slots, upstream.external_processing, upstream.probe_mark(), source="test"), 0.0)


def mark_unreachable(upstream: Upstream, reason: str = "connection refused") -> None:
    """Drive C{upstream} (outside a pool) to unreachable."""
    upstream.record(FailureSeen(reason, source="test"), 0.0)


def make_pool(clock: Clock, max_buffered: int = 30, timeout: float = 30.0, chooser=None) -> UpstreamPool:
    return UpstreamPool(clock, chooser or MostIdleSlotsChooser(), max_buffered, timeout)


class MemoryUpstreams:
    """
    The production L{paddler.upstream.client.UpstreamClient} over a
    L{tests.memory_network.MemoryNetwork}, with resources served at URLs
    (a name in a URL resolves to an address of its own). The network is
    also the clock; bytes move at L{flush}.
    """

    def __init__(self, **client_options: Any) -> None:
        from paddler.upstream.client import UpstreamClient

        from .memory_network import MemoryNetwork

        self.net = MemoryNetwork()
        self.clock = self.net
        self.client = UpstreamClient(self.net, **client_options)
        self._hosts = 0

    def serve(self, resource: Any, url: str) -> None:
        """Answer at C{url} (C{http://host:port}) with C{resource} (an C{IResource}) behind a real C{Site}."""
        import ipaddress

        from twisted.web.server import Site

        host, port = url.split("//", 1)[1].rsplit(":", 1)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self._hosts += 1
            address = f"10.9.0.{self._hosts}"
            self.net.nameResolver.names[host] = address  # type: ignore[attr-defined]
            host = address
        self.net.listenTCP(int(port), Site(resource, reactor=self.net), interface=host)

    def flush(self) -> None:
        self.net.flush()


@implementer(IBodyProducer)
class BytesProducer:
    """A small request body already in memory, for treq clients on an in-memory network
    (treq's default body producer runs on the global reactor's cooperator)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Any:
        from twisted.internet.defer import succeed

        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IUpstreamBody)
class FakeUpstreamBody:
    """An upstream answer's body as a L{paddler.balancer.relay.Relay} takes it: the test calls
    C{consumer.body_data} / C{body_done} itself and reads C{paused} and C{stopped}."""

    code = 200
    phrase = b"OK"
    headers: list[tuple[bytes, bytes]] = []
    framing = "chunked"
    paused = stopped = False

    def __init__(self) -> None:
        self.consumer: Any = None

    def deliver(self, consumer: Any, raw: bool = False) -> None:
        self.consumer = consumer

    def take_body(self) -> bytes | None:
        return None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.stopped = True

    def tail(self) -> bytes:
        return b""
