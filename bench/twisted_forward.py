"""A plain TCP forwarder on Twisted's reactor: the floor for any Twisted relay (no HTTP at all).

Each client connection gets its own upstream connection; bytes go both ways
as they come, with backpressure (each side is the other's producer). It is
a reference target for the streaming scenario (``--targets twisted-floor``):
paddler cannot relay a chunk for less CPU than this.

    python -m bench.twisted_forward --port P --upstream-port U [--loop asyncio|uvloop]

C{--loop} runs it on Twisted's asyncio reactor (on asyncio's own loop or on
uvloop's) instead of the epoll reactor: is the reactor's per-event cost
the loop's or Twisted's? C{--loop lean} runs it on paddler's lean epoll
reactor with both transports flushed before poll (paddler/flush.py):
the floor paddler now stands on (target ``twisted-floor-lean``).
"""

from __future__ import annotations

import argparse
from typing import Any

import sys

from twisted.internet import protocol

from paddler import flush

reactor: Any = None


class Upstream(protocol.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connectionMade(self) -> None:
        flush.hook(self.transport)
        self.client.upstream = self
        self.transport.registerProducer(self.client.transport, True)
        self.client.transport.registerProducer(self.transport, True)
        if self.client.pending:
            self.transport.write(b"".join(self.client.pending))
            self.client.pending = []
        self.client.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.transport.loseConnection()


class Client(protocol.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.upstream: Upstream | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        flush.hook(self.transport)
        self.transport.setTcpNoDelay(True)
        self.transport.pauseProducing()
        factory = protocol.ClientFactory()
        factory.noisy = False
        factory.protocol = lambda: Upstream(self)  # type: ignore[assignment]
        reactor.connectTCP("127.0.0.1", self.upstream_port, factory)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--loop", choices=("epoll", "lean", "asyncio", "uvloop"), default="epoll")
    args = parser.parse_args()
    global reactor
    if args.loop == "lean":
        from paddler.lean_reactor import install

        flush.enable(install())
    elif args.loop != "epoll":
        import asyncio

        from twisted.internet import asyncioreactor

        if args.loop == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        asyncioreactor.install(loop)
    from twisted.internet import reactor as installed

    reactor = installed
    print(f"twisted_forward on {type(reactor).__name__}", file=sys.stderr)
    factory = protocol.Factory()
    factory.noisy = False
    factory.protocol = lambda: Client(args.upstream_port)  # type: ignore[assignment]
    reactor.listenTCP(args.port, factory, interface="127.0.0.1", backlog=4096)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
