"""The composition root: command-line options and ``makeService``.

Only here is the global reactor imported, and only inside ``makeService``.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from paddler import __version__


def _whole(flag: str, value: str, minimum: int) -> int:
    """C{value} as a whole number of at least C{minimum}, or a L{usage.UsageError} naming C{--flag}."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{flag} must be a whole number, got {value!r}")
    if number < minimum:
        raise usage.UsageError(f"--{flag} must be at least {minimum}, got {number}")
    return number


def _finite(flag: str, value: str, zero_allowed: bool) -> float:
    """C{value} as a finite number above zero (or from zero), or a L{usage.UsageError} naming C{--flag}."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise usage.UsageError(f"--{flag} must be a number, got {value!r}")
    low_ok = number >= 0 if zero_allowed else number > 0
    if not low_ok or number in (float("inf"), float("-inf")) or number != number:
        kind = "zero or a positive number" if zero_allowed else "a positive number"
        raise usage.UsageError(f"--{flag} must be {kind}, got {value}")
    return number


def _positive_int(flag: str, value: str) -> int:
    return _whole(flag, value, 1)


def _non_negative_int(flag: str, value: str) -> int:
    return _whole(flag, value, 0)


def _positive_float(flag: str, value: str) -> float:
    return _finite(flag, value, zero_allowed=False)


def _non_negative_float(flag: str, value: str) -> float:
    return _finite(flag, value, zero_allowed=True)


CLIENT_IDLE_TIMEOUT = 120.0


def check_endpoint(flag: str, description: str) -> None:
    """Raise L{usage.UsageError} naming C{--flag} when C{description} is not a server endpoint string."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)  # parses only; nothing listens
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise usage.UsageError(f"--{flag} {description!r} is not a valid endpoint string: {e}")


class SimulateOptions(usage.Options):
    """``paddler simulate``: one or more simulated llama.cpp servers.

    Values are checked in ``postOptions`` (not with ``optParameters``
    coercers) so that every ``UsageError`` names its flag.
    """

    synopsis = "[options]"
    longdesc = (
        "Run a simulated llama.cpp server (llama-server's HTTP API with "
        "slots, queueing, streaming and timings) for demos, tests and "
        "capacity planning."
    )

    optFlags = [
        ["no-slots-endpoint", None, "Answer /slots with 501, like llama-server --no-slots."],
        ["no-metrics", None, "Answer /metrics with 501, like llama-server without --metrics."],
    ]
    optParameters = [
        ["listen", "l", "tcp:8081:interface=127.0.0.1", "Endpoint string to listen on."],
        ["fleet", None, "1", "Number of servers; with a tcp endpoint they take consecutive ports."],
        ["slots", "s", "4", "Parallel slots per server (llama-server -np)."],
        ["model", "m", "simulated.gguf", "Model name reported by /props and /v1/models."],
        ["tokens-per-second", None, "50", "Generation speed of each slot."],
        ["prompt-tokens-per-second", None, "2000", "Prompt processing speed of each slot."],
        ["n-ctx", None, "2048", "Context size of each slot."],
        ["load-seconds", None, "0", "Answer 503 'Loading model' for this long after start."],
        ["seed", None, "0", "Random seed, so runs are reproducible (server i uses seed + i)."],
        ["api-key", None, None, "Require 'Authorization: Bearer KEY', like llama-server --api-key."],
    ]

    def postOptions(self) -> None:
        self["fleet"] = _positive_int("fleet", self["fleet"])
        self["slots"] = _positive_int("slots", self["slots"])
        self["n-ctx"] = _positive_int("n-ctx", self["n-ctx"])
        self["seed"] = _non_negative_int("seed", self["seed"])
        self["tokens-per-second"] = _positive_float("tokens-per-second", self["tokens-per-second"])
        self["prompt-tokens-per-second"] = _positive_float(
            "prompt-tokens-per-second", self["prompt-tokens-per-second"]
        )
        self["load-seconds"] = _non_negative_float("load-seconds", self["load-seconds"])
        self["no-slots-endpoint"] = bool(self["no-slots-endpoint"])
        self["no-metrics"] = bool(self["no-metrics"])
        if self["api-key"] == "":
            raise usage.UsageError("--api-key must not be empty")
        listen = self["listen"]
        kind = listen.split(":", 1)[0]
        if self["fleet"] > 1:
            if kind not in ("tcp", "tcp6"):
                raise usage.UsageError(
                    f"--fleet above 1 needs a tcp: --listen endpoint, got {listen!r}"
                )
            from paddler.simulator.service import endpoint_port, endpoint_with_port_offset

            try:
                last = endpoint_port(endpoint_with_port_offset(listen, self["fleet"] - 1))
            except ValueError as e:
                raise usage.UsageError(f"--listen: {e}") from None
            if last > 65535:
                raise usage.UsageError(
                    f"--fleet {self['fleet']} from --listen {listen!r} runs past port 65535"
                )


