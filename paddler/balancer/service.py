"""The balancer process as one service: its parts, a graceful stop, and a reload on SIGHUP.

Stopping (SIGTERM, SIGINT, ``twistd`` shutting down):

1. the proxy listener closes, so no new connection is accepted; new
   requests on connections already open get 503 with ``Connection: close``;
2. requests waiting in the buffer get 503 "shutting down" at once (they have
   not started anywhere: another balancer, or this one after its restart,
   can take them);
3. running requests and streams go on until they end, at most
   ``--shutdown-timeout`` seconds; those still running then are cut;
4. then everything else stops: probes, agents' expiry, the management port,
   connection pools.

A reload (SIGHUP, L{BalancerService.reload}) reads the ``--config`` file
and the environment again and applies what can change while running.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from paddler.balancer.proxy import ProxyResource
from paddler.config import BalancerConfig
from paddler.fleet.pool import UpstreamPool
from paddler.observability.requests import RequestStats
from paddler.server.listeners import ListeningService


class BalancerService(MultiService):
    """The whole balancer: every part is an attribute, every lifetime a child service."""

    log = Logger()

    def __init__(
        self,
        config: BalancerConfig,
        clock: IReactorTime,
        pool: UpstreamPool,
        stats: RequestStats,
        proxy: ProxyResource,
        shutdown_timeout: float = BalancerConfig.shutdown_timeout,
        *,
        instance_id: str | None = None,
        body_memory: Any = None,
        probes: Any = None,
        registry: Any = None,
        sites: list[Any] | None = None,
        proxy_listener: ListeningService | None = None,
        on_signal: Callable[[int, Callable[[], object]], None] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.clock = clock
        self.pool = pool
        self.stats = stats
        self.proxy = proxy
        self.shutdown_timeout = shutdown_timeout
        self.probes, self.registry = probes, registry
        self.management_listener: ListeningService | None = None
        self.proxy_listener = proxy_listener
        self.reloader: Callable[[], list[str]] | None = None
        #: Run when stopping begins, beside the drain (the workers of --workers stop at once too).
        self.on_stopping: list[Callable[[], Deferred[Any]]] = []
        self.on_signal = on_signal
        self.stopping = False
        self.sites: list[Any] = list(sites or ())
        self.instance_id, self.body_memory = instance_id, body_memory
        #: Signal handlers to install at start (default: SIGHUP reloads); --workers sets its own.
        self.signal_handlers: dict[int, Callable[[], object]] = {}
        #: vets upstream URLs (paddler.fleet.addresses), set by the composition root
        self.vetter: Any = None

    def own_urls(self) -> set[str]:
        """The URLs this balancer's listeners answer at on this host (an upstream there would be itself)."""
        from paddler.server.listeners import urls_of

        urls: set[str] = set()
        for listener in (self.proxy_listener, self.management_listener):
            if listener is not None and listener.address is not None:
                urls |= urls_of(listener.address)
        return urls

    def own_listeners(self) -> list[Any]:
        """This balancer's bound TCP listeners as L{paddler.fleet.addresses.OwnListener}s."""
        from paddler.fleet.addresses import own_listener

        found = []
        for listener in (self.proxy_listener, self.management_listener):
            address = listener.address if listener is not None else None
            host, port = getattr(address, "host", None), getattr(address, "port", None)
            if host is not None and port:
                found.append(own_listener(host, port))
        return found

    def startService(self) -> None:
        super().startService()
        if self.on_signal is not None:
            handlers = self.signal_handlers or {signal.SIGHUP: self.reload}
            for signum, handler in handlers.items():
                self.on_signal(signum, handler)

    def stopService(self) -> Deferred[None]:
        return ensureDeferred(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        in_flight, buffered = len(self.proxy.active), self.pool.requests_buffered
        self.log.info(
            "stopping: accepting no new connection; {in_flight} requests running, {buffered} buffered "
            "(answered 503); waiting up to {timeout:g}s for the running ones",
            in_flight=in_flight,
            buffered=buffered,
            timeout=self.shutdown_timeout,
        )
        beside = [hook() for hook in self.on_stopping]
        if self.proxy_listener is not None:
            await self.proxy_listener.stopListening()
        self.proxy.stop_accepting()
        self.pool.stop()
        drained = self.proxy.drained()
        if not drained.called:
            deadline = self.clock.callLater(self.shutdown_timeout, drained.cancel)
            try:
                await drained
            except Exception:
                running = len(self.proxy.active)
                cut = self.proxy.abort_active()
                self.log.warn(
                    "stopping: {running} requests still running after {timeout:g}s "
                    "(--shutdown-timeout); cut {cut} of them",
                    running=running,
                    timeout=self.shutdown_timeout,
                    cut=cut,
                )
            else:
                if deadline.active():
                    deadline.cancel()
                self.log.info("stopping: every running request has finished")
        for d in beside:
            await d
        await super().stopService()

    def reload(self) -> list[str]:
        """Apply the configuration again (SIGHUP); return what changed, each in a line that was logged."""
        if self.reloader is None:
            self.log.info("reload: nothing to reload")
            return []
        return self.reloader()
