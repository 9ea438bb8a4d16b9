"""The balancer proxy and fake llama-servers on one in-memory network, for tests.

The client (treq over a real C{Agent}) talks HTTP to the proxy's real C{Site}
(L{paddler.tap.proxy_site}); the proxy's L{UpstreamClient} (built as
L{paddler.tap.makeBalancerService} builds it, so these tests run the path
production takes) talks HTTP to L{FakeLlama} sites. All of it runs
on a L{MemoryNetwork}, which is also the one clock every timeout runs on:
upstream deadline, idle deadline, buffer timeout, shutdown timeout,
keep-alive. Bytes move only when the test flushes (L{Harness.flush}, or
L{Harness.result}, which flushes first), so a test reads top to bottom and
cannot hang: a Deferred that has not fired after a flush never will.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.server import Site
from treq.client import HTTPClient

from paddler.balancer.proxy import ProxyConfig, ProxyResource
from .helpers import BytesProducer
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.routing.policies import MostIdleSlotsChooser
from paddler.tap import proxy_site
from paddler.upstream.clients import CACHED_CONNECTION_TIMEOUT
from paddler.upstream.client import UpstreamClient

from .fake_llama import FakeLlama, HeldRequest
from .memory_network import BUFFER_SIZE, Connection, MemoryNetwork, RawClient, connect_raw

T = TypeVar("T")

PROXY_HOST, PROXY_PORT = "127.0.0.1", 8080


class Chunks(Protocol):
    """Collects a response body chunk by chunk; C{done} fires with the whole body (or the failure)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if reason is None or reason.check(ResponseDone):
            self.done.callback(self.body)
        else:
            self.done.errback(reason)


StringProducer = BytesProducer  # a small in-memory request body for the raw Agent


