"""In-memory cost of relaying one SSE chunk and of one small request, without sockets or a reactor.

The real ProxyResource behind a real Twisted HTTP server channel (on a
StringTransport), its UpstreamClient connected to in-memory transports:
what is measured is the Python work per chunk (per request) of the relay
path itself, free of syscalls and of the machine's scheduling noise, so
that variants can be compared on a shared machine:

- ``passthrough``: the default relay (chunks forwarded as received);
- ``decode``: ``--no-relay-passthrough`` (paddler's client decodes, Twisted's
  server re-chunks);
- ``agent``: the relay as it was before the upstream client (Twisted's
  ``HTTP11ClientProtocol`` decoding, Twisted's server re-chunking), through
  L{_AgentClient}, an adapter kept here only as this baseline (paddler
  itself has one upstream path, L{UpstreamClient}).

    python -m bench.relay_micro [--chunks N] [--requests N]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from bench.common import log, save
from paddler.balancer.proxy import ProxyConfig, ProxyResource
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.routing.policies import MostIdleSlotsChooser
from paddler.server.request import bounded_request_factory
from paddler.upstream.client import UpstreamClient

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b'data: {"index":0,"content":" fox","tokens":[1234],"stop":false,"id_slot":-1}\n\n'
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
ANSWER_BODY = json.dumps({"id": "cmpl-bench", "object": "text_completion", "model": "bench",
                          "choices": [{"index": 0, "text": " the quick brown fox", "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 8, "completion_tokens": 4}}).encode()
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
          b"Connection: keep-alive\r\n\r\n%s" % (len(ANSWER_BODY), ANSWER_BODY))


class _Transport(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.9", 4000))

    def abortConnection(self) -> None:
        self.loseConnection()


class _Connections:
    """An endpoint factory whose connections are in-memory transports (kept for the bench to feed)."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, _Transport]] = []

    def endpoint_for(self, scheme: bytes, host: bytes, port: int) -> Any:
        return self

    def connect(self, factory: Any) -> Any:
        protocol = factory.buildProtocol(None)
        transport = _Transport()
        protocol.makeConnection(transport)
        self.made.append((protocol, transport))
        return succeed(protocol)


class _AgentReactor:
    """Just enough of a reactor for Twisted's Agent to connect to in-memory transports."""

    def __init__(self, clock: Clock, connections: _Connections) -> None:
        self._clock = clock
        self._connections = connections

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


class _AgentBody(Protocol):
    """A Twisted C{IResponse} as the L{paddler.interfaces.IUpstreamBody} the relay takes (bench baseline only)."""

    framing = "decoded"

    def __init__(self, response: Any) -> None:
        self._response = response
        self.code, self.phrase = response.code, response.phrase
        self.headers = [(n, v) for n, values in response.headers.getAllRawHeaders() for v in values]
        self._consumer: Any = None
        self._tail = b""

    def take_body(self) -> None:
        return None

    def deliver(self, consumer: Any, raw: bool = False) -> None:
        self._consumer = consumer
        self._response.deliverBody(self)

    def dataReceived(self, data: bytes) -> None:
        self._tail = (self._tail + data)[-8192:]
        self._consumer.body_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        ended = reason is None or reason.check(ResponseDone, PotentialDataLoss)
        self._consumer.body_done(None if ended else reason)

    def pause(self) -> None:
        self.transport.pauseProducing()

    def resume(self) -> None:
        self.transport.resumeProducing()

    def abort(self) -> None:
        self.transport.stopProducing()

    def tail(self) -> bytes:
        return self._tail


class _AgentClient:
    """An C{IAgent} as the proxy's upstream client: bodies decoded by Twisted (bench baseline only)."""

    def __init__(self, agent: Any) -> None:
        self._agent = agent

    def send(self, method: bytes, origin: bytes, target: bytes, headers: Any, body: bytes | None) -> Any:
        twisted_headers = Headers()
        for name, value in headers:
            twisted_headers.addRawHeader(name, value)
        producer = _Bytes(body) if body is not None else None
        return self._agent.request(method, origin + target, twisted_headers, producer).addCallback(_AgentBody)

    def close(self) -> Any:
        return succeed(None)


class _Bytes:
    """A request body in memory, written at once."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Any:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _rig(variant: str) -> tuple[Any, _Connections, Any]:
    clock = Clock()
    pool = UpstreamPool(clock, MostIdleSlotsChooser(), 30, 30.0)
    upstream = Upstream("http://10.0.0.1:8080", name="u", clock=clock)
    upstream.record(SlotsSeen(100000, 0, upstream.probe_mark(), models=("bench",)), 0.0)
    pool.add(upstream)
    connections = _Connections()
    client: Any
    if variant == "agent":
        from twisted.web.iweb import IAgentEndpointFactory
        from zope.interface import implementer

        @implementer(IAgentEndpointFactory)
        class Endpoints:
            def endpointForURI(self, uri: Any) -> Any:
                return connections

        agent = Agent.usingEndpointFactory(clock, Endpoints(), pool=HTTPConnectionPool(clock, persistent=True))
        client = _AgentClient(agent)
    else:
        client = UpstreamClient(None, connections, clock=clock)  # type: ignore[arg-type]
    config = ProxyConfig(relay_passthrough=variant == "passthrough", idle_timeout=1e9)
    proxy = ProxyResource(pool, client, clock, config)
    site = Site(proxy, requestFactory=bounded_request_factory(1 << 20), timeout=None,
                parsePOSTFormSubmission=False)
    channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 4000))
    transport = _Transport()
    channel.makeConnection(transport)
    return channel, connections, transport


def _post(channel: Any, stream: bool) -> None:
    body = json.dumps({"model": "bench", "prompt": "The quick brown fox", "max_tokens": 4, "stream": stream}).encode()
    channel.dataReceived(
        b"POST /v1/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


def per_chunk(variant: str, chunks: int) -> float:
    """CPU microseconds to relay one SSE chunk (best of 5 runs)."""
    channel, connections, client = _rig(variant)
    _post(channel, True)
    protocol, _ = connections.made[-1]
    protocol.dataReceived(SSE_HEAD + CHUNK)
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(chunks):
            protocol.dataReceived(CHUNK)
        best = min(best, (time.process_time() - start) / chunks * 1e6)
        client.clear()
    return best


def per_request(variant: str, requests: int) -> float:
    """CPU microseconds for one small non-streaming request (best of 5 runs)."""
    channel, connections, client = _rig(variant)

    def one() -> None:
        _post(channel, False)
        protocol, upstream = connections.made[-1]
        protocol.dataReceived(ANSWER)
        upstream.clear()
        client.clear()

    for _ in range(100):
        one()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(requests):
            one()
        best = min(best, (time.process_time() - start) / requests * 1e6)
    return best


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a tenth of the chunks and requests")
    parser.add_argument("--reps", type=int, default=None, help="ignored (best of 5 runs always)")
    args = parser.parse_args(argv)
    if args.quick:
        args.chunks, args.requests = args.chunks // 10, args.requests // 10
    rows = {}
    for variant in ("passthrough", "decode", "agent"):
        rows[variant] = {"us_per_chunk": per_chunk(variant, args.chunks),
                         "us_per_request": per_request(variant, args.requests)}
        log(f"relay_micro {variant}: {rows[variant]['us_per_chunk']:.2f} us per chunk, "
            f"{rows[variant]['us_per_request']:.1f} us per small request")
    data = {"scenario": "relay_micro", "chunk_bytes": len(CHUNK), "rows": rows}
    save("relay_micro", data)
    return data


if __name__ == "__main__":
    main()
