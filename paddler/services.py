"""Small services that own the lifetime of shared objects."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.server import Site

from paddler.config import UpstreamSpec
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import Upstream


class QuietSite(Site):
    """A site without an access log (the management port: probes, dashboards, SSE)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_connection_pool(reactor: Any, max_per_host: int) -> HTTPConnectionPool:
    """A persistent connection pool that does not log every connection it opens."""
    connections = HTTPConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = max_per_host
    # llama-server closes idle keep-alive connections after 5 s; reusing one it
    # is closing would fail a POST (not retried) and wrongly blame the server.
    connections.cachedConnectionTimeout = 4
    connections._factory = _QuietHTTP11ClientFactory
    return connections


class ConnectionPoolService(Service):
    """Closes an C{HTTPConnectionPool}'s cached connections when stopped."""

    def __init__(self, connections: HTTPConnectionPool) -> None:
        self.connections = connections

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.connections.closeCachedConnections()


class ProxyStoppingService(Service):
    """Tells the proxy the balancer is stopping: connections dropped then are not retried."""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    def stopService(self) -> None:
        super().stopService()
        self.proxy.stopping = True


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


class AnnouncedEndpointService(StreamServerEndpointService):
    """A listener that logs the address it actually bound (port 0 included)."""

    log = Logger()

    def __init__(self, endpoint: Any, factory: Any, what: str, path: str = "/") -> None:
        super().__init__(endpoint, factory)
        self.what = what
        self.path = path
        self.address: Any = None
        self._raiseSynchronously = True  # a port that cannot be bound fails startup, as strports.service does

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._waitingForPort is not None:
            self._waitingForPort.addCallback(self._announce)

    def _announce(self, port: Any) -> Any:
        if port is None:  # listening failed; already reported
            return None
        self.address = port.getHost()
        host = getattr(self.address, "host", None)
        if host is not None:
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{self.address.port}{self.path}"
        else:
            url = str(self.address)
        self.log.info("{what} listening on {url}", what=self.what, url=url)
        return port


class SimulatedUpstreamsService(Service):
    """Adds the servers of an in-process simulated fleet to the pool once they listen."""

    log = Logger()

    def __init__(self, pool: UpstreamPool, fleet: Any, clock: IReactorTime) -> None:
        self.pool = pool
        self.fleet = fleet
        self.clock = clock

    def startService(self) -> None:
        super().startService()
        self.fleet.whenListening().addCallback(self._add).addErrback(
            lambda f: self.log.failure("the simulated fleet did not start", f)
        )

    def _add(self, urls: list[str]) -> None:
        for index, url in enumerate(urls):
            self.pool.add(Upstream(url, f"simulated-{index}", source="simulated", clock=self.clock))
