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

Credentials: an agent registers first (L{AgentRegistry.register}, ``POST
/api/v1/agents``) and gets a token, once; the registry keeps only its
SHA-256 and compares in constant time (L{AgentRegistry.authenticate}). A
registration binds the agent id to one upstream URL: the agent may report
and drain that upstream only. An id stays bound while its agent is alive;
registering it again needs its token or the management token, or waits
until the agent's upstream expired (so a restarted agent gets in again
within one expiry).

Router-mode servers: an agent beside a router-mode llama-server reports each
of its models (state, exit code, a loaded model's slots); the report makes the
same child upstreams per (router, model) as a probe of the router does
(L{paddler.fleet.routers.observe_router}), and they leave with the router.

Slot checks: an agent upstream is probed by the balancer too (when it can
reach it). A report whose slots disagree with a fresh probe reading (another
slot count, or more idle slots than the server's own ``/slots`` showed)
loses to the probe: the probe's figures are applied, the report is counted
in L{AgentRegistry.contradicted} and logged at warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from paddler.fleet.pool import UpstreamPool
from paddler.fleet.routers import child_id, forget_router, observe_router
from paddler.llamacpp.slots import RouterReading
from paddler.server.instance import ThisBalancer
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


def _contradicts(total: int, processing: int | None, seen_total: int, seen_processing: int | None) -> bool:
    """
    Whether claimed slots disagree with the server's own: another slot count,
    or more idle slots than it showed, beyond what the time between the two
    readings explains (a quarter of the slots, at least one).
    """
    if total != seen_total:
        return True
    if processing is None or seen_processing is None:
        return False
    return (seen_processing - processing) > max(1, total // 4)


#: Seconds at least a registration waits for its first report before it is forgotten.
PENDING_REGISTRATION = 10.0


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
    #: C{router}: a router-mode llama-server (its models are in C{router} when it is healthy)
    role: str = "single"
    router: RouterReading | None = None


def _digest(token: str | bytes) -> bytes:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


@dataclass
class AgentCredential:
    """An agent's registration: the upstream URL it may report and the SHA-256 of its token."""

    agent_id: str
    url: str
    name: str
    digest: bytes
    registered_at: float


class RegistrationRefused(Exception):
    """A registration that cannot be granted now: C{status} 409 (the id is held) or 403."""

    def __init__(self, status: int, message: str, field: str = "agent_id") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


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
    #: the last reading of the server's own /slots (L{AgentRegistry.reader}) and when it came
    check: Any = None
    check_at: float = 0.0
    check_started: float | None = None
    checking: Any = None
    claimed_processing: int | None = None
    check_failures: int = 0
    claim_applied: bool = False  # the last report's own figures were applied (not the check's)
    lying: bool = False

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
        reader: Callable[[Upstream], Any] | None = None,
        check_every: float = 1.0,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.expiry = expiry
        # With shared state, an agent may report to another balancer: the age of
        # its last report anywhere (or None) keeps its upstream from expiring here.
        self.report_age = report_age
        self.sweep_interval = max(0.05, min(1.0, expiry / 4))
        self.agents: dict[str, AgentRecord] = {}
        self.credentials: dict[str, AgentCredential] = {}
        #: Reports whose slots a fresh probe contradicted, per agent id (and in all).
        self.contradicted: dict[str, int] = {}
        self.contradicted_total = 0
        #: Seconds a probe reading stays fresh enough to check a report against.
        self.check_age = 3.0
        #: C{reader(upstream)}: a Deferred of the server's own slot reading (L{HTTPProber.read}), or None.
        self.reader = reader
        self.check_every = check_every
        #: Checks in flight at most, whatever the number of agents (the others wait for a later report).
        self.max_checks = 32
        self._checks_running = 0
        #: URLs found to answer as this balancer: never registered again.
        self.refused_urls: set[str] = set()
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
        for record in self.agents.values():
            if record.checking is not None:
                checking, record.checking = record.checking, None
                checking.cancel()

    def _on_pool_event(self, event: str, upstream: Upstream | None) -> None:
        if event != "removed" or upstream is None:
            return
        for record in list(self.agents.values()):
            if record.upstream_id == upstream.id:
                del self.agents[record.agent_id]
                self.credentials.pop(record.agent_id, None)
                self.contradicted.pop(record.agent_id, None)

    # -- credentials ------------------------------------------------------

    def register(self, agent_id: str, url: str, name: str, proof: str | bytes | None = None,
                 admin: bool = False) -> str:
        """
        Bind C{agent_id} to C{url} and return its new token (shown once).
        An id already held by a live agent is given again only with its
        current token (C{proof}) or by an operator (C{admin}); otherwise
        L{RegistrationRefused} (409).
        """
        url = normalise_url(url)
        held = self.credentials.get(agent_id)
        if held is not None and not admin and self._alive_or_pending(held):
            if proof is None or not hmac.compare_digest(_digest(proof), held.digest):
                raise RegistrationRefused(
                    409,
                    f"agent id {agent_id!r} is registered and its agent is alive; register again with "
                    "its token, with the management token, or once its upstream expired",
                )
        for other in self.credentials.values():
            if other.agent_id != agent_id and other.url == url and self._alive_or_pending(other):
                raise RegistrationRefused(409, f"url {url} is registered by agent {other.agent_id!r}", "url")
        token = secrets.token_urlsafe(32)
        previous = self.credentials.get(agent_id)
        self.credentials[agent_id] = AgentCredential(agent_id, url, name, _digest(token), self.clock.seconds())
        record = self.agents.get(agent_id)
        if previous is not None and record is not None and previous.url != url:
            self.log.info("agent {agent_id} registered {url} instead; retiring its previous upstream",
                          agent_id=agent_id, url=url)
            del self.agents[agent_id]
            self.pool.remove_when_idle(record.upstream_id)
        self.log.info("agent {agent_id} registered for {name} at {url}", agent_id=agent_id, name=name, url=url)
        return token

    def _alive_or_pending(self, credential: AgentCredential) -> bool:
        """Whether a registration still holds its id: its agent reports, or registered lately."""
        record = self.agents.get(credential.agent_id)
        if record is not None:
            return not record.expiring
        return self.clock.seconds() - credential.registered_at <= self.pending_for

    @property
    def pending_for(self) -> float:
        """Seconds a registration without a report holds its id (the agent's first report is on its way)."""
        return max(self.expiry, PENDING_REGISTRATION)

    def registering(self) -> int:
        """Agents registered lately that have not reported yet (their upstream is on its way)."""
        now = self.clock.seconds()
        return sum(
            1 for c in self.credentials.values()
            if c.agent_id not in self.agents and now - c.registered_at <= self.pending_for
        )

    def authenticate(self, agent_id: str, token: bytes) -> AgentCredential | None:
        """The registration C{token} belongs to if it is C{agent_id}'s; C{None} otherwise (constant time)."""
        digest = _digest(token)
        credential = self.credentials.get(agent_id)
        if credential is not None and hmac.compare_digest(digest, credential.digest):
            return credential
        return None

    def token_owner(self, token: bytes) -> AgentCredential | None:
        """The registration whose token C{token} is, if any (to tell "another agent's id" from "no token")."""
        digest = _digest(token)
        found = None
        for credential in self.credentials.values():
            if hmac.compare_digest(digest, credential.digest):
                found = credential
        return found

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
        record.claimed_processing = report.slots_processing
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
        if report.router is not None:
            self._observe_router(upstream, report.router)
            return upstream
        if report.role == "single" and upstream.role == "router" and report.state is UpstreamState.HEALTHY:
            self.log.info("agent {agent_id}: {name} is no longer a router-mode llama-server",
                          agent_id=agent_id, name=upstream.name)
            forget_router(self.pool, upstream)
        observation = self._observation(report, upstream)
        if isinstance(observation, SlotsSeen):
            observation = self._checked(record, report, upstream, observation)
        self.pool.observe(upstream, observation)
        self._check_soon(record, upstream)
        return upstream

    def _observe_router(self, upstream: Upstream, reading: RouterReading) -> None:
        """A router's report: the same child upstreams per model as a probe of it makes.

        The marks are taken now, as for a single server's report (the agent's
        figures are up to one report interval old). A router's report is not
        checked against its own C{/slots} (that needs a model per request).
        """
        marked = RouterReading(reading.max_instances, reading.autoload, [
            dataclasses.replace(model, mark=self._child_mark(upstream, model.id)) for model in reading.models
        ], upstream.probe_mark())
        observe_router(self.pool, upstream, marked, source="agent")

    def _child_mark(self, parent: Upstream, model: str) -> int:
        child = self.pool.upstreams.get(child_id(parent.url, model))
        return child.probe_mark() if child is not None else 0

    def metrics(self) -> Any:
        """The Prometheus families of the registry (scraped with the rest)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        contradicted = CounterMetricFamily(
            "paddler_agent_reports_contradicted",
            "Agent reports whose slots the server's own /slots contradicted (the balancer's reading was used).",
            labels=["agent_id"],
        )
        for agent_id, count in sorted(self.contradicted.items()):
            contradicted.add_metric([agent_id], count)
        yield contradicted
        yield CounterMetricFamily(
            "paddler_agent_reports_contradicted_all",
            "Agent reports contradicted by the server's own /slots, all agents (also those gone).",
            value=self.contradicted_total,
        )
        yield GaugeMetricFamily(
            "paddler_agents_registered", "Agents holding a registration (token).", value=len(self.credentials)
        )

    # -- checking reports against the server's own /slots -------------------

    def _checked(self, record: AgentRecord, report: AgentReport, upstream: Upstream,
                 claimed: SlotsSeen) -> SlotsSeen:
        """The report's slots, or the fresh probe reading's when they disagree (counted and logged)."""
        reading = record.check
        record.claim_applied = True
        if reading is None or self.clock.seconds() - record.check_at > self.check_age:
            return claimed
        if not _contradicts(report.slots_total, report.slots_processing, reading.total, reading.processing):
            record.lying = False
            return claimed
        record.claim_applied = False
        self._contradicted(record, upstream, report.slots_total, report.slots_processing, reading)
        return SlotsSeen(reading.total, reading.processing, reading.mark, source="agent",
                         models=report.models or None)

    def _contradicted(self, record: AgentRecord, upstream: Upstream, total: int, processing: int,
                      reading: Any) -> None:
        self.contradicted[record.agent_id] = self.contradicted.get(record.agent_id, 0) + 1
        self.contradicted_total += 1
        if not record.lying:
            record.lying = True
            self.log.warn(
                "agent {agent_id} reports {idle} of {total} slots idle on {name} ({url}), but its "
                "/slots shows {seen_idle} of {seen_total}: the balancer's own reading is used",
                agent_id=record.agent_id, idle=total - processing, total=total, name=upstream.name,
                url=upstream.url, seen_idle=reading.total - min(reading.total, reading.processing or 0),
                seen_total=reading.total,
            )

    def _check_soon(self, record: AgentRecord, upstream: Upstream) -> None:
        """Read the server's /slots in the background (one read at a time, at most every check_every s)."""
        if self.reader is None or record.checking is not None or self._checks_running >= self.max_checks:
            return
        now = self.clock.seconds()
        # a server the balancer cannot read is asked less and less often (up to 64 intervals)
        every = self.check_every * 2 ** min(record.check_failures, 6)
        if record.check_started is not None and now - record.check_started < every:
            return
        record.check_started = now
        self._checks_running += 1
        d = self.reader(upstream)
        record.checking = d
        d.addBoth(self._check_done)

        def read(reading: Any) -> None:
            record.checking = None
            record.check_failures = 0
            record.check, record.check_at = reading, self.clock.seconds()
            if self.agents.get(record.agent_id) is not record or self.pool.upstreams.get(upstream.id) is not upstream:
                return
            # A lie already applied (no fresh reading when it came) loses at once, not at the next
            # report; it is counted once, here.
            if record.claim_applied and upstream.state is UpstreamState.HEALTHY and _contradicts(
                upstream.slots_total, record.claimed_processing, reading.total, reading.processing
            ):
                record.claim_applied = False
                self._contradicted(record, upstream, upstream.slots_total, record.claimed_processing or 0, reading)
                self.pool.observe(upstream, SlotsSeen(reading.total, reading.processing, reading.mark,
                                                      source="agent"))

        def failed(failure: Any) -> None:
            record.checking = None
            record.check = None
            if not failure.check(CancelledError):
                record.check_failures += 1
            if failure.check(ThisBalancer):
                self._this_balancer(record, upstream)
            # otherwise: the balancer cannot read it itself; the agent's word stands

        d.addCallbacks(read, failed)
        d.addErrback(lambda f: self.log.failure("check of agent {agent_id} failed", f, agent_id=record.agent_id))

    def _check_done(self, result: Any) -> Any:
        self._checks_running -= 1
        return result

    def _this_balancer(self, record: AgentRecord, upstream: Upstream) -> None:
        self.log.warn(
            "agent {agent_id} reports {url}, which answers as this balancer itself: removed, and "
            "its registration is refused from now on", agent_id=record.agent_id, url=upstream.url,
        )
        self.refused_urls.add(upstream.url)
        self.credentials.pop(record.agent_id, None)
        self.agents.pop(record.agent_id, None)
        self.pool.remove(upstream.id)

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
        """Retire the upstreams of agents silent for longer than their expiry (and unused registrations)."""
        now = self.clock.seconds()
        for credential in list(self.credentials.values()):
            if credential.agent_id not in self.agents and now - credential.registered_at > self.pending_for:
                del self.credentials[credential.agent_id]  # registered, never reported
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