class AgentOptions(usage.Options):
    """``paddler agent``: reports a llama.cpp server's slots to a balancer (docs/agent.md)."""

    synopsis = "--llamacpp URL --balancer URL [options]"
    longdesc = (
        "Poll a local llama.cpp server's slots and report them to a paddler "
        "balancer's management API every interval. On SIGTERM, drain the host "
        "on the balancer and wait for its requests to finish."
    )

    optParameters = [
        ["llamacpp", None, None, "URL of the local llama.cpp server, e.g. http://127.0.0.1:8080."],
        ["external-url", None, None, "URL the balancer reaches the server at [default: --llamacpp]."],
        ["balancer", None, None, "The balancer's management URL, e.g. http://10.0.0.9:8085."],
        ["name", None, None, "Name of this host in the fleet [default: host:port of --external-url]."],
        ["llamacpp-api-key", None, None, "API key of the local llama.cpp (or PADDLER_LLAMACPP_API_KEY)."],
        ["management-token", None, None, "Bearer token of the management API (or PADDLER_MANAGEMENT_TOKEN)."],
        ["interval", None, "1", "Seconds between reports."],
        ["timeout", None, "2", "Deadline of each request to llama.cpp and to the balancer, in seconds."],
        ["max-backoff", None, "30", "Longest wait between reports while the balancer fails, in seconds."],
        ["drain-timeout", None, "30", "Longest wait on SIGTERM for in-flight requests, in seconds."],
        ["status-listen", None, None, "Endpoint string for the agent's GET /health (off by default)."],
    ]

    def postOptions(self) -> None:
        import os

        from paddler.agent.service import AgentConfig
        from paddler.fleet.upstream import InvalidUpstreamURL, normalise_url

        urls: dict[str, str] = {}
        for flag in ("llamacpp", "external-url", "balancer"):
            value = self[flag]
            if value is None:
                if flag == "external-url":
                    continue
                raise usage.UsageError(f"--{flag} is required")
            try:
                urls[flag] = normalise_url(value)
            except InvalidUpstreamURL as e:
                raise usage.UsageError(f"--{flag}: {e}") from None
        external = urls.get("external-url", urls["llamacpp"])
        name = self["name"] if self["name"] is not None else external.split("://", 1)[1]
        if not name.strip() or len(name) > 128 or any(ord(c) < 32 for c in name):
            raise usage.UsageError("--name must be 1 to 128 printable characters")
        secrets: dict[str, str | None] = {}
        for flag, var in (("llamacpp-api-key", "PADDLER_LLAMACPP_API_KEY"),
                          ("management-token", "PADDLER_MANAGEMENT_TOKEN")):
            value = self[flag] if self[flag] is not None else os.environ.get(var)
            if value is not None and not value.strip():
                raise usage.UsageError(f"--{flag} must not be empty")
            secrets[flag] = value
        interval = _positive_float("interval", self["interval"])
        timeout = _positive_float("timeout", self["timeout"])
        max_backoff = _positive_float("max-backoff", self["max-backoff"])
        drain_timeout = _non_negative_float("drain-timeout", self["drain-timeout"])
        self.config = AgentConfig(
            llamacpp=urls["llamacpp"],
            external_url=external,
            balancer=urls["balancer"],
            name=name,
            llamacpp_api_key=secrets["llamacpp-api-key"],
            management_token=secrets["management-token"],
            interval=interval,
            timeout=timeout,
            max_backoff=max(max_backoff, interval),
            drain_timeout=drain_timeout,
        )


