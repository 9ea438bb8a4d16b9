"""Agents: their reports become upstreams, and upstreams of silent agents expire.

An agent (``paddler agent``) polls one llama.cpp server and reports its slots
here through ``POST /api/v1/agents/{agent_id}/report``. The report plays the
part of a probe for that upstream (the probes skip ``source == "agent"``).

Expiry: an agent upstream whose last report is older than its expiry
(``--agent-expiry``, or three of the agent's own report intervals when those
are longer) is removed *when idle*: it is drained at once, so it takes no new
request, and it leaves the pool when its last in-flight request finishes.
A silent agent does not prove its server is down, so a request still running
there is left to finish (or to fail on its own deadline). If the agent
reports again before that, the expiry is undone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import (
    FailureSeen,
    LoadingSeen,
    Observation,
    SlotsSeen,
    Upstream,
    UpstreamState,
    normalise_url,
    upstream_id,
)

#: An agent may report a longer interval than the balancer's expiry assumes;
#: it then gets this many of its own intervals.
MISSED_REPORTS = 3


class RegistryConflict(Exception):
    """A report that contradicts the fleet (HTTP 409); C{field} names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class AgentReport:
    """What an agent says about its server (validated by the management API)."""

    url: str
    name: str
    slots_total: int = 0
    slots_processing: int = 0
    state: UpstreamState = UpstreamState.HEALTHY
    error: str | None = None
    models: tuple[str, ...] = ()
    interval: float | None = None


@dataclass
class AgentRecord:
    """One agent the balancer hears from."""

    agent_id: str
    upstream_id: str
    name: str
    last_report_at: float
    interval: float | None = None
    error: str | None = None
    expiring: bool = False
    was_draining: bool = False

    def describe(self, now: float) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "upstream_id": self.upstream_id,
            "name": self.name,
            "last_report_age": max(0.0, now - self.last_report_at),
            "interval": self.interval,
            "error": self.error,
            "expiring": self.expiring,
        }