class Harness:
    """Fake upstreams + pool + proxy on a L{MemoryNetwork}, and an HTTP client.

    @ivar net: the network, which is also C{clock}.
    @ivar agent: the client's C{Agent} (one connection per request); C{client}
        is treq over it.
    """

    def __init__(
        self,
        config: ProxyConfig | None = None,
        max_buffered: int = 30,
        buffer_timeout: float = 30.0,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self.net = MemoryNetwork(buffer_size=buffer_size)
        self.clock = self.net
        self.pool = UpstreamPool(self.clock, MostIdleSlotsChooser(), max_buffered, buffer_timeout)
        config = config or ProxyConfig()
        # The proxy's upstream client, as paddler.tap.makeBalancerService builds it.
        self.upstream_client = UpstreamClient(
            self.net,
            connect_timeout=min(10.0, config.upstream_timeout),
            max_idle_per_host=64,
            idle_timeout=CACHED_CONNECTION_TIMEOUT,
        )
        self.proxy = ProxyResource(self.pool, self.upstream_client, self.clock, config)
        self.site = proxy_site(self.proxy, self.net)
        self._ports = [self.net.listenTCP(PROXY_PORT, self.site, interface=PROXY_HOST)]
        self.url = f"http://{PROXY_HOST}:{PROXY_PORT}"
        self.client_connections = HTTPConnectionPool(self.net, persistent=False)
        self.agent = Agent(self.net, pool=self.client_connections)
        # treq's default body producer runs on the global reactor's cooperator
        self.client = HTTPClient(self.agent, data_to_body_producer=BytesProducer)
        self.fakes: list[FakeLlama] = []
        self._hosts = 0

    # -- the fleet ------------------------------------------------------------

    def _next_url(self) -> tuple[str, str]:
        self._hosts += 1
        host = f"10.0.0.{self._hosts}"
        return host, f"http://{host}:8080"

    def add_upstream(self, url: str, name: str, slots: int, models: tuple[str, ...] = ()) -> Upstream:
        """An upstream at C{url} in the pool, seen healthy with C{slots} idle slots."""
        upstream = Upstream(url, name=name, clock=self.clock)
        upstream.record(SlotsSeen(slots, 0, upstream.probe_mark(), models=models), 0.0)
        self.pool.add(upstream)
        return upstream

    def add_resource(self, resource: Any, name: str, slots: int = 8) -> Upstream:
        """Serve C{resource} as an upstream (any C{IResource}: a fake with odd answers)."""
        host, url = self._next_url()
        self._ports.append(self.net.listenTCP(8080, Site(resource, reactor=self.net), interface=host))
        return self.add_upstream(url, name, slots)

    def add_fake(self, name: str = "fake", slots: int = 4, hold: bool = False, model: str = "fake.gguf") -> tuple[FakeLlama, Upstream]:
        """A L{FakeLlama} upstream; with C{hold}, slot-taking requests wait for the test."""
        fake = FakeLlama(name, slots=slots, hold=hold, model=model)
        self.fakes.append(fake)
        return fake, self.add_resource(fake, name, slots)

    def add_dead(self, name: str = "dead", slots: int = 8) -> Upstream:
        """An upstream where nothing listens: every connection is refused."""
        _, url = self._next_url()
        return self.add_upstream(url, name, slots)

    def add_unreachable(self, name: str = "unreachable", slots: int = 8) -> Upstream:
        """An upstream whose host never answers: connecting to it stays pending until its connect timeout."""
        host, url = self._next_url()
        self.net.unreachable.add(host)
        return self.add_upstream(url, name, slots)

    # -- driving it -------------------------------------------------------------

    def flush(self) -> None:
        """Move every byte that can move and run what is due now."""
        self.net.flush()

    def run(self, seconds: float) -> None:
        """Let C{seconds} of clock time pass, each timer firing at its time with the bytes moved in between."""
        self.net.run_for(seconds)

    def result(self, d: Deferred[T]) -> T:
        """Flush, then the result of C{d}, which must have fired (its failure is raised)."""
        self.flush()
        box: list[Any] = []
        d.addBoth(box.append)
        if not box:
            raise AssertionError(f"{d!r} has not fired")
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def failure(self, d: Deferred[Any]) -> Failure:
        """Flush, then the failure C{d} fired with (it must have failed)."""
        self.flush()
        box: list[Any] = []
        d.addBoth(box.append)
        assert box, f"{d!r} has not fired"
        assert isinstance(box[0], Failure), f"{d!r} succeeded with {box[0]!r}"
        return box[0]

    def pending(self, d: Deferred[Any]) -> None:
        """Flush and check that C{d} has not fired yet."""
        self.flush()
        box: list[Any] = []

        def peek(result: Any) -> Any:
            box.append(result)
            return result

        d.addBoth(peek)
        assert not box, f"{d!r} fired with {box[0]!r}"

    def post(self, path: str, payload: Any, **kwargs: Any) -> Deferred[Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.client.post(self.url + path, data=body, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Deferred[Any]:
        return self.client.get(self.url + path, **kwargs)

    def raw_post(self, path: str, body: bytes = b"{}") -> Deferred[Any]:
        """A POST through the bare C{Agent}: cancelling the Deferred drops the client's connection."""
        return self.agent.request(b"POST", (self.url + path).encode(), None, StringProducer(body))

    def json(self, response: Any) -> Any:
        return self.result(response.json())

    def content(self, response: Any) -> bytes:
        return self.result(response.content())

    def held(self, fake: FakeLlama) -> HeldRequest:
        """Flush; the next request C{fake} holds (one must have arrived)."""
        return self.result(fake.next_held())

    def open_stream(self, fake: FakeLlama) -> tuple[HeldRequest, Any, Chunks]:
        """POST a streaming completion held by C{fake}; return (held, response, chunks)
        once the client has received the first event."""
        response_d = self.post("/completion", {"prompt": "hi", "stream": True})
        held = self.held(fake)
        held.start_stream()
        held.send(b"data: {}\n\n")
        response = self.result(response_d)
        chunks = Chunks()
        response.deliverBody(chunks)
        self.flush()
        assert chunks.chunks, "the first event did not reach the client"
        return held, response, chunks

    def raw(self, data: bytes) -> RawClient:
        """A raw client connection to the proxy that sent C{data} (flushed)."""
        client = connect_raw(self.net, PROXY_HOST, PROXY_PORT)
        self.flush()
        assert client.transport is not None, "the proxy refused the connection"
        client.transport.write(data)
        self.flush()
        return client

    def client_connections_to_proxy(self) -> list[Connection]:
        """Every connection a client opened to the proxy, closed ones included."""
        return self.net.connections_to(PROXY_HOST, PROXY_PORT)

    def connections_to(self, upstream: Upstream) -> list[Connection]:
        """Every connection the proxy opened to C{upstream}, closed ones included."""
        host, port = upstream.url.split("//", 1)[1].split(":")
        return self.net.connections_to(host, int(port))

    def stop(self) -> None:
        for held in [h for f in self.fakes for h in f.held]:
            if not held.request.finished and not held.gone:
                held.request.finish()
        self.pool.stop()
        self.flush()
        closing = [self.upstream_client.close(), self.client_connections.closeCachedConnections()]
        for port in self._ports:
            closing.append(port.stopListening())
        self.flush()
        for d in closing:
            d.addErrback(lambda _: None)
        for call in self.clock.getDelayedCalls():
            call.cancel()


def make_harness(request: Any, **kwargs: Any) -> Harness:
    """A L{Harness} stopped at the end of the test."""
    h = Harness(**kwargs)
    request.addfinalizer(h.stop)
    return h