class BalancerOptions(usage.Options):
    """``paddler balancer``: the slot-aware reverse proxy."""

    synopsis = "[options]"
    longdesc = (
        "Run the slot-aware load balancer in front of llama.cpp servers. "
        "Settings come from flags, then PADDLER_* environment variables "
        "(PADDLER_UPSTREAMS=url,name=url,...), then the --config TOML file."
    )

    optFlags = [
        ["slots-endpoint-enable", None, "Answer /slots on the proxy port with the fleet's slots."],
        ["rewrite-host-header", None, "Send the upstream's host:port as Host instead of the client's."],
        ["management-insecure", None, "Allow a non-loopback management listener without a token."],
        ["no-dashboard", None, "Do not serve the dashboard on the management port."],
        ["access-log", None, "Log a line per proxied request (costs ~8% of proxy CPU)."],
    ]
    optParameters = [
        ["config", "c", None, "TOML file with settings and [[upstream]] tables."],
        ["listen", "l", None, "Proxy endpoint string [default: tcp:8086:interface=127.0.0.1]."],
        ["policy", None, None, "slots (default), round-robin or least-connections."],
        ["probe-interval", None, None, "Seconds between probes of each upstream [default: 1]."],
        ["probe-timeout", None, None, "Deadline of one probe, in seconds [default: 2]."],
        ["probe-mode", None, None, "slots (default: GET /slots) or health (lets idle servers sleep)."],
        ["unhealthy-after", None, None, "Consecutive probe failures before unreachable [default: 2]."],
        ["llamacpp-api-key", None, None, "API key sent to upstreams as Authorization: Bearer."],
        ["max-request-body", None, None, "Largest request body in bytes [default: 10 MiB]."],
        ["upstream-timeout", None, None, "Seconds to wait for an upstream's response headers [default: 300]."],
        ["idle-timeout", None, None, "Seconds a response may stay silent mid-body [default: 60]."],
        ["max-retries", None, None, "Other upstreams to try after a connection failure [default: 3]."],
        ["max-buffered-requests", None, None, "Requests that may wait for a slot; 0 disables [default: 30]."],
        ["buffered-request-timeout", None, None, "Seconds a request may wait for a slot [default: 30]."],
        ["management-listen", None, None, "Management endpoint string [default: tcp:8085:interface=127.0.0.1]."],
        ["management-token", None, None, "Bearer token for mutating management calls (or PADDLER_MANAGEMENT_TOKEN)."],
        ["agent-expiry", None, None, "Seconds without an agent report before its upstream is dropped [default: 3]."],
        ["statsd", None, None, "StatsD address: udp:HOST:PORT or HOST:PORT."],
        ["statsd-prefix", None, None, "StatsD metric prefix [default: paddler]."],
        ["statsd-interval", None, None, "Seconds between StatsD reports [default: 1]."],
        ["simulated-fleet", None, None, "Start N simulated llama.cpp servers in-process as upstreams (demo)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.upstreams: list[str] = []

    def opt_upstream(self, value: str) -> None:
        """A llama.cpp server: URL or NAME=URL (repeatable)."""
        self.upstreams.append(value)

    def postOptions(self) -> None:
        import os

        from paddler.config import ConfigError, build_config

        flags: dict[str, Any] = {
            str(key).replace("-", "_"): self[str(key)]
            for key, *_ in self.optParameters
            if key != "config"
        }
        for key, name in (
            ("slots-endpoint-enable", "slots_endpoint_enable"),
            ("rewrite-host-header", "rewrite_host_header"),
            ("management-insecure", "management_insecure"),
        ):
            if self[key]:
                flags[name] = True
        if self["no-dashboard"]:
            flags["dashboard"] = False
        if self["access-log"]:
            flags["access_log"] = True
        try:
            self.config = build_config(flags, self.upstreams, os.environ, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e))
        check_endpoint("listen", self.config.listen)
        check_endpoint("management-listen", self.config.management_listen)
        self._check_management_exposure()

    def _check_management_exposure(self) -> None:
        """Refuse a management API reachable from other hosts without a token."""
        from paddler.management.api import endpoint_is_local

        config = self.config
        if config.management_token is not None and not config.management_token.strip():
            raise usage.UsageError("--management-token must not be empty")
        if config.management_token or config.management_insecure:
            return
        if not endpoint_is_local(config.management_listen):
            raise usage.UsageError(
                f"--management-listen {config.management_listen!r} is reachable from other hosts: "
                "set --management-token (or PADDLER_MANAGEMENT_TOKEN), or pass --management-insecure"
            )


class Options(usage.Options):
    """``twistd paddler``: choose a subcommand."""

    synopsis = "balancer|agent|simulate [options]"
    subCommands = [
        ["balancer", None, BalancerOptions, "Run the slot-aware load balancer."],
        ["agent", None, AgentOptions, "Report a llama.cpp server to a balancer."],
        ["simulate", None, SimulateOptions, "Run simulated llama.cpp servers."],
    ]

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"paddler {__version__}")  # noqa: T201 - usage output, before logging starts
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a subcommand: balancer, agent or simulate")


