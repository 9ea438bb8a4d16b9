"""``paddler agent``: reports one llama.cpp server's slots to a balancer.

Every interval the agent reads the local server's slots (the same reader as
the balancer's probes: ``/slots``, falling back to ``/props`` + ``/metrics``)
and posts them to ``POST /api/v1/agents/{agent_id}/report`` on the
balancer's management port. Both requests have a deadline.

A router-mode llama-server (``/props`` says ``role: router``) is read like
the balancer reads one: ``/props``, ``/models`` and ``/slots?model=M&autoload=false``
for each loaded model (never loading one); the report then says ``role:
router``, ``max_instances``, ``models_autoload`` and ``router_models`` (each
model's id, aliases, state, exit code and slots), and the balancer makes one
child upstream per model of it.

The agent's link to the balancer is a state machine (L{AgentState},
L{AGENT_TRANSITIONS}, drawn in docs/states.md), each change logged once::

    starting --ok--> reporting --fail--> unreachable --ok--> reporting
                         \\--4xx--> rejected --ok--> reporting
    (any) --stop--> draining --drained--> stopped

Before its first report the agent registers (``POST /api/v1/agents``, with
the management token when one is configured) and keeps the token the
balancer issues, in memory only; every report carries it as
``Authorization: Bearer``. A report answered 401 (the balancer restarted and
forgot it) registers again at once.

While the balancer fails, reports back off exponentially (interval, 2x, 4x
... up to ``max_backoff``); the agent never gives up.

On stop (SIGTERM) the agent asks the balancer to drain its host, waits until
the balancer counts no request in flight there (bounded by
``drain_timeout``), then deletes the host from the fleet, so a scale-down
loses no request.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from klein import Klein
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from paddler.upstream.body import read_body
from paddler.config import AgentConfig
from paddler.llamacpp.errors import Loading, error_message
from paddler.llamacpp.slots import NotRouterMode, RouterMode, RouterReading, http_getter, read_router, read_slots
from paddler.upstream.failures import describe_failure
from paddler.server.router import json_errors
from paddler.fleet.upstream import UpstreamState, normalise_url, upstream_id


class AgentState(enum.StrEnum):
    """The agent's link to its balancer."""

    STARTING = "starting"
    REPORTING = "reporting"
    UNREACHABLE = "unreachable"  # the last report did not reach the balancer
    REJECTED = "rejected"  # the balancer answered the last report with an error
    DRAINING = "draining"  # stopping: the host is drained, its requests finish
    STOPPED = "stopped"


class AgentEvent(enum.Enum):
    REPORTED = "reported"
    FAILED = "failed"
    REJECTED = "rejected"
    STOP = "stop"
    DRAINED = "drained"


_A, _V = AgentState, AgentEvent
#: Every allowed (state, event) pair; a report cannot land once the agent is stopping.
AGENT_TRANSITIONS: dict[tuple[AgentState, AgentEvent], AgentState] = {
    **{
        (state, event): target
        for state in (_A.STARTING, _A.REPORTING, _A.UNREACHABLE, _A.REJECTED)
        for event, target in (
            (_V.REPORTED, _A.REPORTING),
            (_V.FAILED, _A.UNREACHABLE),
            (_V.REJECTED, _A.REJECTED),
            (_V.STOP, _A.DRAINING),
        )
    },
    (_A.DRAINING, _V.DRAINED): _A.STOPPED,
}


