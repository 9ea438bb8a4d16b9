"""Services that run simulated llama-servers: one per endpoint, or a fleet.

C{makeSimulatorService} is what ``twistd paddler simulate`` runs;
L{SimulatedFleetService} is the in-process fleet the balancer starts for its
``--simulated-fleet N`` demo mode.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.web.server import Site

from paddler.simulator.engine import SimulatedServerEngine, SimulatorConfig
from paddler.server.listeners import ListeningService
from paddler.simulator.router import RouterConfig, SimulatedRouter, parse_failing, parse_models
from paddler.simulator.web import RouterResource, SimulatorResource

_UNESCAPED_COLON = re.compile(r"(?<!\\):")


class SimulatorSite(Site):
    """A L{Site} serving one simulated llama-server; C{engine} is its state."""

    displayTracebacks = False
    noisy = False

    def __init__(self, engine: SimulatedServerEngine, clock: IReactorTime) -> None:
        super().__init__(SimulatorResource(engine, clock), reactor=clock)
        self.engine = engine

    def log(self, request: Any) -> None:
        """No access log: a balancer probes a simulator every second."""


class RouterSite(Site):
    """A L{Site} serving one simulated router-mode llama-server; C{router} is its state."""

    displayTracebacks = False
    noisy = False

    def __init__(self, router: SimulatedRouter, clock: IReactorTime, api_key: str | None = None) -> None:
        super().__init__(RouterResource(router, clock, api_key), reactor=clock)
        self.router = router

    def log(self, request: Any) -> None:
        """No access log: a balancer probes a simulator every second."""


def router_site(clock: IReactorTime, router: RouterConfig, child: SimulatorConfig) -> RouterSite:
    """A web site serving a new simulated router-mode llama-server.

    @param router: the router settings (models, C{models_max}, autoload, load time).
    @param child: the settings of every model's child server (slots, speed, context).
    """
    return RouterSite(SimulatedRouter(clock, router, child), clock, child.api_key)


def simulator_site(clock: IReactorTime, config: SimulatorConfig) -> SimulatorSite:
    """A web site serving a new simulated llama-server with C{config}.

    @param clock: the reactor (or a L{twisted.internet.task.Clock} in tests)
        that all timing runs on.
    """
    return SimulatorSite(SimulatedServerEngine(clock, config), clock)


def _port_index(parts: list[str], description: str) -> int:
    for index, part in enumerate(parts[1:], start=1):
        if part.startswith("port=") or "=" not in part:
            return index
    raise ValueError(f"no port in endpoint {description!r}")


def endpoint_port(description: str) -> int:
    """The port of a tcp endpoint string (C{tcp:8081:...} or C{tcp:port=8081:...}).

    @raise ValueError: not a tcp endpoint, or no valid port in it.
    """
    parts = _UNESCAPED_COLON.split(description)
    if parts[0] not in ("tcp", "tcp6"):
        raise ValueError(f"not a tcp endpoint: {description!r}")
    part = parts[_port_index(parts, description)]
    try:
        return int(part.removeprefix("port="))
    except ValueError:
        raise ValueError(f"bad port {part!r} in endpoint {description!r}") from None


def endpoint_with_port_offset(description: str, offset: int) -> str:
    """The tcp endpoint string C{description} with its port moved by C{offset}.

    Port 0 (any free port) stays 0. Other endpoint types are returned as they
    are when C{offset} is 0, and refused otherwise.

    @raise ValueError: C{description} is not a tcp endpoint and C{offset} > 0,
        or has no valid port.
    """
    parts = _UNESCAPED_COLON.split(description)
    if parts[0] not in ("tcp", "tcp6"):
        if offset == 0:
            return description
        raise ValueError(f"only tcp endpoints can take consecutive ports: {description!r}")
    port = endpoint_port(description)
    index = _port_index(parts, description)
    prefix = "port=" if parts[index].startswith("port=") else ""
    parts[index] = prefix + str(port + offset if port else 0)
    return ":".join(parts)


def _url_of(port: IListeningPort) -> str:
    address: Any = port.getHost()
    host = getattr(address, "host", None)
    if host is None:
        return "unix:" + str(getattr(address, "name", ""))
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = "[" + host + "]"
    return f"http://{host}:{address.port}"


class SimulatedServerService(MultiService):
    """One simulated llama-server listening on one endpoint.

    @ivar engine: its L{SimulatedServerEngine}.
    @ivar site: its L{SimulatorSite}.
    @ivar url: C{http://host:port} (or C{unix:path}) once listening, else None.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        description: str,
        config: SimulatorConfig,
        index: int = 0,
        router: RouterConfig | None = None,
    ) -> None:
        super().__init__()
        self.description = description
        self.config = config
        self.index = index
        self.router_config = router
        site: Site
        if router is None:
            self.site = simulator_site(reactor, config)
            self.engine = self.site.engine
            self.router: SimulatedRouter | None = None
            site = self.site
        else:
            # Router mode: each model has its own engine; C{engine} is a
            # placeholder that never takes a request.
            self.router_site = router_site(reactor, router, config)
            self.router = self.router_site.router
            self.engine = SimulatedServerEngine(reactor, config)
            site = self.router_site
        self.url: str | None = None
        self.port: IListeningPort | None = None
        self._waiting: list[Deferred[str]] = []
        ListeningService(
            reactor, description, site, f"simulated llama-server {index}", on_listening=self._listening
        ).setServiceParent(self)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.url = _url_of(port)
        if self.router_config is not None:
            self.log.info(
                "simulated router-mode llama-server {index} listening on {url}: models {models}, "
                "models_max {models_max}, autoload {autoload}, {slots} slots per model",
                index=self.index,
                url=self.url,
                models=",".join(self.router_config.models),
                models_max=self.router_config.models_max,
                autoload=self.router_config.autoload,
                slots=self.config.slots,
            )
        else:
            self.log.info(
                "simulated llama-server {index} listening on {url}: {slots} slots, model {model}, "
                "{tokens_per_second} tokens/s, seed {seed}",
                index=self.index,
                url=self.url,
                slots=self.config.slots,
                model=self.config.model,
                tokens_per_second=self.config.tokens_per_second,
                seed=self.config.seed,
            )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.url)

    def whenListening(self) -> Deferred[str]:
        """A Deferred that fires with C{url} once the server listens."""
        if self.url is not None:
            return succeed(self.url)
        d: Deferred[str] = Deferred()
        self._waiting.append(d)
        return d

    def startService(self) -> None:
        self.engine.start()
        if self.router is not None:
            self.router.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        self.engine.stop()
        if self.router is not None:
            self.router.stop()
        self.url = None
        self.port = None
        return d