def makeService(options: Any) -> IService:
    """Build the service tree for the chosen subcommand."""
    from twisted.internet import reactor

    sub = options.subOptions
    if options.subCommand == "simulate":
        from paddler.simulator.service import makeSimulatorService

        return makeSimulatorService(sub, reactor)
    if options.subCommand == "balancer":
        return makeBalancerService(sub.config, reactor)
    if options.subCommand == "agent":
        return makeAgentService(sub.config, reactor, sub["status-listen"])
    raise usage.UsageError(f"{options.subCommand} is not yet available")


def makeAgentService(config: Any, reactor: Any, status_listen: str | None = None) -> MultiService:
    """Wire ``paddler agent``: the report loop, its HTTP client, the optional status listener."""
    from twisted.internet.endpoints import serverFromString
    from twisted.web.client import Agent
    from treq.client import HTTPClient

    from paddler.agent.service import AgentService, AgentStatusApp
    from paddler.services import (
        AnnouncedEndpointService,
        ConnectionPoolService,
        QuietSite,
        quiet_connection_pool,
    )

    top = MultiService()
    connections = quiet_connection_pool(reactor, 2)
    ConnectionPoolService(connections).setServiceParent(top)
    http = HTTPClient(Agent(reactor, pool=connections, connectTimeout=config.timeout))
    agent = AgentService(config, http, reactor)
    agent.setServiceParent(top)
    if status_listen:
        AnnouncedEndpointService(
            serverFromString(reactor, status_listen),
            QuietSite(AgentStatusApp(agent).app.resource()),
            "paddler agent status",
            "/health",
        ).setServiceParent(top)
    top.agent = agent  # type: ignore[attr-defined]
    return top