class AgentRegistry(Service):
    """Applies agent reports to the pool and expires the upstreams of silent agents."""

    log = Logger()

    def __init__(
        self,
        pool: UpstreamPool,
        clock: IReactorTime,
        expiry: float = 3.0,
        report_age: Callable[[str], float | None] | None = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.expiry = expiry
        # With shared state, an agent may report to another balancer: the age of
        # its last report anywhere (or None) keeps its upstream from expiring here.
        self.report_age = report_age
        self.sweep_interval = max(0.05, min(1.0, expiry / 4))
        self.agents: dict[str, AgentRecord] = {}
        self._loop: LoopingCall | None = None
        self._unsubscribe: Any = None

    # -- lifetime ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._unsubscribe = self.pool.subscribe(self._on_pool_event)
        self._loop = LoopingCall(self._sweep_safely)
        self._loop.clock = self.clock
        self._loop.start(self.sweep_interval, now=False).addErrback(
            lambda f: self.log.failure("agent expiry loop died", f)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_pool_event(self, event: str, upstream: Upstream | None) -> None:
        if event != "removed" or upstream is None:
            return
        for record in list(self.agents.values()):
            if record.upstream_id == upstream.id:
                del self.agents[record.agent_id]

    # -- reports ----------------------------------------------------------

    def report(self, agent_id: str, report: AgentReport) -> Upstream:
        """Apply C{report} from C{agent_id}; raise L{RegistryConflict} and change nothing on conflict."""
        url = normalise_url(report.url)
        uid = upstream_id(url)
        existing = self.pool.upstreams.get(uid)
        if existing is not None and existing.source != "agent":
            raise RegistryConflict(
                "url", f"url {url} is already registered as {existing.name!r} (source {existing.source})"
            )
        record = self.agents.get(agent_id)
        own = {uid} if record is None else {uid, record.upstream_id}
        for other in self.pool.upstreams.values():
            if other.id not in own and other.name == report.name:
                raise RegistryConflict(
                    "name", f"name {report.name!r} is already used by the upstream at {other.url}"
                )
        for other_agent in self.agents.values():
            if other_agent.agent_id != agent_id and other_agent.upstream_id == uid:
                raise RegistryConflict("url", f"url {url} is reported by agent {other_agent.agent_id!r}")

        now = self.clock.seconds()
        if record is not None and record.upstream_id != uid:
            self.log.info(
                "agent {agent_id} now reports {url}; retiring its previous upstream",
                agent_id=agent_id,
                url=url,
            )
            del self.agents[agent_id]
            self.pool.remove_when_idle(record.upstream_id)
            record = None

        upstream = existing
        if upstream is None:
            upstream = Upstream(url, report.name, source="agent", clock=self.clock)
        else:
            upstream.name = report.name

        if record is None:
            record = AgentRecord(agent_id, uid, report.name, now)
            self.agents[agent_id] = record
            self.log.info(
                "agent {agent_id} reports {name} at {url}", agent_id=agent_id, name=report.name, url=url
            )
        record.name = report.name
        record.last_report_at = now
        record.interval = report.interval
        record.error = report.error
        if record.expiring:
            record.expiring = False
            self.log.info("agent {agent_id} reports again; {name} stays", agent_id=agent_id, name=report.name)
            if record.was_draining or upstream.drain_requested:
                self.pool.cancel_removal(uid)
            else:
                self.pool.undrain(uid)

        if existing is None:
            self.pool.add(upstream)
        self.pool.observe(upstream, self._observation(report, upstream))
        return upstream

    @staticmethod
    def _observation(report: AgentReport, upstream: Upstream) -> Observation:
        # The agent's numbers are absolute, like a probe's, so they come with
        # a mark taken now. Caveat: the agent read them up to one report
        # interval (plus transit) ago; a request of ours started since then is
        # subtracted although the server did not count it yet, and one
        # finished since then is counted as someone else's. Either error
        # lasts one report interval, and the next report overwrites it.
        if report.state is UpstreamState.LOADING:
            return LoadingSeen(source="agent")
        if report.state is UpstreamState.UNREACHABLE:
            return FailureSeen(report.error or "its agent says it is unreachable", source="agent")
        return SlotsSeen(
            report.slots_total,
            report.slots_processing,
            upstream.probe_mark(),
            source="agent",
            models=report.models or None,
        )

    # -- expiry -----------------------------------------------------------

    def expiry_for(self, record: AgentRecord) -> float:
        if record.interval:
            return max(self.expiry, MISSED_REPORTS * record.interval)
        return self.expiry

    def _sweep_safely(self) -> None:
        try:
            self.sweep()
        except Exception:
            self.log.failure("agent expiry sweep failed")

    def sweep(self) -> None:
        """Retire the upstreams of agents silent for longer than their expiry."""
        now = self.clock.seconds()
        for record in list(self.agents.values()):
            if record.expiring:
                if self.pool.removal_pending(record.upstream_id):
                    continue
                # The removal was cancelled (an operator's undrain) but the
                # agent is still silent: expire it again.
                record.expiring = False
            age = now - record.last_report_at
            elsewhere = self.report_age(record.upstream_id) if self.report_age is not None else None
            if elsewhere is not None and elsewhere < age:
                record.last_report_at = now - elsewhere
                age = elsewhere
            if age <= self.expiry_for(record):
                continue
            upstream = self.pool.upstreams.get(record.upstream_id)
            if upstream is None:
                self.agents.pop(record.agent_id, None)
                continue
            self.log.info(
                "agent {agent_id} silent for {age:.1f}s; removing {name} ({url}) once its "
                "{in_flight} requests finish",
                agent_id=record.agent_id,
                age=age,
                name=upstream.name,
                url=upstream.url,
                in_flight=upstream.in_flight,
            )
            record.expiring = True
            record.was_draining = upstream.draining
            self.pool.remove_when_idle(record.upstream_id)
