"""Upstreams that come from the configuration, and those of the demo's simulated fleet."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from paddler.config import UpstreamSpec
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import Upstream


class StaticUpstreamsService(Service):
    """Adds the configured upstreams on start; fails the requests still buffered on stop."""

    def __init__(self, pool: UpstreamPool, upstreams: Sequence[UpstreamSpec], clock: IReactorTime) -> None:
        self.pool = pool
        self.upstreams = list(upstreams)
        self.clock = clock

    def startService(self) -> None:
        super().startService()
        for spec in self.upstreams:
            self.pool.add(Upstream(spec.url, spec.name, spec.api_key, source="static", clock=self.clock))

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


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