def makeBalancerService(config: Any, reactor: Any) -> MultiService:
    """Wire the balancer: pool, chooser, probes, proxy listener (and what rides on them)."""
    from twisted.internet.endpoints import serverFromString
    from twisted.web.client import Agent
    from twisted.web.server import Site
    from treq.client import HTTPClient

    from paddler.routing.policies import CHOOSERS
    from paddler.web.endpoints import CachingEndpointFactory
    from paddler.fleet.pool import UpstreamPool
    from paddler.fleet.probe import HTTPProber, ProbeService
    from paddler.balancer.proxy import ProxyConfig, ProxyResource
    from paddler.web.request import bounded_request_factory
    from paddler.services import (
        AnnouncedEndpointService,
        ConnectionPoolService,
        PoolService,
        ProxyStoppingService,
        QuietSite,
        SimulatedUpstreamsService,
        quiet_connection_pool,
    )
    from paddler.observability.requests import RequestStats

    top = MultiService()
    pool = UpstreamPool(
        reactor,
        CHOOSERS[config.policy](),
        max_buffered=config.max_buffered_requests,
        buffer_timeout=config.buffered_request_timeout,
    )
    PoolService(pool, config.upstreams, reactor).setServiceParent(top)
    if config.simulated_fleet:
        from paddler.simulator.engine import SimulatorConfig
        from paddler.simulator.service import SimulatedFleetService

        fleet = SimulatedFleetService(
            reactor,
            [
                SimulatorConfig(slots=4 if i % 2 == 0 else 2, tokens_per_second=40.0 if i % 2 == 0 else 20.0, seed=i)
                for i in range(config.simulated_fleet)
            ],
        )
        fleet.setServiceParent(top)
        SimulatedUpstreamsService(pool, fleet, reactor).setServiceParent(top)
    probe_connections = quiet_connection_pool(reactor, 2)
    proxy_connections = quiet_connection_pool(reactor, 64)
    ConnectionPoolService(probe_connections).setServiceParent(top)
    ConnectionPoolService(proxy_connections).setServiceParent(top)

    prober = HTTPProber(
        HTTPClient(Agent(reactor, pool=probe_connections, connectTimeout=config.probe_timeout)),
        reactor,
        pool,
        timeout=config.probe_timeout,
        unhealthy_after=config.unhealthy_after,
        mode=config.probe_mode,
        api_key=config.llamacpp_api_key,
    )
    probes = ProbeService(pool, prober, reactor, interval=config.probe_interval)
    probes.setServiceParent(top)

    stats = RequestStats(reactor)
    proxy = ProxyResource(
        pool,
        Agent.usingEndpointFactory(
            reactor,
            CachingEndpointFactory(reactor, connect_timeout=min(10.0, config.upstream_timeout)),
            pool=proxy_connections,
        ),
        reactor,
        ProxyConfig(
            api_key=config.llamacpp_api_key,
            rewrite_host_header=config.rewrite_host_header,
            slots_endpoint_enable=config.slots_endpoint_enable,
            upstream_timeout=config.upstream_timeout,
            idle_timeout=config.idle_timeout,
            max_request_body=config.max_request_body,
            max_retries=config.max_retries,
        ),
        stats,
    )
    ProxyStoppingService(proxy).setServiceParent(top)
    site_class = Site if config.access_log else QuietSite
    # A client connection idle between requests (or slow to send one) is
    # closed after CLIENT_IDLE_TIMEOUT; while a request runs Twisted suspends it.
    site = site_class(
        proxy,
        requestFactory=bounded_request_factory(config.max_request_body),
        timeout=CLIENT_IDLE_TIMEOUT,
        parsePOSTFormSubmission=False,  # bodies are relayed, never parsed as forms
    )
    site.displayTracebacks = False
    site.noisy = False
    AnnouncedEndpointService(
        serverFromString(reactor, config.listen), site, "paddler balancer proxy"
    ).setServiceParent(top)
    # The management port: the fleet API (/api/v1/upstreams, agents, /health)
    # is the default app; observability (state, dashboard, /metrics) mounts
    # its prefixes in management_routes.
    from paddler.web.router import NotFoundResource, PrefixRouter

    management_routes: list[tuple[bytes, Any]] = []
    management_default: Any = NotFoundResource()
    # -- fleet management API (issue 5) wires here --
    from paddler.management.api import ManagementAPI
    from paddler.fleet.registry import AgentRegistry

    registry = AgentRegistry(pool, reactor, expiry=config.agent_expiry)
    registry.setServiceParent(top)
    management_default = ManagementAPI(
        pool, registry, reactor, probes=probes, token=config.management_token
    ).app.resource()
    top.registry = registry  # type: ignore[attr-defined]
    # -- observability (issue 6) wires here --
    from paddler.observability.dashboard import (
        ObservabilityApp,
        ObservabilityService,
        StateHistory,
        StateStream,
        build_state,
    )
    from paddler.observability.prometheus import PrometheusMetrics

    history = StateHistory()

    def fleet_state(with_history: bool) -> dict[str, Any]:
        return build_state(pool, stats, reactor, history if with_history else None)

    state_stream = StateStream(reactor, fleet_state)
    ObservabilityService(pool, stats, reactor, history, state_stream).setServiceParent(top)
    observability = ObservabilityApp(
        fleet_state, state_stream, PrometheusMetrics(pool, stats), dashboard=config.dashboard
    ).resource()
    management_routes += [(b"/api/v1/state", observability), (b"/dashboard", observability),
                          (b"/metrics", observability)]
    if config.statsd is not None:
        from paddler.config import parse_statsd_address
        from paddler.observability.statsd import StatsDClient, StatsDService

        statsd_host, statsd_port = parse_statsd_address(config.statsd)
        StatsDService(
            StatsDClient(reactor, statsd_host, statsd_port, config.statsd_prefix),
            pool, stats, reactor, interval=config.statsd_interval,
        ).setServiceParent(top)
    from paddler.management.api import MAX_BODY

    # Bodies are stored before any handler (or token check) runs: keep at most MAX_BODY.
    management_site = QuietSite(
        PrefixRouter(management_routes, management_default),
        requestFactory=bounded_request_factory(MAX_BODY),
        timeout=CLIENT_IDLE_TIMEOUT,
        parsePOSTFormSubmission=False,
    )
    AnnouncedEndpointService(
        serverFromString(reactor, config.management_listen), management_site, "paddler management"
    ).setServiceParent(top)

    top.pool = pool  # type: ignore[attr-defined]
    top.stats = stats  # type: ignore[attr-defined]
    top.probes = probes  # type: ignore[attr-defined]
    return top
