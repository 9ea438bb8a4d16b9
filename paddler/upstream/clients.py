"""Outbound HTTP: persistent connection pools owned by a service."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool

#: llama-server closes idle keep-alive connections after 5 s; reusing one it
#: is closing would fail a POST (not retried) and wrongly blame the server.
CACHED_CONNECTION_TIMEOUT = 4


def connection_pool(reactor: Any, max_per_host: int) -> HTTPConnectionPool:
    """A persistent connection pool keeping at most C{max_per_host} idle connections per upstream.

    Its "Starting factory" lines are dropped by L{paddler.logs.observer}.
    """
    connections = HTTPConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = max_per_host
    connections.cachedConnectionTimeout = CACHED_CONNECTION_TIMEOUT
    return connections


class ConnectionPoolService(Service):
    """Closes an C{HTTPConnectionPool}'s cached connections when stopped."""

    def __init__(self, connections: HTTPConnectionPool) -> None:
        self.connections = connections

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.connections.closeCachedConnections()


class UpstreamClientService(Service):
    """Closes an L{paddler.upstream.client.UpstreamClient}'s idle connections when stopped."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.client.close()
