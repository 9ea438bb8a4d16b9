"""A balancer proxy and fake upstreams on real loopback sockets, for tests."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, deferLater
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.server import Site
from treq.client import HTTPClient

from paddler.routing.policies import MostIdleSlotsChooser
from paddler.fleet.pool import UpstreamPool
from paddler.balancer.proxy import ProxyConfig, ProxyResource
from paddler.balancer.relay import BytesProducer
from paddler.web.request import bounded_request_factory
from paddler.fleet.upstream import SlotsSeen, Upstream

from .fake_llama import FakeLlama


class Chunks(Protocol):
    """Collects a response body chunk by chunk; C{arrived} fires per chunk."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()
        self._waiting: list[Deferred[bytes]] = []

    def next_chunk(self) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self._waiting.append(d)
        return d

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.chunks))
        else:
            self.done.errback(reason)


StringProducer = BytesProducer  # a small in-memory request body for the raw Agent


class Harness:
    """Fake upstreams + pool + proxy listening on 127.0.0.1, and a client."""

    def __init__(self, config: ProxyConfig | None = None, max_buffered: int = 30, buffer_timeout: float = 30.0) -> None:
        self.clock = Clock()
        self.pool = UpstreamPool(self.clock, MostIdleSlotsChooser(), max_buffered, buffer_timeout)
        self.upstream_connections = HTTPConnectionPool(reactor, persistent=True)
        self.client_connections = HTTPConnectionPool(reactor, persistent=False)
        self.proxy = ProxyResource(
            self.pool, Agent(reactor, pool=self.upstream_connections), self.clock, config or ProxyConfig()
        )
        factory = bounded_request_factory(self.proxy.config.max_request_body)
        self.port = reactor.listenTCP(0, Site(self.proxy, requestFactory=factory), interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.agent = Agent(reactor, pool=self.client_connections)
        self.client = HTTPClient(self.agent)
        self._ports = [self.port]
        self.fakes: list[FakeLlama] = []

    def add_fake(self, name: str = "fake", slots: int = 4, hold: bool = False, model: str = "fake.gguf") -> tuple[FakeLlama, Upstream]:
        fake = FakeLlama(name, slots=slots, hold=hold, model=model)
        port = reactor.listenTCP(0, Site(fake), interface="127.0.0.1")
        self._ports.append(port)
        upstream = Upstream(f"http://127.0.0.1:{port.getHost().port}", name=name, clock=self.clock)
        upstream.record(SlotsSeen(slots, 0, upstream.probe_mark(), models=(model,)), 0.0)
        self.pool.add(upstream)
        self.fakes.append(fake)
        return fake, upstream

    def add_dead(self, name: str = "dead", slots: int = 8) -> Upstream:
        """An upstream whose port refuses connections (listened, then closed)."""
        with socket.socket() as sock:  # bound, never listening: connections are refused
            sock.bind(("127.0.0.1", 0))
            number = sock.getsockname()[1]
        upstream = Upstream(f"http://127.0.0.1:{number}", name=name, clock=self.clock)
        upstream.record(SlotsSeen(slots, 0, upstream.probe_mark()), 0.0)
        self.pool.add(upstream)
        return upstream

    def post(self, path: str, payload: Any, **kwargs: Any) -> Deferred[Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.client.post(self.url + path, data=body, **kwargs)

    async def open_stream(self, fake: FakeLlama) -> tuple[Any, Any, Chunks]:
        """POST a streaming completion held by C{fake}; return (held, response, chunks)
        once the client has received the first event."""
        response_d = self.post("/completion", {"prompt": "hi", "stream": True})
        held = await fake.next_held()
        held.start_stream()
        held.send(b"data: {}\n\n")
        response = await response_d
        chunks = Chunks()
        first = chunks.next_chunk()
        response.deliverBody(chunks)
        await first
        return held, response, chunks

    def stop(self) -> None:
        for held in [h for f in self.fakes for h in f.held]:
            if not held.request.finished and not held.gone:
                held.request.finish()
        self.pool.stop()
        for port in self._ports:
            pytest_twisted.blockon(port.stopListening())
        pytest_twisted.blockon(self.upstream_connections.closeCachedConnections())
        pytest_twisted.blockon(self.client_connections.closeCachedConnections())
        for call in self.clock.getDelayedCalls():
            call.cancel()


def make_harness(request: Any, **kwargs: Any) -> Harness:
    """A L{Harness} stopped at the end of the test."""
    h = Harness(**kwargs)
    request.addfinalizer(h.stop)
    return h


async def turn(n: int = 3) -> None:
    """Let the reactor run C{n} iterations."""
    for _ in range(n):
        await deferLater(reactor, 0, lambda: None)


async def until(predicate: Any, turns: int = 200) -> None:
    """Wait (up to about C{turns} × 5 ms) until C{predicate()} is true."""
    for _ in range(turns):
        if predicate():
            return
        await deferLater(reactor, 0.005, lambda: None)
    raise AssertionError("condition not reached")
