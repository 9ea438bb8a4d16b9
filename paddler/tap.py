"""The composition root: the command line (built from the settings tables) and ``makeService``.

Only here is the global reactor imported, and only inside functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.service import IService
from twisted.python import usage

from paddler import __version__
from paddler.config import (
    AGENT_SETTINGS,
    BALANCER_SETTINGS,
    SIMULATE_SETTINGS,
    AgentConfig,
    BalancerConfig,
    SimulateConfig,
    build_agent_config,
    build_config,
)
from paddler.settings import ConfigError, Setting, from_sources, options_class
from paddler.web.listeners import endpoint_is_local

if TYPE_CHECKING:
    from paddler.agent.service import AgentProcess
    from paddler.balancer.service import BalancerService


def _with_synopsis(base: type[usage.Options], line: str) -> type[usage.Options]:
    """C{base} whose usage line is C{line}, whatever runs it (``paddler`` or ``twistd paddler``)."""

    class WithSynopsis(base):  # type: ignore[misc, valid-type]
        def getSynopsis(self) -> str:
            return f"Usage: {line}"

        def opt_version(self) -> None:
            """Print paddler's version and exit."""
            print(f"paddler {__version__}")  # noqa: T201 - usage output, before logging starts
            raise SystemExit(0)

    return WithSynopsis


def _store(options: usage.Options, settings: list[Setting], config: Any) -> None:
    """Keep the parsed config on C{options}, and each value under its flag name."""
    options.config = config  # type: ignore[attr-defined]
    for s in settings:
        value = getattr(config, s.name)
        options[s.option] = (not value) if s.is_flag and s.default is True else value


# -- paddler balancer ---------------------------------------------------------


def _build_balancer(options: usage.Options, given: dict[str, Any]) -> None:
    options.given = given  # type: ignore[attr-defined]  # kept for reloads
    config = build_config(given, options.upstreams, os.environ, options["config"])  # type: ignore[attr-defined]
    _check_management_exposure(config)
    _store(options, BALANCER_SETTINGS, config)


def _check_management_exposure(config: BalancerConfig) -> None:
    """Refuse a management API reachable from other hosts without a token."""
    if config.management_token or config.management_insecure:
        return
    if not endpoint_is_local(config.management_listen):
        raise ConfigError(
            f"--management-listen {config.management_listen!r} is reachable from other hosts: "
            "set --management-token (or PADDLER_MANAGEMENT_TOKEN), or pass --management-insecure"
        )


_BalancerBase = _with_synopsis(
    options_class(
        BALANCER_SETTINGS,
        "[options]",
        "Run the slot-aware load balancer in front of llama.cpp servers. Settings come "
        "from flags, then PADDLER_* environment variables (PADDLER_UPSTREAMS=url,name=url,...), "
        "then the --config TOML file; every one is listed in docs/configuration.md.",
        _build_balancer,
        [["config", "c", None, "TOML file with settings and [[upstream]] tables (or PADDLER_CONFIG)."]],
    ),
    "paddler balancer [options]",
)


class BalancerOptions(_BalancerBase):  # type: ignore[misc, valid-type]
    """``paddler balancer``: the slot-aware reverse proxy."""

    def __init__(self) -> None:
        super().__init__()
        self.upstreams: list[str] = []

    def opt_upstream(self, value: str) -> None:
        """A llama.cpp server: URL or NAME=URL (repeatable)."""
        self.upstreams.append(value)

    def reload_config(self) -> BalancerConfig:
        """The configuration as the file and the environment say now; the flags given still win."""
        config = build_config(self.given, self.upstreams, os.environ, self["config"])
        _check_management_exposure(config)
        return config


# -- paddler agent ------------------------------------------------------------


def _build_agent(options: usage.Options, given: dict[str, Any]) -> None:
    _store(options, AGENT_SETTINGS, build_agent_config(given, os.environ))


AgentOptions = _with_synopsis(
    options_class(
        AGENT_SETTINGS,
        "--llamacpp URL --balancer URL [options]",
        "Poll a local llama.cpp server's slots and report them to a paddler balancer's "
        "management API every interval. On SIGTERM, drain the host on the balancer and "
        "wait for its requests to finish.",
        _build_agent,
    ),
    "paddler agent --llamacpp URL --balancer URL [options]",
)


# -- paddler simulate ---------------------------------------------------------


def _build_simulate(options: usage.Options, given: dict[str, Any]) -> None:
    config = SimulateConfig(**from_sources(SIMULATE_SETTINGS, given, {}, {}))
    if config.fleet > 1:
        from paddler.simulator.service import endpoint_port, endpoint_with_port_offset

        kind = config.listen.split(":", 1)[0]
        if kind not in ("tcp", "tcp6"):
            raise ConfigError(f"--fleet above 1 needs a tcp: --listen endpoint, got {config.listen!r}")
        try:
            last = endpoint_port(endpoint_with_port_offset(config.listen, config.fleet - 1))
        except ValueError as e:
            raise ConfigError(f"--listen: {e}") from None
        if last > 65535:
            raise ConfigError(f"--fleet {config.fleet} from --listen {config.listen!r} runs past port 65535")
    _store(options, SIMULATE_SETTINGS, config)


