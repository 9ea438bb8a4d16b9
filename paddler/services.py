"""Small services that own the lifetime of shared objects."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import HTTPConnectionPool

from paddler.config import UpstreamSpec
from paddler.pool import UpstreamPool
from paddler.upstream import Upstream


class ConnectionPoolService(Service):
    """Closes an C{HTTPConnectionPool}'s cached connections when stopped."""

    def __init__(self, connections: HTTPConnectionPool) -> None:
        self.connections = connections

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.connections.closeCachedConnections()


class PoolService(Service):
    """Adds the configured upstreams on start; fails buffered requests on stop."""

    def __init__(self, pool: UpstreamPool, upstreams: list[UpstreamSpec], clock: IReactorTime) -> None:
        self.pool = pool
        self.upstreams = upstreams
        self.clock = clock

    def startService(self) -> None:
        super().startService()
        for spec in self.upstreams:
            self.pool.add(Upstream(spec.url, spec.name, spec.api_key, source="static", clock=self.clock))

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
