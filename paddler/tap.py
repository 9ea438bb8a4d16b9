"""The composition root: the command line (built from the settings tables) and ``makeService``.

Only here is the global reactor imported, and only inside functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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
    resolve_at_start,
    vet_upstreams,
)
from paddler.settings import ConfigError, Setting, from_sources, options_class
from paddler.server.listeners import endpoint_is_local

if TYPE_CHECKING:
    from paddler.agent.service import AgentProcess
    from paddler.balancer.proxy import ProxyResource
    from paddler.balancer.service import BalancerService
    from paddler.fleet.pool import UpstreamPool
    from paddler.fleet.probe import HTTPProber, ProbeService
    from paddler.observability.requests import RequestStats
    from paddler.sharedstate.fleet import SharedFleet
    from paddler.server.channel import ClientLimits
    from paddler.server.listeners import ListeningService
    from paddler.upstream.client import UpstreamClient


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
    # Names of configured upstreams are resolved once here, before the reactor runs (bounded).
    vet_upstreams(config, resolve_at_start)
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
    if config.models_fail_load and config.models:
        from paddler.simulator.router import parse_failing, parse_models

        unknown = set(parse_failing(config.models_fail_load)) - set(parse_models(config.models))
        if unknown:
            raise ConfigError(f"--models-fail-load names models not in --models: {', '.join(sorted(unknown))}")
    elif config.models_fail_load:
        raise ConfigError("--models-fail-load needs --models (router mode)")
    if config.sleep_idle_seconds and not config.models:
        raise ConfigError("--sleep-idle-seconds needs --models (router mode)")
    _store(options, SIMULATE_SETTINGS, config)


_SimulateBase = _with_synopsis(
    options_class(
        SIMULATE_SETTINGS,
        "[options]",
        "Run simulated llama.cpp servers (llama-server's HTTP API with slots, queueing, "
        "streaming and timings) for demos, tests and capacity planning.",
        _build_simulate,
    ),
    "paddler simulate [options]",
)


class SimulateOptions(_SimulateBase):  # type: ignore[misc, valid-type]
    """``paddler simulate``: simulated llama-servers (router mode with ``--models``)."""

    def opt_models_autoload(self) -> None:
        """Router mode: load models on demand (the default; llama-server's flag)."""
        self["no-models-autoload"] = False

    opt_models_autoload.__doc__ = "Router mode: load a model when a request names it (the default)."


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
        from paddler.config import build_logging_config

        try:
            build_logging_config(os.environ)  # PADDLER_LOG_LEVEL: a typo stops here, not at the first line
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


# -- services -----------------------------------------------------------------


def makeService(options: Any) -> IService:
    """Build the service tree for the chosen subcommand."""
    from twisted.internet import reactor

    sub = options.subOptions
    _raise_open_files_limit()
    if options.subCommand == "simulate":
        from paddler.simulator.service import makeSimulatorService

        return makeSimulatorService(sub, reactor)
    if options.subCommand == "balancer":
        return makeBalancerService(sub.config, reactor, sub.reload_config, getattr(options, "argv", None))
    return makeAgentService(sub.config, reactor)


def _raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each client connection takes a descriptor); log it."""
    from twisted.logger import Logger

    from paddler.server.descriptors import raise_open_files_limit

    before, after = raise_open_files_limit()
    log = Logger(namespace="paddler")
    if before == after:
        log.info("open files limit (RLIMIT_NOFILE): {limit}", limit="unlimited" if after is None else after)
    else:
        log.info(
            "open files limit (RLIMIT_NOFILE): raised from {before} to {after} (the hard limit)",
            before=before,
            after="unlimited" if after is None else after,
        )


def makeAgentService(config: AgentConfig, reactor: Any) -> AgentProcess:
    """Wire ``paddler agent``: the report loop, its HTTP client, the optional status listener."""
    from twisted.web.client import Agent
    from treq.client import HTTPClient

    from paddler.agent.service import AgentProcess, AgentService, AgentStatusApp
    from paddler.upstream.clients import ConnectionPoolService, connection_pool
    from paddler.server.listeners import ListeningService, QuietSite

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


@dataclass(frozen=True)
class Identity:
    """Who this balancer is in every answer (paddler.server.instance): its instance id and its Via token.
    The workers of --workers share both (worker 0 passes them down in the environment), as they share
    one proxy port."""

    instance_id: str
    loop_token: str


@dataclass(frozen=True)
class Core:
    """The request path: the pool (and its policy), the request counters, the upstream client, the proxy."""

    pool: UpstreamPool
    stats: RequestStats
    upstream_client: UpstreamClient
    proxy: ProxyResource


@dataclass(frozen=True)
class Probing:
    """How the fleet is read: the prober, the probe loops, the shared state's side (--state, else None),
    and the services to start, in order."""

    prober: HTTPProber
    probes: ProbeService
    shared: SharedFleet | None
    services: tuple[IService, ...]


@dataclass(frozen=True)
class Observing:
    """What the management port shows beside the API (state, dashboard, /metrics) and the services that
    feed it, in order."""

    resource: Any
    services: tuple[IService, ...]


def makeBalancerService(
    config: BalancerConfig,
    reactor: Any,
    reload_config: Callable[[], BalancerConfig] | None = None,
    argv: list[str] | None = None,
) -> BalancerService:
    """
    Wire the balancer: pool, chooser, probes, proxy, management port (and what
    rides on them). C{reload_config} reads the configuration again for a
    reload (SIGHUP); without it the balancer has nothing to reload. C{argv}
    is the command line, for the workers of C{--workers} (the ``paddler``
    command passes it; ``twistd paddler`` cannot run workers).
    """
    from paddler.balancer.reload import Reloader
    from paddler.balancer.service import BalancerService
    from paddler.fleet.addresses import AddressVetter, reactor_resolver
    from paddler.fleet.registry import AgentRegistry
    from paddler.upstream.clients import UpstreamClientService
    from paddler.server.descriptors import open_files_limit
    from paddler.server.memory import BodyMemory

    _write_flush(config, reactor)
    core = _build_core(config, reactor)
    identity = _identity(config)
    probing = _build_probing(config, reactor, core, identity.instance_id)
    memory = BodyMemory(config.max_request_bodies_memory)
    limits = _client_limits(config)
    site = _proxy_site_of(config, reactor, core, identity, limits, memory)
    registry = AgentRegistry(
        core.pool, reactor, expiry=config.agent_expiry,
        report_age=probing.shared.report_age if probing.shared is not None else None,
        reader=probing.prober.read, check_every=config.probe_interval,
    )
    core.pool.registering = registry.registering
    top = BalancerService(
        config, reactor, core.pool, core.stats, core.proxy, shutdown_timeout=config.shutdown_timeout,
        instance_id=identity.instance_id, body_memory=memory, probes=probing.probes, registry=registry,
        sites=[site], proxy_listener=_proxy_listener(config, reactor, site),
        on_signal=lambda signum, handler: _on_signal(reactor, signum, handler),
    )
    for service in _upstream_services(config, reactor, core.pool):
        service.setServiceParent(top)
    UpstreamClientService(core.upstream_client).setServiceParent(top)
    for service in probing.services:
        service.setServiceParent(top)
    registry.setServiceParent(top)
    top.vetter = AddressVetter(  # it must know the balancer's own listeners (an upstream there is itself)
        reactor, resolve=reactor_resolver(reactor), own=top.own_listeners, allowed=config.allow_upstream_network
    )
    observing = _build_observing(config, reactor, core, probing, registry)
    for service in observing.services:
        service.setServiceParent(top)
    management_site = _management_site(config, reactor, top, core, probing, observing, limits)
    top.sites.append(management_site)
    top.management_listener = _management_listener(config, reactor, management_site)
    top.management_listener.setServiceParent(top)
    # Bound last: a process that cannot start takes no client connection (with SO_REUSEPORT the
    # kernel would queue some on a worker's socket and reset them when the worker exits).
    top.proxy_listener.setServiceParent(top)  # type: ignore[union-attr]
    if config.workers > 1 and not config.worker_index:
        if argv is None:
            raise ConfigError("--workers needs the paddler command (twistd paddler runs one process)")
        _supervise_workers(top, config, reactor, argv)
    elif config.worker_index:
        top.signal_handlers = _worker_signal_handlers(top)
    if reload_config is not None:
        top.reloader = Reloader(top, reload_config, probing.prober, open_files=open_files_limit).reload
    return top


def _write_flush(config: BalancerConfig, reactor: Any) -> None:
    """Turn the write flush of client and upstream connections on or off (paddler/flush.py), and say so."""
    from twisted.logger import Logger

    from paddler import flush

    if config.flush_before_poll:
        flushing = flush.enable(reactor) is not None
    else:
        flush.disable(reactor)
        flushing = False
    Logger(namespace="paddler").info(
        "reactor {reactor}, write flush {flush}", reactor=type(reactor).__name__, flush="on" if flushing else "off"
    )


def _build_core(config: BalancerConfig, reactor: Any) -> Core:
    from paddler.balancer.proxy import ProxyConfig, ProxyResource
    from paddler.fleet.pool import UpstreamPool
    from paddler.observability.requests import RequestStats
    from paddler.routing.policies import CHOOSERS
    from paddler.upstream.clients import CACHED_CONNECTION_TIMEOUT
    from paddler.upstream.client import UpstreamClient

    pool = UpstreamPool(
        reactor,
        CHOOSERS[config.policy](reactor),
        max_buffered=config.max_buffered_requests,
        buffer_timeout=config.buffered_request_timeout,
        no_upstream_timeout=config.no_upstream_timeout,
    )
    pool.recheck_interval = config.probe_interval
    stats = RequestStats(reactor)
    upstream_client = UpstreamClient(
        reactor,
        connect_timeout=min(10.0, config.upstream_timeout),
        max_idle_per_host=config.upstream_keepalive,
        idle_timeout=CACHED_CONNECTION_TIMEOUT,
    )
    proxy = ProxyResource(pool, upstream_client, reactor, ProxyConfig.from_balancer(config), stats)
    # a connection dropped for unexpected bytes is counted on its upstream and logged with its name
    upstream_client.on_dropped = proxy.connection_dropped
    return Core(pool, stats, upstream_client, proxy)


def _identity(config: BalancerConfig) -> Identity:
    from paddler.server.instance import new_instance_id

    inherited = os.environ if config.worker_index else {}
    identity = Identity(
        inherited.get("PADDLER_INSTANCE_ID") or new_instance_id(),
        inherited.get("PADDLER_LOOP_TOKEN") or new_instance_id(),
    )
    if config.workers > 1 and not config.worker_index:
        os.environ["PADDLER_INSTANCE_ID"], os.environ["PADDLER_LOOP_TOKEN"] = identity.instance_id, identity.loop_token
    return identity


def _upstream_services(config: BalancerConfig, reactor: Any, pool: UpstreamPool) -> list[IService]:
    """Where upstreams come from at start: the configuration, and the demo fleet (--simulated-fleet)."""
    from paddler.fleet.static import SimulatedUpstreamsService, StaticUpstreamsService

    services: list[IService] = [StaticUpstreamsService(pool, config.upstreams, reactor)]
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
        services += [fleet, SimulatedUpstreamsService(pool, fleet, reactor)]
    return services


def _build_probing(config: BalancerConfig, reactor: Any, core: Core, instance_id: str) -> Probing:
    from paddler.fleet.probe import HTTPProber, ProbeService
    from paddler.sharedstate.fleet import SharedProber
    from paddler.upstream.clients import CACHED_CONNECTION_TIMEOUT, UpstreamClientService
    from paddler.upstream.client import UpstreamClient

    # probes keep one connection per upstream alive (reads every interval, llama-server closes after 5 s)
    probe_client = UpstreamClient(
        reactor,
        connect_timeout=config.probe_timeout,
        max_idle_per_host=1,
        idle_timeout=CACHED_CONNECTION_TIMEOUT,
    )
    probe_client.on_dropped = core.proxy.connection_dropped
    services: list[IService] = [UpstreamClientService(probe_client)]
    prober = HTTPProber(
        probe_client,
        reactor,
        core.pool,
        timeout=config.probe_timeout,
        unhealthy_after=config.unhealthy_after,
        mode=config.probe_mode,
        api_key=config.llamacpp_api_key,
        instance_id=instance_id,
    )
    probing: Any = prober
    shared = None
    if config.state:
        shared = _shared_fleet(config, reactor, core.pool)
        services.append(shared)
        probing = SharedProber(prober, shared)
    probes = ProbeService(core.pool, probing, reactor, interval=config.probe_interval)
    services.append(probes)
    return Probing(prober, probes, shared, tuple(services))


def _client_limits(config: BalancerConfig) -> ClientLimits:
    """
    Slow clients: a deadline for each request's head, a rate for its body,
    an idle timeout between requests, a cap on open connections per
    listener that fits the open-files limit, and one budget of memory for
    every request body held at once (see paddler.server.channel).
    """
    from twisted.logger import Logger

    from paddler.server.descriptors import cap_explained, limits_for, open_files_limit

    limits = limits_for(config, open_files_limit())
    if limits.max_connections < config.max_connections:
        Logger(namespace="paddler").warn(
            "--max-connections {wanted} lowered to {cap}: the process may open {files} files "
            "(RLIMIT_NOFILE); raise the hard limit (ulimit -Hn, systemd LimitNOFILE=) for more ({why})",
            wanted=config.max_connections,
            cap=limits.max_connections,
            files=open_files_limit(),
            why=cap_explained(config.max_connections, open_files_limit()),
        )
    else:
        Logger(namespace="paddler").info(
            "{why}", why=cap_explained(config.max_connections, open_files_limit()), cap=limits.max_connections
        )
    return limits


def _proxy_site_of(
    config: BalancerConfig, reactor: Any, core: Core, identity: Identity, limits: ClientLimits, memory: Any
) -> Any:
    from paddler.errors import PaddlerHTTPError, outcome_of

    def answered_early(error: PaddlerHTTPError) -> None:
        core.stats.record(error.status, 0.0, outcome=outcome_of(error))

    return proxy_site(
        core.proxy,
        reactor,
        access_log=config.access_log,
        limits=limits,
        memory=memory,
        instance_id=identity.instance_id,
        loop_token=identity.loop_token,
        on_answered=answered_early,
        parser=config.request_parser,
    )


def _proxy_listener(config: BalancerConfig, reactor: Any, site: Any) -> ListeningService:
    from paddler.server.listeners import ListeningService

    if config.workers > 1 or config.worker_index:
        from paddler.balancer.workers import ReusePortListeningService

        return ReusePortListeningService(
            reactor, config.listen, site, f"paddler balancer proxy (worker {config.worker_index})"
        )
    return ListeningService(reactor, config.listen, site, "paddler balancer proxy")


def _build_observing(
    config: BalancerConfig, reactor: Any, core: Core, probing: Probing, registry: Any
) -> Observing:
    from paddler.observability.dashboard import ObservabilityApp
    from paddler.observability.events import FleetEvents
    from paddler.observability.prometheus import PrometheusMetrics
    from paddler.observability.snapshot import FleetView, StateHistory
    from paddler.observability.stream import ObservabilityService, StateStream

    pool, stats = core.pool, core.stats
    history = StateHistory()
    events = FleetEvents(reactor)
    view = FleetView(pool, stats, reactor, history, events, token_required=bool(config.management_token))
    state_stream = StateStream(reactor, view)
    services: list[IService] = [ObservabilityService(pool, stats, reactor, history, state_stream, events)]
    metrics = PrometheusMetrics(pool, stats)
    metrics.collector.extra.append(registry.metrics)
    if probing.shared is not None:
        metrics.collector.extra.append(probing.shared.metrics)
    if config.router_events:
        from paddler.fleet.router_events import RouterEvents, sse_opener

        services.append(RouterEvents(
            pool, reactor, sse_opener(core.upstream_client, config.llamacpp_api_key), probing.probes.probe_now,
            follows=pool.shared.probes if pool.shared is not None else None,
        ))
    if config.model_placement:
        from paddler.fleet.placement import ModelPlacement, json_poster

        placement = ModelPlacement(
            pool, reactor, json_poster(core.upstream_client, config.llamacpp_api_key), probing.probes.probe_now,
            events, interval=min(0.5, config.probe_interval), min_residency=config.model_min_residency,
            load_timeout=config.model_load_timeout, replicas_max=config.model_replicas_max,
            demand_window=config.model_demand_window, replica_after=config.model_replica_after,
            claims=pool.shared.store if pool.shared is not None else None,
        )
        services.append(placement)
        metrics.collector.extra.append(placement.metrics)
    resource = ObservabilityApp(view.state, state_stream, metrics, dashboard=config.dashboard).resource()
    if config.statsd is not None:
        from paddler.config import parse_statsd_address
        from paddler.observability.statsd import StatsDClient, StatsDService

        statsd_host, statsd_port = parse_statsd_address(config.statsd)
        services.append(
            StatsDService(
                StatsDClient(reactor, statsd_host, statsd_port, config.statsd_prefix),
                pool, stats, reactor, interval=config.statsd_interval,
            )
        )
    return Observing(resource, tuple(services))


def _management_site(
    config: BalancerConfig,
    reactor: Any,
    top: BalancerService,
    core: Core,
    probing: Probing,
    observing: Observing,
    limits: ClientLimits,
) -> Any:
    """The management port: the API (it must know the balancer's own URLs), the state, the dashboard, /metrics."""
    from paddler.fleet.placement import json_poster
    from paddler.management.api import ManagementAPI
    from paddler.management.validation import MAX_BODY
    from paddler.server.channel import GuardedSite
    from paddler.server.request import bounded_request_factory
    from paddler.server.router import PrefixRouter

    management = ManagementAPI(
        core.pool, top.registry, reactor, probes=probing.probes, token=config.management_token,
        own_urls=top.own_urls, vetter=top.vetter, post=json_poster(core.upstream_client, config.llamacpp_api_key),
    )
    observability = observing.resource
    # Bodies are stored before any handler (or token check) runs: keep at most MAX_BODY.
    return GuardedSite(
        PrefixRouter(
            [(b"/api/v1/state", observability), (b"/dashboard", observability), (b"/metrics", observability)],
            management.app.resource(),
        ),
        limits,
        reactor,
        "paddler management",
        request_factory=bounded_request_factory(MAX_BODY, top.body_memory, top.instance_id),
        instance_id=top.instance_id,
    )


def _management_listener(config: BalancerConfig, reactor: Any, site: Any) -> ListeningService:
    """The management port's listener (each worker of --workers on its own port: the base port + its index)."""
    from paddler.server.listeners import ListeningService

    management_listen = config.management_listen
    if config.worker_index:
        from paddler.balancer.workers import reuse_port_endpoint, with_port

        parsed = reuse_port_endpoint(management_listen)
        if parsed is not None and parsed[1]:
            management_listen = with_port(management_listen, parsed[1] + config.worker_index)
    return ListeningService(reactor, management_listen, site, "paddler management")


def _worker_signal_handlers(top: BalancerService) -> dict[int, Callable[[], object]]:
    """SIGHUP goes to worker 0, which reloads every worker; SIGUSR1 comes from it."""
    import signal

    from paddler.balancer.workers import forward_reload_to_supervisor

    def hup_on_worker() -> None:
        if not forward_reload_to_supervisor():
            top.reload()  # no supervisor any more: reload this process alone

    return {signal.SIGHUP: hup_on_worker, signal.SIGUSR1: top.reload}


def _supervise_workers(top: BalancerService, config: BalancerConfig, reactor: Any, argv: list[str]) -> None:
    """Worker 0 starts the others once its proxy port is bound (port 0 is resolved by then)."""
    import signal

    from twisted.application.service import Service

    from paddler.balancer.workers import WorkerSupervisor, with_port

    class Start(Service):
        def startService(self) -> None:
            super().startService()
            port = top.proxy_listener.address.port  # type: ignore[union-attr]
            supervisor.argv = [*argv, "--listen", with_port(config.listen, port), "--simulated-fleet", "0"]
            supervisor.startService()

    supervisor = WorkerSupervisor(reactor, argv, config.workers, config.shutdown_timeout)
    Start().setServiceParent(top)
    top.on_stopping.append(supervisor.stopService)

    def reload_all() -> None:
        top.reload()
        supervisor.reload_workers()

    top.signal_handlers = {signal.SIGHUP: reload_all}


def proxy_site(
    proxy: Any,
    reactor: Any,
    access_log: bool = False,
    limits: Any = None,
    memory: Any = None,
    instance_id: str | None = None,
    loop_token: str | None = None,
    on_answered: Callable[[Any], None] | None = None,
    parser: str | None = None,
) -> Any:
    """
    The proxy port's C{Site} (a L{paddler.server.channel.GuardedSite}): bodies
    bounded by C{proxy.config.max_request_body} and claimed from C{memory},
    request targets checked, C{limits} on slow clients and open connections
    (the defaults of L{paddler.server.channel.ClientLimits} when not given), on
    C{reactor}'s clock; answers marked with C{instance_id}, forwarded
    requests with the C{Via} token C{loop_token} (a new one when not given);
    request heads parsed by C{parser} (C{--request-parser}).
    """
    from paddler.server.channel import ClientLimits, GuardedSite
    from paddler.server.instance import new_instance_id
    from paddler.server.request import bounded_request_factory

    return GuardedSite(
        proxy,
        limits if limits is not None else ClientLimits(),
        reactor,
        "paddler balancer proxy",
        request_factory=bounded_request_factory(
            proxy.config.max_request_body, memory, instance_id, loop_token=loop_token or new_instance_id(),
            max_body_setting="--max-request-body",
        ),
        instance_id=instance_id,
        access_log=access_log,
        on_answered=on_answered,
        parser=parser,
    )


def _on_signal(reactor: Any, signum: int, handler: Callable[[], object]) -> None:
    """Run C{handler} in the reactor thread whenever the process gets C{signum}."""
    import signal

    signal.signal(signum, lambda *_: reactor.callFromThread(handler))


def _shared_fleet(config: BalancerConfig, reactor: Any, pool: Any) -> Any:
    """The shared-state side of the pool (--state): a Redis slot store and the fleet bound to it."""
    import socket
    import uuid

    from paddler.fleet.upstream import upstream_id
    from paddler.sharedstate.fleet import SharedFleet
    from paddler.sharedstate.redisstore import RedisSlotStore

    owner = f"{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    from paddler.sharedstate.client import parse_state_url

    store = RedisSlotStore(
        reactor,
        parse_state_url(config.state, config.state_password),  # type: ignore[arg-type]
        owner,
        prefix=config.state_prefix,
        lease_ttl=config.state_lease_ttl,
        wait=config.buffered_request_timeout,
        max_waiting=config.max_buffered_requests,
    )
    shared = SharedFleet(pool, store, reactor, static_ids=frozenset(upstream_id(s.url) for s in config.upstreams))
    pool.slots = shared
    return shared


#: The default of --client-idle-timeout: seconds a client connection may stay idle between requests.
CLIENT_IDLE_TIMEOUT = BalancerConfig.client_idle_timeout


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
    from paddler.server.listeners import ListenFailed

    globalLogBeginner.beginLoggingTo([observer()], redirectStandardIO=False)
    service = makeService(options)
    try:
        service.privilegedStartService()
        service.startService()
    except (ListenFailed, CannotListenError) as e:
        print(f"paddler {options.subCommand}: error: {e}", file=stderr)  # noqa: T201
        return 1
    stopping: list[bool] = []

    def halt(_: object = None) -> None:
        if reactor.running:
            reactor.stop()

    def stop(force: bool) -> None:
        if stopping:
            # A second Ctrl-C stops at once; SIGTERM may come twice (to the process group
            # and from worker 0 to its workers): the graceful stop goes on.
            if force:
                halt()
            return
        stopping.append(True)
        service.stopService().addBoth(halt)  # type: ignore[union-attr]

    def own_signals() -> None:
        # Twisted's handlers stay for SIGCHLD (the workers of --workers are reaped by them);
        # SIGTERM and SIGINT are ours: a graceful stop instead of reactor.stop().
        _on_signal(reactor, signal.SIGTERM, lambda: stop(force=False))
        _on_signal(reactor, signal.SIGINT, lambda: stop(force=True))

    reactor.callWhenRunning(own_signals)
    reactor.run()
    return 0