SimulateOptions = _with_synopsis(
    options_class(
        SIMULATE_SETTINGS,
        "[options]",
        "Run simulated llama.cpp servers (llama-server's HTTP API with slots, queueing, "
        "streaming and timings) for demos, tests and capacity planning.",
        _build_simulate,
    ),
    "paddler simulate [options]",
)


class Options(_with_synopsis(usage.Options, "paddler balancer|agent|simulate [options]")):  # type: ignore[misc]
    """``paddler`` (or ``twistd paddler``): choose a subcommand."""

    subCommands = [
        ["balancer", None, BalancerOptions, "Run the slot-aware load balancer."],
        ["agent", None, AgentOptions, "Report a llama.cpp server to a balancer."],
        ["simulate", None, SimulateOptions, "Run simulated llama.cpp servers."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a subcommand: balancer, agent or simulate")


# -- services -----------------------------------------------------------------


def makeService(options: Any) -> IService:
    """Build the service tree for the chosen subcommand."""
    from twisted.internet import reactor

    sub = options.subOptions
    if options.subCommand == "simulate":
        from paddler.simulator.service import makeSimulatorService

        return makeSimulatorService(sub, reactor)
    if options.subCommand == "balancer":
        return makeBalancerService(sub.config, reactor, sub.reload_config)
    return makeAgentService(sub.config, reactor)


def makeAgentService(config: AgentConfig, reactor: Any) -> AgentProcess:
    """Wire ``paddler agent``: the report loop, its HTTP client, the optional status listener."""
    from twisted.web.client import Agent
    from treq.client import HTTPClient

    from paddler.agent.service import AgentProcess, AgentService, AgentStatusApp
    from paddler.web.clients import ConnectionPoolService, connection_pool
    from paddler.web.listeners import ListeningService, QuietSite

    connections = connection_pool(reactor, 2)
    agent = AgentService(config, HTTPClient(Agent(reactor, pool=connections, connectTimeout=config.timeout)), reactor)
    top = AgentProcess(agent)
    ConnectionPoolService(connections).setServiceParent(top)
    agent.setServiceParent(top)
    if config.status_listen:
        ListeningService(
            reactor,
            config.status_listen,
            QuietSite(AgentStatusApp(agent).app.resource()),
            "paddler agent status",
            "/health",
        ).setServiceParent(top)
    return top


def makeBalancerService(
    config: BalancerConfig, reactor: Any, reload_config: Callable[[], BalancerConfig] | None = None
) -> BalancerService:
    """
    Wire the balancer: pool, chooser, probes, proxy, management port (and what
    rides on them). C{reload_config} reads the configuration again for a
    reload (SIGHUP); without it the balancer has nothing to reload.
    """
    from twisted.web.server import Site

    from paddler.balancer.proxy import ProxyConfig, ProxyResource
    from paddler.balancer.reload import Reloader
    from paddler.fleet.pool import UpstreamPool
    from paddler.fleet.probe import HTTPProber, ProbeService
    from paddler.fleet.registry import AgentRegistry
    from paddler.fleet.static import SimulatedUpstreamsService, StaticUpstreamsService
    from paddler.management.api import ManagementAPI
    from paddler.management.validation import MAX_BODY
    from paddler.observability.dashboard import ObservabilityApp
    from paddler.observability.prometheus import PrometheusMetrics
    from paddler.observability.requests import RequestStats
    from paddler.observability.snapshot import StateHistory, build_state
    from paddler.observability.stream import ObservabilityService, StateStream
    from paddler.routing.policies import CHOOSERS
    from paddler.web.clients import CACHED_CONNECTION_TIMEOUT, UpstreamClientService
    from paddler.web.upstream_client import UpstreamClient
    from paddler.web.listeners import ListeningService, QuietSite
    from paddler.web.request import bounded_request_factory
    from paddler.web.router import PrefixRouter

    from paddler.balancer.service import BalancerService

    pool = UpstreamPool(
        reactor,
        CHOOSERS[config.policy](reactor),
        max_buffered=config.max_buffered_requests,
        buffer_timeout=config.buffered_request_timeout,
    )
    stats = RequestStats(reactor)
    upstream_client = UpstreamClient(
        reactor,
        connect_timeout=min(10.0, config.upstream_timeout),
        max_idle_per_host=64,
        idle_timeout=CACHED_CONNECTION_TIMEOUT,
    )
    proxy = ProxyResource(
        pool,
        upstream_client,
        reactor,
        ProxyConfig.from_balancer(config),
        stats,
    )
    top = BalancerService(config, reactor, pool, stats, proxy, shutdown_timeout=config.shutdown_timeout)

    static = StaticUpstreamsService(pool, config.upstreams, reactor)
    static.setServiceParent(top)
    if config.simulated_fleet:
        from paddler.simulator.engine import SimulatorConfig
        from paddler.simulator.service import SimulatedFleetService

        fleet = SimulatedFleetService(
            reactor,
            [
                SimulatorConfig(
                    slots=4 if i % 2 == 0 else 2, tokens_per_second=40.0 if i % 2 == 0 else 20.0, seed=i
                )
                for i in range(config.simulated_fleet)
            ],
        )
        fleet.setServiceParent(top)
        SimulatedUpstreamsService(pool, fleet, reactor).setServiceParent(top)
    UpstreamClientService(upstream_client).setServiceParent(top)

    # probes keep one connection per upstream alive (reads every interval, llama-server closes after 5 s)
    probe_client = UpstreamClient(
        reactor,
        connect_timeout=config.probe_timeout,
        max_idle_per_host=1,
        idle_timeout=CACHED_CONNECTION_TIMEOUT,
    )
    UpstreamClientService(probe_client).setServiceParent(top)
    prober = HTTPProber(
        probe_client,
        reactor,
        pool,
        timeout=config.probe_timeout,
        unhealthy_after=config.unhealthy_after,
        mode=config.probe_mode,
        api_key=config.llamacpp_api_key,
    )
    top.probes = ProbeService(pool, prober, reactor, interval=config.probe_interval)
    top.probes.setServiceParent(top)

    # A client connection idle between requests (or slow to send one) is
    # closed after CLIENT_IDLE_TIMEOUT; while a request runs Twisted suspends it.
    site = (Site if config.access_log else QuietSite)(
        proxy,
        requestFactory=bounded_request_factory(config.max_request_body),
        timeout=CLIENT_IDLE_TIMEOUT,
        parsePOSTFormSubmission=False,  # bodies are relayed, never parsed as forms
    )
    site.displayTracebacks = False
    site.noisy = False
    top.proxy_listener = ListeningService(reactor, config.listen, site, "paddler balancer proxy")
    top.proxy_listener.setServiceParent(top)

    top.registry = AgentRegistry(pool, reactor, expiry=config.agent_expiry)
    top.registry.setServiceParent(top)
    management = ManagementAPI(pool, top.registry, reactor, probes=top.probes, token=config.management_token)

    history = StateHistory()

    def fleet_state(with_history: bool) -> dict[str, Any]:
        return build_state(pool, stats, reactor, history if with_history else None)

    state_stream = StateStream(reactor, fleet_state)
    ObservabilityService(pool, stats, reactor, history, state_stream).setServiceParent(top)
    observability = ObservabilityApp(
        fleet_state, state_stream, PrometheusMetrics(pool, stats), dashboard=config.dashboard
    ).resource()
    if config.statsd is not None:
        from paddler.config import parse_statsd_address
        from paddler.observability.statsd import StatsDClient, StatsDService

        statsd_host, statsd_port = parse_statsd_address(config.statsd)
        StatsDService(
            StatsDClient(reactor, statsd_host, statsd_port, config.statsd_prefix),
            pool, stats, reactor, interval=config.statsd_interval,
        ).setServiceParent(top)

    # Bodies are stored before any handler (or token check) runs: keep at most MAX_BODY.
    management_site = QuietSite(
        PrefixRouter(
            [(b"/api/v1/state", observability), (b"/dashboard", observability), (b"/metrics", observability)],
            management.app.resource(),
        ),
        requestFactory=bounded_request_factory(MAX_BODY),
        timeout=CLIENT_IDLE_TIMEOUT,
        parsePOSTFormSubmission=False,
    )
    top.management_listener = ListeningService(
        reactor, config.management_listen, management_site, "paddler management"
    )
    top.management_listener.setServiceParent(top)
    if reload_config is not None:
        top.reloader = Reloader(top, reload_config, prober).reload
    top.on_signal = lambda signum, handler: _on_signal(reactor, signum, handler)
    return top


def _on_signal(reactor: Any, signum: int, handler: Callable[[], object]) -> None:
    """Run C{handler} in the reactor thread whenever the process gets C{signum}."""
    import signal

    signal.signal(signum, lambda *_: reactor.callFromThread(handler))


#: Seconds a client connection may stay idle between requests.
CLIENT_IDLE_TIMEOUT = 120.0


def run(options: Any, stderr: Any) -> int:
    """
    Run the service of the parsed C{options} in the foreground until it is
    stopped; return the exit status (the ``paddler`` console script).
    """
    import signal

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from twisted.internet.error import CannotListenError

    from paddler.logs import observer
    from paddler.web.listeners import ListenFailed

    globalLogBeginner.beginLoggingTo([observer()], redirectStandardIO=False)
    service = makeService(options)
    try:
        service.privilegedStartService()
        service.startService()
    except (ListenFailed, CannotListenError) as e:
        print(f"paddler {options.subCommand}: error: {e}", file=stderr)  # noqa: T201
        return 1
    stopping: list[bool] = []

    def stop() -> None:
        if stopping:  # asked again while stopping gracefully: stop now
            reactor.stop()
            return
        stopping.append(True)
        service.stopService().addBoth(lambda _: reactor.stop())  # type: ignore[union-attr]

    for signum in (signal.SIGTERM, signal.SIGINT):
        _on_signal(reactor, signum, stop)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    return 0