class BalancerRejected(Exception):
    """The balancer answered a report with an error status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class AgentService(Service):
    """Polls the local llama.cpp and reports to the balancer; drains its host on stop."""

    log = Logger()

    def __init__(self, config: AgentConfig, http_client: Any, clock: IReactorTime) -> None:
        self.config = config
        self._http = http_client
        self._clock = clock
        self.external_url = normalise_url(config.external_url)
        self.upstream_id = upstream_id(self.external_url)
        self.agent_id = self.upstream_id
        self._balancer = config.balancer.rstrip("/")
        self._get_llama = http_getter(http_client, normalise_url(config.llamacpp), config.llamacpp_api_key)
        self._method = "slots"
        #: ``single``, or ``router`` once /props (or /slots) said the server runs in router mode
        self.role = "single"
        self.balancer_state = AgentState.STARTING
        self.balancer_error: str | None = None
        self.llamacpp_state = UpstreamState.UNKNOWN
        self.last_report: dict[str, Any] | None = None
        self.last_report_ok_at: float | None = None
        self.draining = False
        self.failures = 0
        self._retry_at = 0.0
        self._loop: LoopingCall | None = None
        self._current: Deferred[None] | None = None
        #: the token the balancer issued at registration (in memory only; a restart registers again)
        self.agent_token: str | None = None

    # -- lifetime ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "agent {agent_id}: reporting {name} ({external_url}, local {llamacpp}) to {balancer} "
            "every {interval:g}s",
            agent_id=self.agent_id,
            name=self.config.name,
            external_url=self.external_url,
            llamacpp=self.config.llamacpp,
            balancer=self._balancer,
            interval=self.config.interval,
        )
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.config.interval, now=True).addErrback(
            lambda f: self.log.failure("agent report loop died", f)
        )

    def _move(self, event: AgentEvent) -> AgentState:
        """Apply C{event}; return the state before it."""
        previous = self.balancer_state
        self.balancer_state = AGENT_TRANSITIONS[previous, event]
        return previous

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._move(AgentEvent.STOP)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._current is not None:
            self._current.cancel()
        d = ensureDeferred(self._drain())
        # The drain is bounded by drain_timeout; this bound also covers the
        # requests it makes, so stopping can never hang.
        d.addTimeout(
            self.config.drain_timeout + 3 * self.config.timeout + self.config.drain_poll, self._clock
        )
        d.addErrback(self._drain_failed)
        d.addBoth(lambda _: self._move(AgentEvent.DRAINED) and None)
        return d

    def _drain_failed(self, failure: Failure) -> None:
        self.log.warn(
            "agent {agent_id}: could not drain {name} on the balancer: {error}",
            agent_id=self.agent_id,
            name=self.config.name,
            error=describe_failure(failure, self.config.timeout),
        )

    # -- reporting --------------------------------------------------------

    def _tick(self) -> Deferred[None] | None:
        if self._clock.seconds() < self._retry_at:
            return None  # backing off
        d = ensureDeferred(self._report_once())

        def done(result: object) -> None:
            self._current = None
            if isinstance(result, Failure) and not result.check(CancelledError):
                self.log.failure("agent {agent_id}: report failed unexpectedly", result,
                                 agent_id=self.agent_id)

        d.addBoth(done)
        self._current = d
        return d

    async def _register(self) -> None:
        """Register with the balancer: its answer holds this agent's token, shown once."""
        answer = await self._request(
            "POST", "/api/v1/agents",
            {"agent_id": self.agent_id, "url": self.external_url, "name": self.config.name},
            token=self.config.management_token,
        )
        token = answer.get("agent_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise BalancerRejected(502, "the registration answer carries no agent_token")
        self.agent_token = token
        self.log.info("agent {agent_id}: registered; the balancer at {balancer} issued its token",
                      agent_id=self.agent_id, balancer=self._balancer)

    async def _send_report(self, report: dict[str, Any]) -> Any:
        if self.agent_token is None:
            await self._register()
        path = f"/api/v1/agents/{self.agent_id}/report"
        try:
            return await self._request("POST", path, report, token=self.agent_token)
        except BalancerRejected as e:
            if e.code != 401:
                raise
        # The balancer does not know the token (it restarted, or this agent expired): register again.
        self.agent_token = None
        await self._register()
        return await self._request("POST", path, report, token=self.agent_token)

    async def _report_once(self) -> None:
        report = await self._read_llamacpp()
        self.last_report = report
        try:
            answer = await self._send_report(report)
        except Exception as e:
            if not self.running:
                raise CancelledError() from e  # cancelled by stopService: not a balancer failure
            self._balancer_failed(Failure(e))
            return
        self._balancer_ok(answer)

    async def _read_llamacpp(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "name": self.config.name,
            "url": self.external_url,
            "interval": self.config.interval,
        }
        try:
            reading = await self._read_server()
        except Loading:
            self._set_llamacpp_state(UpstreamState.LOADING, "Loading model")
            report.update(state="loading", error="Loading model")
            return report
        except Exception as e:
            if not self.running:
                # Cancelled by stopService (CancelledError, or ResponseNeverReceived /
                # ConnectingCancelledError from a real client): report nothing.
                raise CancelledError() from e
            error = describe_failure(Failure(e), self.config.timeout)
            self._set_llamacpp_state(UpstreamState.UNREACHABLE, error)
            report.update(state="unreachable", error=error)
            if self.role == "router":
                report["role"] = "router"
            return report
        if isinstance(reading, RouterReading):
            self._set_llamacpp_state(UpstreamState.HEALTHY, None)
            report.update(
                state="healthy",
                role="router",
                max_instances=reading.max_instances,
                models_autoload=reading.autoload,
                router_models=[
                    {
                        "id": m.id, "aliases": list(m.aliases), "state": m.state, "exit_code": m.exit_code,
                        "slots_total": m.total, "slots_processing": min(m.processing or 0, m.total),
                    }
                    for m in reading.models
                ],
            )
            return report
        self._method = reading.method
        processing = reading.processing or 0
        self._set_llamacpp_state(UpstreamState.HEALTHY, None)
        report.update(
            state="healthy",
            slots_total=reading.total,
            slots_processing=min(processing, reading.total),
            slots_idle=reading.total - min(processing, reading.total),
        )
        if reading.models:
            names = [m for m in reading.models if m]
            if names:
                report["model"] = names[0]
                report["models"] = names[1:]
        return report

    async def _read_server(self) -> Any:
        """The local server's slots (a L{SlotReading}), or its models (a L{RouterReading}) in router mode.

        The role follows the server: /props saying ``role: router`` (or /slots
        wanting a model) makes it a router; a router restarted with ``-m``
        is read as one server again. One deadline covers every request.
        """

        async def read() -> Any:
            if self.role != "router":
                try:
                    return await read_slots(self._get_llama, method=self._method)
                except RouterMode:
                    self._set_role("router")
            try:
                return await read_router(self._get_llama)
            except NotRouterMode:
                self._set_role("single")
                self._method = "slots"
                return await read_slots(self._get_llama, method=self._method)

        d = ensureDeferred(read())
        return await d.addTimeout(self.config.timeout, self._clock)

    def _set_role(self, role: str) -> None:
        self.role = role
        self.log.info(
            "agent {agent_id}: llama.cpp at {url} {what}",
            agent_id=self.agent_id, url=self.config.llamacpp,
            what="runs in router mode: reporting each of its models" if role == "router"
            else "is a single-model server again",
        )

    def _set_llamacpp_state(self, state: UpstreamState, error: str | None) -> None:
        if state is self.llamacpp_state:
            return
        self.llamacpp_state = state
        self.log.info(
            "agent {agent_id}: llama.cpp at {url} is {state}{reason}",
            agent_id=self.agent_id,
            url=self.config.llamacpp,
            state=state.value,
            reason=f": {error}" if error else "",
        )

    def _balancer_ok(self, answer: Any) -> None:
        previous = self._move(AgentEvent.REPORTED)
        if previous is not AgentState.REPORTING:
            self.log.info(
                "agent {agent_id}: reporting {again}to balancer {balancer}",
                agent_id=self.agent_id,
                again="" if previous is AgentState.STARTING else "again ",
                balancer=self._balancer,
            )
        self.balancer_error = None
        self.failures = 0
        self._retry_at = 0.0
        self.last_report_ok_at = self._clock.seconds()
        if isinstance(answer, dict):
            self.draining = bool(answer.get("draining"))

    def backoff(self) -> float:
        """Seconds to wait after C{failures} failed reports in a row (capped)."""
        return float(min(self.config.max_backoff, self.config.interval * 2 ** max(0, self.failures - 1)))

    def _balancer_failed(self, failure: Failure) -> None:
        self.failures += 1
        delay = self.backoff()
        self._retry_at = self._clock.seconds() + delay
        error = describe_failure(failure, self.config.timeout)
        self.balancer_error = error
        previous = self._move(AgentEvent.REJECTED if failure.check(BalancerRejected) else AgentEvent.FAILED)
        state = self.balancer_state
        if state is not previous:
            self.log.warn(
                "agent {agent_id}: balancer {balancer} {state}: {error}; retrying with backoff "
                "(up to {max_backoff:g}s)",
                agent_id=self.agent_id,
                balancer=self._balancer,
                state=state.value,
                error=error,
                max_backoff=self.config.max_backoff,
            )

    async def _request(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """
        One management API call with a deadline; the parsed JSON answer, or
        BalancerRejected. C{token}: the bearer token (by default this agent's
        own, else the management token: either may drain the agent's upstream).
        """
        headers = {b"content-type": [b"application/json"]}
        bearer = token or self.agent_token or self.config.management_token
        if bearer:
            headers[b"authorization"] = [b"Bearer " + bearer.encode("utf-8")]
        data = None if body is None else json.dumps(body).encode("utf-8")

        async def call() -> Any:
            response = await self._http.request(method, self._balancer + path, data=data, headers=headers)
            content = await read_body(response, limit=1024 * 1024)
            if response.code >= 400:
                raise BalancerRejected(response.code, error_message(content))
            return json.loads(content) if content else None

        d = ensureDeferred(call())
        return await d.addTimeout(self.config.timeout, self._clock)

    # -- draining on stop -------------------------------------------------

    async def _drain(self) -> None:
        path = f"/api/v1/upstreams/{self.upstream_id}"
        try:
            described = await self._request("POST", path + "/drain")
        except BalancerRejected as e:
            if e.code == 404:
                self.log.info("agent {agent_id}: not in the balancer's fleet, nothing to drain",
                              agent_id=self.agent_id)
                return
            raise
        in_flight = described.get("requests_in_flight", 0)
        self.log.info(
            "agent {agent_id}: draining {name} on the balancer, {in_flight} requests in flight",
            agent_id=self.agent_id, name=self.config.name, in_flight=in_flight,
        )
        deadline = self._clock.seconds() + self.config.drain_timeout
        while in_flight:
            if self._clock.seconds() >= deadline:
                self.log.warn(
                    "agent {agent_id}: {in_flight} requests still in flight after {timeout:g}s; "
                    "stopping anyway (the balancer removes the host when they end)",
                    agent_id=self.agent_id, in_flight=in_flight, timeout=self.config.drain_timeout,
                )
                break
            await deferLater(self._clock, self.config.drain_poll, lambda: None)
            try:
                described = await self._request("GET", path)
            except BalancerRejected as e:
                if e.code == 404:
                    return  # already removed (expired, deleted)
                raise
            in_flight = described.get("requests_in_flight", 0)
        try:
            await self._request("DELETE", path)
        except BalancerRejected as e:
            if e.code != 404:
                raise
        self.log.info("agent {agent_id}: {name} drained and removed from the balancer",
                      agent_id=self.agent_id, name=self.config.name)

    # -- status -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._clock.seconds()
        report = self.last_report or {}
        ok = self.balancer_state is AgentState.REPORTING and self.llamacpp_state is UpstreamState.HEALTHY
        return {
            "status": "ok" if ok else "degraded",
            "agent_id": self.agent_id,
            "name": self.config.name,
            "upstream_id": self.upstream_id,
            "draining": self.draining,
            "llamacpp": {
                "url": self.config.llamacpp,
                "external_url": self.external_url,
                "state": self.llamacpp_state.value,
                "error": report.get("error"),
                "slots_idle": report.get("slots_idle"),
                "slots_processing": report.get("slots_processing"),
                "slots_total": report.get("slots_total"),
                "model": report.get("model"),
                "role": self.role,
                "models": [
                    {"id": m.get("id"), "state": m.get("state")} for m in report.get("router_models", [])
                ],
            },
            "balancer": {
                "url": self._balancer,
                "state": self.balancer_state.value,
                "error": self.balancer_error,
                "last_report_age": None
                if self.last_report_ok_at is None
                else max(0.0, now - self.last_report_ok_at),
                "retry_in": max(0.0, self._retry_at - now),
            },
        }


class AgentProcess(MultiService):
    """The ``paddler agent`` process: the agent, its HTTP connections, its status listener."""

    def __init__(self, agent: AgentService) -> None:
        super().__init__()
        self.agent = agent


class AgentStatusApp:
    """``GET /health`` on ``--status-listen``: the agent's view of its server and balancer."""

    app = Klein()

    def __init__(self, agent: AgentService) -> None:
        self.agent = agent

    @app.route("/health", methods=["GET"])
    def health(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.agent.status()).encode("utf-8")


json_errors(AgentStatusApp.app, "agent status")