class SimulatedFleetService(MultiService):
    """Several simulated llama-servers on consecutive TCP ports, in-process.

    @param reactor: the reactor to listen with.
    @param configs: one L{SimulatorConfig} per server.
    @param interface: the address to listen on.
    @param base_port: the first port; 0 lets the OS choose a free port for
        each server.
    """

    def __init__(
        self,
        reactor: Any,
        configs: Sequence[SimulatorConfig],
        interface: str = "127.0.0.1",
        base_port: int = 0,
    ) -> None:
        super().__init__()
        escaped = interface.replace(":", "\\:")
        self.servers: list[SimulatedServerService] = []
        for index, config in enumerate(configs):
            port = base_port + index if base_port else 0
            server = SimulatedServerService(
                reactor, f"tcp:{port}:interface={escaped}", config, index
            )
            server.setServiceParent(self)
            self.servers.append(server)

    @property
    def urls(self) -> list[str]:
        """The URLs of the servers that listen (all of them after startService)."""
        return [server.url for server in self.servers if server.url is not None]

    @property
    def engines(self) -> list[SimulatedServerEngine]:
        """The servers' engines, in port order."""
        return [server.engine for server in self.servers]

    def whenListening(self) -> Deferred[list[str]]:
        """A Deferred that fires with every URL once all servers listen."""
        d = DeferredList([server.whenListening() for server in self.servers], fireOnOneErrback=True)
        return d.addCallback(lambda results: [url for _, url in results])


def config_from_options(options: Mapping[str, Any], index: int = 0) -> SimulatorConfig:
    """The L{SimulatorConfig} of server C{index} from parsed L{SimulateOptions}.

    The prompt-cache settings (``slot-prompt-similarity``, ``cache-ram``,
    ``cache-bytes-per-token``, ``no-cache-idle-slots``, ``kv-unified``) take
    llama-server's defaults when the options do not carry them.
    """
    defaults = SimulatorConfig()
    return SimulatorConfig(
        slots=options["slots"],
        model=options["model"],
        tokens_per_second=options["tokens-per-second"],
        prompt_tokens_per_second=options["prompt-tokens-per-second"],
        n_ctx=options["n-ctx"],
        load_seconds=options["load-seconds"],
        seed=options["seed"] + index,
        slots_endpoint=not options["no-slots-endpoint"],
        metrics_endpoint=not options["no-metrics"],
        api_key=options["api-key"],
        slot_prompt_similarity=float(
            options.get("slot-prompt-similarity", defaults.slot_prompt_similarity)
        ),
        cache_ram_mib=int(options.get("cache-ram", defaults.cache_ram_mib)),
        cache_bytes_per_token=int(
            options.get("cache-bytes-per-token", defaults.cache_bytes_per_token)
        ),
        cache_idle_slots=not options.get("no-cache-idle-slots", False),
        kv_unified=bool(options.get("kv-unified", False)),
    )


def router_config_from_options(options: Mapping[str, Any]) -> RouterConfig | None:
    """The L{RouterConfig} of parsed L{SimulateOptions}, or None without ``--models``."""
    models = options.get("models")
    if not models:
        return None
    failing = options.get("models-fail-load")
    return RouterConfig(
        models=parse_models(models),
        models_max=int(options.get("models-max", 4)),
        autoload=not options.get("no-models-autoload", False),
        load_seconds=float(options.get("model-load-seconds", 0.1)),
        failing=parse_failing(failing) if failing else {},
        sleep_idle_seconds=float(options.get("sleep-idle-seconds") or 0.0) or -1.0,
    )


def makeSimulatorService(options: Mapping[str, Any], reactor: Any) -> MultiService:
    """The services for ``paddler simulate``: C{--fleet} servers, one per port
    (router-mode servers with C{--models})."""
    parent = MultiService()
    router = router_config_from_options(options)
    for index in range(options["fleet"]):
        description = endpoint_with_port_offset(options["listen"], index)
        SimulatedServerService(
            reactor, description, config_from_options(options, index), index, router
        ).setServiceParent(parent)
    return parent
