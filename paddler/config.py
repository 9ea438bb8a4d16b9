"""The settings of each command, declared once (see L{paddler.settings}).

Balancer precedence, highest first: command-line flags, ``PADDLER_*``
environment variables, the ``--config`` TOML file, built-in defaults.
Upstreams are taken whole from the first of these that names any (they are
not merged).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from paddler.fleet.upstream import InvalidUpstreamURL, normalise_url
from paddler.llamacpp.slots import PROBE_MODES
from paddler.routing.policies import CHOOSERS
from paddler.settings import (
    Choice,
    ConfigError,
    Converted,
    Endpoint,
    Flag,
    Kind,
    Number,
    Text,
    count,
    file_keys,
    rate,
    from_sources,
    seconds,
    setting,
    settings_of,
)

__all__ = [
    "AgentConfig", "BalancerConfig", "ConfigError", "LoggingConfig", "SimulateConfig", "UpstreamSpec", "build_config",
]


@dataclass(frozen=True)
class UpstreamSpec:
    """An upstream named in the configuration."""

    url: str
    name: str | None = None
    api_key: str | None = None


def parse_upstream(text: str, where: str) -> UpstreamSpec:
    """``URL`` or ``NAME=URL``."""
    name = None
    if "=" in text and not text.split("=", 1)[0].startswith(("http://", "https://")):
        name, text = text.split("=", 1)
        name = name.strip() or None
    from paddler.fleet.addresses import canonical_url

    try:
        return UpstreamSpec(url=canonical_url(text.strip()), name=name)
    except InvalidUpstreamURL as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_statsd_address(text: str, where: str = "--statsd") -> tuple[str, int]:
    """C{udp:HOST:PORT} or C{HOST:PORT} (IPv6 as C{[::1]:8125}) as C{(host, port)}."""
    address = text.strip()
    if address.startswith("udp:"):
        address = address[len("udp:"):]
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c in host for c in "[]/ ") or (":" in host and "[" not in address):
        raise ConfigError(f"{where} must be udp:HOST:PORT or HOST:PORT, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{where} must end with a port number, got {text!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{where} port must be between 1 and 65535, got {port}")
    return host, port


def _statsd(text: str) -> str:
    try:
        host, port = parse_statsd_address(text, "the address")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    return f"udp:[{host}]:{port}" if ":" in host else f"udp:{host}:{port}"


def _model_aliases(text: str) -> str:
    from paddler.fleet.models import parse_model_aliases

    return ",".join(f"{k}={v}" for k, v in parse_model_aliases(text.split(",")).items())


def _url(text: str) -> str:
    try:
        return normalise_url(text)
    except InvalidUpstreamURL as e:
        raise ValueError(str(e)) from None


@dataclass(frozen=True)
class Networks(Kind):
    """Networks in CIDR form: a comma-separated string (flags, environment) or a TOML array."""

    text = "CIDR[,CIDR...]"

    def parse(self, value: Any, where: str) -> tuple[Any, ...]:
        from paddler.fleet.addresses import parse_networks

        if not isinstance(value, (list, tuple)):
            value = Text(max_length=65536).parse(value, where)
        try:
            return parse_networks(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


def _state_url(text: str) -> str:
    from paddler.sharedstate.client import parse_state_url

    parse_state_url(text)  # InvalidStateURL is a ValueError naming what is wrong
    return text.strip()


URL = Converted(_url, "http(s)://host[:port]")
SECRET = Text(max_length=4096)


@dataclass
class BalancerConfig:
    """Every balancer setting, with its safe default."""

    listen: str = setting("tcp:8086:interface=127.0.0.1", "Proxy endpoint string.", Endpoint(), short="l", reload="restart")
    upstreams: list[UpstreamSpec] = field(default_factory=list)
    policy: str = setting(
        "cache-aware", "How an upstream is chosen (docs/concepts.md#policies, docs/routing.md).", Choice(tuple(CHOOSERS)),
        reload="chooser",
    )
    probe_interval: float = setting(1.0, "Seconds between probes of each upstream.", seconds(), reload="probe_interval")
    probe_timeout: float = setting(2.0, "Deadline of one probe, in seconds.", seconds(), reload="prober.timeout")
    probe_mode: str = setting(
        "slots", "slots (GET /slots) or health (lets idle servers sleep).", Choice(PROBE_MODES), reload="prober.mode"
    )
    unhealthy_after: int = setting(2, "Consecutive probe failures before unreachable.", count(1, 1000), reload="prober.unhealthy_after")
    llamacpp_api_key: str | None = setting(
        None,
        "API key the balancer's probes send to upstreams (Authorization: Bearer); "
        "an upstream's own api_key comes first. Clients' requests do not get it (see --lend-api-key).",
        SECRET,
        secret=True,
        reload="prober.api_key",
    )
    lend_api_key: bool = setting(
        False,
        "Add the upstream's key (its api_key, else --llamacpp-api-key) to client requests that carry "
        "no Authorization or X-Api-Key: the balancer then grants the servers' access to every client.",
        Flag(),
        reload="proxy",
    )
    slots_endpoint_enable: bool = setting(
        False,
        "Answer GET /slots on the proxy port with the fleet's slots as last probed (all upstreams, "
        "tagged), instead of passing it to an upstream.",
        Flag(),
        reload="proxy",
    )
    rewrite_host_header: bool = setting(
        False, "Send the upstream's host:port as Host instead of the client's.", Flag(), reload="proxy"
    )
    forwarded_headers: str = setting(
        "replace",
        "X-Forwarded-For/-Proto/-Host, Forwarded and X-Real-IP from the client: replace drops them and "
        "paddler writes its own; append (behind a trusted proxy) keeps them and appends the client's "
        "address to X-Forwarded-For (docs/reliability.md#headers-that-reach-the-upstream).",
        Choice(("replace", "append")),
        reload="proxy",
    )
    max_request_body: int = setting(
        10 * 1024 * 1024, "Largest request body, in bytes.", count(1, 1 << 31), reload="proxy"
    )
    upstream_timeout: float = setting(
        300.0, "Seconds to wait for an upstream's response headers.", seconds(), reload="proxy"
    )
    idle_timeout: float = setting(60.0, "Seconds a response may stay silent mid-body.", seconds(), reload="proxy")
    upstream_keepalive: int = setting(
        64,
        "Idle kept-alive connections the proxy keeps per upstream. 0: a new connection for every "
        "request, so no connection ever carries two clients' requests and an upstream's stray bytes "
        "can never reach another client (docs/reliability.md#known-limits), at a connect per request.",
        count(0, 4096),
        reload="restart",
    )
    relay_passthrough: bool = setting(
        True,
        "Relay chunked answers to HTTP/1.1 clients as received, without decoding and "
        "re-encoding the chunks.",
        Flag(), reload="proxy",
    )
    flush_before_poll: bool = setting(
        True,
        "Send what a client or upstream connection buffered in one reactor turn in one send, just "
        "before the reactor waits, and register for write events only for what the kernel did not "
        "take (paddler/flush.py, docs/performance.md); off: Twisted's own write buffering.",
        Flag(), reload="restart",
    )
    request_parser: str = setting(
        "twisted",
        "What parses request heads on the proxy port: twisted (Twisted's HTTPChannel) or httptools "
        "(llhttp, in C; a prototype, saves per-request CPU, refuses a few heads Twisted accepts: "
        "docs/performance.md). Every defence of the proxy port applies to both.",
        Choice(("twisted", "httptools")),
        reload="restart",
    )
    lean_reactor: bool = setting(
        True,
        "Run on paddler's epoll reactor, without Twisted's logging context per I/O event "
        "(docs/performance.md, which also says how to choose it under another launcher).",
        Flag(), reload="restart",
    )
    max_retries: int = setting(
        3,
        "Other upstreams to try when one could not have started the request (connection refused, "
        "503); a written request is tried again only if it is a GET or HEAD.",
        count(0, 100),
        reload="proxy",
    )
    max_buffered_requests: int = setting(
        30, "Requests that may wait for a slot; 0 disables the buffer.", count(0, 1_000_000), reload="pool.max_buffered"
    )
    buffered_request_timeout: float = setting(
        30.0, "Seconds a request may wait for a slot.", seconds(), reload="pool.buffer_timeout"
    )
    no_upstream_timeout: float = setting(
        3.0,
        "Seconds a request may wait while no upstream is healthy, loading or registering (then "
        "503 saying why); raise it to the time a server takes to start when scaling from zero. "
        "Busy but healthy upstreams get the whole --buffered-request-timeout.",
        seconds(zero_allowed=True), reload="pool.no_upstream_timeout",
    )
    management_listen: str = setting(
        "tcp:8085:interface=127.0.0.1", "Management API and dashboard endpoint string.", Endpoint(), reload="restart"
    )
    management_token: str | None = setting(
        None, "Bearer token for mutating management calls.", SECRET, secret=True, reload="restart"
    )
    management_insecure: bool = setting(
        False, "Allow a non-loopback management listener without a token.", Flag(), reload="restart"
    )
    allow_upstream_network: tuple[Any, ...] = setting(
        (),
        "Networks (CIDR) upstreams may be in although they are refused by default: link-local "
        "169.254.0.0/16 and fe80::/10, cloud metadata addresses (docs/management.md#vetting). "
        "Comma-separated in the environment and file.",
        Networks(),
        repeatable=True,
        placeholder="none", reload="vetter.allowed",
    )
    agent_expiry: float = setting(
        3.0, "Seconds without an agent report before its upstream is dropped.", seconds(), reload="registry.expiry"
    )
    dashboard: bool = setting(True, "Serve the dashboard on the management port.", Flag(), reload="restart")
    access_log: bool = setting(
        False, "Log a line per proxied request (costs ~8% of proxy CPU).", Flag(), reload="restart"
    )
    statsd: str | None = setting(
        None, "StatsD address: udp:HOST:PORT or HOST:PORT.", Converted(_statsd, "udp:HOST:PORT"), reload="restart"
    )
    statsd_prefix: str = setting(
        "paddler",
        "StatsD metric prefix.",
        Text(128, r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", "dot-separated names of letters, digits, _ and -"), reload="restart",
    )
    statsd_interval: float = setting(1.0, "Seconds between StatsD reports.", seconds(), reload="restart")
    state: str | None = setting(
        None,
        "Share the fleet's slots, leases and buffer with other balancers through Redis: "
        "redis://[:password@]host:port/db or rediss:// (password also from PADDLER_STATE_PASSWORD).",
        Converted(_state_url, "redis://host:port/db"), reload="restart",
    )
    state_password: str | None = setting(
        None,
        "Password of the --state Redis when its URL has none.",
        SECRET,
        secret=True,
        cli=False,
        env="PADDLER_STATE_PASSWORD", reload="restart",
    )
    state_prefix: str = setting(
        "{pd}",
        "Prefix of the shared-state keys in Redis; holds one hash tag, like {pd}.",
        Text(64, r"[A-Za-z0-9_.:-]*\{[A-Za-z0-9_.:-]+\}[A-Za-z0-9_.:-]*", "a key prefix with one {hash tag}"), reload="restart",
    )
    state_lease_ttl: float = setting(
        10.0,
        "Seconds a shared lease lives unless its balancer renews it (a balancer that dies gives "
        "its slots back after this).",
        seconds(maximum=3600), reload="restart",
    )
    workers: int = setting(
        1,
        "Balancer processes sharing the proxy port (SO_REUSEPORT) and the fleet; above 1 needs "
        "--state and a tcp: --listen endpoint. Worker i serves management on its port + i.",
        count(1, 64), reload="restart",
    )
    worker_index: int = setting(
        0, "Set by worker 0 on the workers it starts; do not set it yourself.", count(0, 63), reload="restart"
    )
    shutdown_timeout: float = setting(
        30.0,
        "Seconds running requests may take to finish when the balancer stops (SIGTERM).",
        seconds(zero_allowed=True), reload="service.shutdown_timeout",
    )
    header_timeout: float = setting(
        10.0,
        "Seconds a client may take to send a request's line and headers, from its first byte "
        "(slower: 408 and closed).",
        seconds(), reload="client_limits",
    )
    min_request_body_rate: int = setting(
        8192,
        "Bytes per second a request body must average once its headers are in, after "
        "--header-timeout seconds of grace (slower: 408 and closed).",
        count(1, 1 << 30), reload="client_limits",
    )
    client_idle_timeout: float = setting(
        120.0, "Seconds a client connection may stay idle between requests.", seconds(), reload="client_limits"
    )
    max_connections: int = setting(
        1024,
        "Open client connections per listener (proxy, management); more are answered 503 and "
        "closed. Lowered at start to what the open-files limit allows.",
        count(1, 1_000_000), reload="client_limits",
    )
    max_connections_per_client: int = setting(
        0,
        "Open connections one client address may hold per listener (0: no limit); more are "
        "answered 429 and closed. Leave 0 behind a proxy or load balancer that hides client "
        "addresses: every connection would come from its address.",
        count(0, 1_000_000), reload="client_limits",
    )
    max_request_bodies_memory: int = setting(
        256 * 1024 * 1024,
        "Bytes all request bodies held at once may take; a body that would pass it is "
        "answered 503 before it is read. At least --max-request-body.",
        count(1, 1 << 40), reload="body_memory.limit",
    )
    simulated_fleet: int = setting(
        0, "Start N simulated llama.cpp servers in-process as upstreams (demo).", count(0, 64), reload="restart"
    )
    model_alias: str | None = setting(
        None,
        "Model names that stand for others, NAME=TARGET[,NAME=TARGET...]: a request naming NAME "
        "goes to TARGET (its body says TARGET upstream).",
        Converted(_model_aliases, "name=target,..."),
        reload="proxy",
    )
    router_events: bool = setting(
        True,
        "Follow each router-mode upstream's GET /models/sse: a load, failure or unload is read at "
        "once instead of at the next probe; polling goes on (every --probe-interval, or every "
        "third one while the stream is up and the router runs none of our requests).",
        Flag(),
        reload="restart",
    )
    model_placement: bool = setting(
        False,
        "Load models on router-mode upstreams where requests wait for them (POST /models/load, "
        "in a free place, else evicting an idle copy whose model's demand its other copies cover), "
        "instead of letting each router autoload them.",
        Flag(),
        reload="restart",
    )
    model_min_residency: float = setting(
        30.0, "With --model-placement: a loaded model is not evicted before this many seconds.",
        seconds(zero_allowed=True), reload="restart",
    )
    model_load_timeout: float = setting(
        300.0, "With --model-placement: a load not finished in this many seconds has failed.", seconds(),
        reload="restart",
    )
    model_replicas_max: int = setting(
        1, "With --model-placement: copies of one model at most (one more is loaded only while its "
        "demand stays above its copies' slots, see --model-replica-after).", count(1, 1000),
        reload="restart",
    )
    model_replica_after: float = setting(
        10.0, "With --model-placement: a model gets one more copy only after its requests have waited, "
        "every slot of its copies busy and its demand above their slots, for this many seconds.",
        seconds(zero_allowed=True), reload="restart",
    )
    model_demand_window: float = setting(
        30.0, "With --model-placement: a model's demand (slots its requests keep busy) is counted over "
        "this many seconds of arrivals.", seconds(), reload="restart",
    )
    default_model: str | None = setting(
        None,
        "The model of a request that names none, when the fleet serves several (router-mode "
        "upstreams); without it such a request is answered 400.",
        Text(1024),
        reload="proxy",
    )


BALANCER_SETTINGS = settings_of(BalancerConfig, env_prefix="PADDLER_")


def _file(path: str) -> tuple[dict[str, Any], list[UpstreamSpec]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from None
    upstreams: list[UpstreamSpec] = []
    for key in ("upstream", "upstreams"):
        value = data.pop(key, None)
        if value is None:
            continue
        where = f"{path}: {key}"
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be an array of tables or URLs")
        upstreams.extend(_file_upstream(entry, f"{where}[{i}]") for i, entry in enumerate(value))
    return file_keys(BALANCER_SETTINGS, data, path), upstreams


def _file_upstream(entry: Any, where: str) -> UpstreamSpec:
    if isinstance(entry, str):
        return parse_upstream(entry, where)
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table with url, name and api_key")
    unknown = set(entry) - {"url", "name", "api_key"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if "url" not in entry:
        raise ConfigError(f"{where}: url is missing")
    spec = parse_upstream(str(entry["url"]), f"{where}.url")
    for key in ("name", "api_key"):
        if key in entry and not isinstance(entry[key], str):
            raise ConfigError(f"{where}.{key} must be a string")
    return UpstreamSpec(spec.url, entry.get("name") or spec.name, entry.get("api_key"))


def build_config(
    flags: Mapping[str, Any],
    flag_upstreams: Sequence[str],
    env: Mapping[str, str],
    config_path: str | None = None,
) -> BalancerConfig:
    """Merge the sources (flags given explicitly are those not C{None} in C{flags})."""
    path = config_path or env.get("PADDLER_CONFIG")
    file_values, file_upstreams = _file(path) if path else ({}, [])
    values = from_sources(BALANCER_SETTINGS, flags, env, file_values, path or "")
    env_upstreams = [
        parse_upstream(part, "PADDLER_UPSTREAMS")
        for part in env.get("PADDLER_UPSTREAMS", "").split(",")
        if part.strip()
    ]
    upstreams = [parse_upstream(u, "--upstream") for u in flag_upstreams] or env_upstreams or file_upstreams
    urls: set[str] = set()
    names: set[str] = set()
    for spec in upstreams:
        if spec.url in urls:
            raise ConfigError(f"upstream {spec.url} is given twice")
        urls.add(spec.url)
        if spec.name is not None:
            if spec.name in names:
                raise ConfigError(f"upstream name {spec.name!r} is given twice")
            names.add(spec.name)
    config = BalancerConfig(upstreams=list(upstreams), **values)
    if config.workers > 1 or config.worker_index:
        if not config.state:
            raise ConfigError("--workers above 1 needs --state redis://... (the workers share the fleet through it)")
        if not config.listen.startswith(("tcp:", "tcp6:")):
            raise ConfigError(f"--workers above 1 needs a tcp: --listen endpoint, got {config.listen!r}")
    if config.max_request_bodies_memory < config.max_request_body:
        raise ConfigError(
            f"--max-request-bodies-memory ({config.max_request_bodies_memory}) must be at least "
            f"--max-request-body ({config.max_request_body})"
        )
    for spec in config.upstreams:
        for flag, endpoint in (("--listen", config.listen), ("--management-listen", config.management_listen)):
            if url_reaches_endpoint(spec.url, endpoint):
                raise ConfigError(
                    f"upstream {spec.url} is this balancer's own {flag} address ({endpoint}), "
                    "not a llama.cpp server"
                )
    vet_upstreams(config)
    return config


def vet_upstreams(config: BalancerConfig, resolve: Any = None) -> None:
    """
    Refuse configured upstreams in refused networks (L{paddler.fleet.addresses}):
    addresses always; names too when C{resolve(host) -> list of addresses}
    is given (at start, before the reactor runs).
    """
    from urllib.parse import urlsplit

    from paddler.fleet.addresses import AddressVetter, UpstreamRefused, literal_address

    own = own_listeners(config)
    vetter = AddressVetter(None, own=lambda: own, allowed=config.allow_upstream_network)  # type: ignore[arg-type]
    for spec in config.upstreams:
        try:
            if vetter.vet_literal(spec.url) is not None or resolve is None:
                continue
            parts = urlsplit(spec.url)
            host = parts.hostname or ""
            for text in resolve(host):
                address = literal_address(text)
                if address is not None:
                    vetter.check_address(spec.url, address, parts.port or 0, name=host)
        except UpstreamRefused as e:
            raise ConfigError(f"upstream {spec.url}: {e.message}") from None


def own_listeners(config: BalancerConfig) -> list[Any]:
    """The L{paddler.fleet.addresses.OwnListener}s of the configured tcp listen endpoints."""
    from paddler.fleet.addresses import own_listener
    from paddler.server.listeners import endpoint_fields

    found = []
    for endpoint in (config.listen, config.management_listen):
        fields = endpoint_fields(endpoint.strip())
        if fields[0].lower() not in ("tcp", "tcp6") or len(fields) < 2:
            continue
        port_text = fields[1][len("port="):] if fields[1].startswith("port=") else fields[1]
        interface = ""
        for part in fields[2:]:
            if part.startswith("interface="):
                interface = part[len("interface="):].replace("\\:", ":").strip("[]")
        try:
            port = int(port_text)
        except ValueError:
            continue
        if port:
            found.append(own_listener(interface or "0.0.0.0", port))
    return found


def resolve_at_start(host: str, timeout: float = 2.0) -> list[str]:
    """C{host}'s addresses by getaddrinfo, within C{timeout} (none when it fails or is late: the probes tell)."""
    import concurrent.futures
    import socket

    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1", "::1"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(socket.getaddrinfo, host, None, 0, socket.SOCK_STREAM)
        return [str(info[4][0]) for info in future.result(timeout=timeout)]
    except (OSError, UnicodeError, concurrent.futures.TimeoutError):
        return []
    finally:
        pool.shutdown(wait=False)


_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}


def url_reaches_endpoint(url: str, endpoint: str) -> bool:
    """
    Whether the upstream C{url} (normalised) is the TCP server endpoint
    C{endpoint} of this host: same port, and the endpoint's interface is the
    URL's host, or a loopback or wildcard interface reached at a loopback
    name. Other hosts and names cannot be told apart without connecting
    (the probes check the answer's C{X-Paddler-Instance} for those).
    """
    from urllib.parse import urlsplit

    from paddler.server.listeners import endpoint_fields

    fields = endpoint_fields(endpoint.strip())
    if fields[0].lower() not in ("tcp", "tcp6") or len(fields) < 2:
        return False
    port_text = fields[1]
    if port_text.startswith("port="):
        port_text = port_text[len("port="):]
    interface = ""
    for part in fields[2:]:
        if part.startswith("interface="):
            interface = part[len("interface="):].strip("[]").lower()
    try:
        port = int(port_text)
        parts = urlsplit(url)
        url_port = parts.port
    except ValueError:
        return False
    if port == 0 or url_port != port:
        return False
    host = (parts.hostname or "").lower()
    shown = f"[{host}]" if ":" in host else host
    if interface in ("", "0.0.0.0", "::"):
        return shown in _LOOPBACK_NAMES
    if interface == host:
        return True
    return shown in _LOOPBACK_NAMES and (interface in ("127.0.0.1", "::1", "localhost"))


# -- paddler agent ------------------------------------------------------------


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one agent (``paddler agent`` flags or ``PADDLER_AGENT_*`` variables)."""

    llamacpp: str = setting("", "URL of the local llama.cpp server, e.g. http://127.0.0.1:8080.", URL)
    balancer: str = setting("", "The balancer's management URL, e.g. http://10.0.0.9:8085.", URL)
    external_url: str = setting(
        "", "URL the balancer reaches the server at.", URL, placeholder="--llamacpp"
    )
    name: str = setting(
        "", "Name of this host in the fleet.", Text(128), placeholder="host:port of --external-url"
    )
    llamacpp_api_key: str | None = setting(
        None, "API key of the local llama.cpp.", SECRET, secret=True, env="PADDLER_LLAMACPP_API_KEY"
    )
    management_token: str | None = setting(
        None, "Bearer token of the management API.", SECRET, secret=True, env="PADDLER_MANAGEMENT_TOKEN"
    )
    interval: float = setting(1.0, "Seconds between reports.", seconds(maximum=300))
    timeout: float = setting(
        2.0, "Deadline of each request to llama.cpp and to the balancer, in seconds.", seconds()
    )
    max_backoff: float = setting(
        30.0, "Longest wait between reports while the balancer fails, in seconds.", seconds()
    )
    drain_timeout: float = setting(
        30.0, "Longest wait on SIGTERM for in-flight requests, in seconds.", seconds(zero_allowed=True)
    )
    status_listen: str | None = setting(
        None, "Endpoint string for the agent's GET /health (off by default).", Endpoint()
    )
    drain_poll: float = 0.25


AGENT_SETTINGS = settings_of(AgentConfig, env_prefix="PADDLER_AGENT_")


def build_agent_config(flags: Mapping[str, Any], env: Mapping[str, str]) -> AgentConfig:
    """The agent's settings from its flags and environment; C{--llamacpp} and C{--balancer} are required."""
    values = from_sources(AGENT_SETTINGS, flags, env, {})
    for required in ("llamacpp", "balancer"):
        if not values.get(required):
            raise ConfigError(f"--{required} is required")
    external = values.setdefault("external_url", values["llamacpp"])
    values.setdefault("name", external.split("://", 1)[1])
    values["max_backoff"] = max(values.get("max_backoff", AgentConfig.max_backoff), values.get("interval", 1.0))
    return AgentConfig(**values)


# -- paddler simulate ---------------------------------------------------------

_PORT_RUN = re.compile(r"(?:tcp6?):(\d+)")


def _model_list(text: str) -> str:
    from paddler.simulator.router import parse_models

    return ",".join(parse_models(text))


def _failing_list(text: str) -> str:
    from paddler.simulator.router import parse_failing

    return ",".join(f"{name}={code}" for name, code in parse_failing(text).items())


@dataclass(frozen=True)
class SimulateConfig:
    """Settings of ``paddler simulate``."""

    listen: str = setting(
        "tcp:8081:interface=127.0.0.1",
        "Endpoint string to listen on; with --fleet the servers take consecutive ports.",
        Endpoint(),
        short="l",
    )
    fleet: int = setting(1, "Number of servers.", count(1, 1000))
    slots: int = setting(4, "Parallel slots per server (llama-server -np).", count(1, 4096), short="s")
    model: str = setting("simulated.gguf", "Model name reported by /props and /v1/models.", Text(1024), short="m")
    tokens_per_second: float = setting(50.0, "Generation speed of each slot.", rate(1e6, "tokens/s"))
    prompt_tokens_per_second: float = setting(
        2000.0, "Prompt processing speed of each slot.", rate(1e9, "tokens/s")
    )
    n_ctx: int = setting(2048, "Context size of each slot.", count(1, 1 << 24))
    load_seconds: float = setting(
        0.0, "Answer 503 'Loading model' for this long after start.", seconds(zero_allowed=True)
    )
    seed: int = setting(0, "Random seed, so runs are reproducible (server i uses seed + i).", count(0, 1 << 62))
    api_key: str | None = setting(
        None, "Require 'Authorization: Bearer KEY', like llama-server --api-key.", SECRET, secret=True
    )
    slot_prompt_similarity: float = setting(
        0.1,
        "Share of a new prompt an idle slot's tokens must match to be chosen for it, "
        "like llama-server -sps (0 = off).",
        Number(0, maximum=1),
    )
    cache_ram: int = setting(
        8192,
        "Host-memory prompt cache in MiB, like llama-server --cache-ram (-1 = no byte limit, 0 = off).",
        Number(-1, maximum=1 << 30, whole=True, unit="MiB"),
    )
    cache_bytes_per_token: int = setting(
        131072,
        "Bytes one cached token costs in the host cache (131072: an 8B-parameter f16 KV; "
        "1024: the tests' tiny model).",
        count(1, 1 << 30),
    )
    cache_idle_slots: bool = setting(
        True, "Copy idle slots to the host cache at each task launch, like llama-server.", Flag()
    )
    kv_unified: bool = setting(
        False,
        "One KV pool for all slots, like llama-server -kvu: idle slots are cleared once copied "
        "to the host cache.",
        Flag(),
    )
    slots_endpoint: bool = setting(True, "Answer /slots (off: 501, like llama-server --no-slots).", Flag())
    metrics: bool = setting(True, "Answer /metrics (off: 501, like llama-server without --metrics).", Flag())
    models: str | None = setting(
        None,
        "Router mode, like llama-server --models-dir: serve these models (comma-separated names) "
        "on one port, each loaded on demand with its own --slots.",
        Converted(_model_list, "name,name,..."),
    )
    models_max: int = setting(
        4, "Router mode: models loaded at once, like llama-server --models-max (0 = no limit).", count(0, 1000)
    )
    models_autoload: bool = setting(
        True,
        "Router mode: load a model when a request names it, like llama-server --models-autoload.",
        Flag(),
    )
    model_load_seconds: float = setting(
        0.1, "Router mode: how long loading one model takes.", seconds(zero_allowed=True)
    )
    models_fail_load: str | None = setting(
        None,
        "Router mode: these models fail to load, with the child's exit code (MODEL=CODE,...).",
        Converted(_failing_list, "model=code,..."),
    )
    sleep_idle_seconds: float = setting(
        0.0,
        "Router mode: a loaded model that got no task for this many seconds sleeps (frees its "
        "memory and KV cache, keeps its place; the next task wakes it in --model-load-seconds), "
        "like llama-server --sleep-idle-seconds; /props and /metrics are no task. 0 = never.",
        seconds(zero_allowed=True),
    )


SIMULATE_SETTINGS = settings_of(SimulateConfig)


# -- every command --------------------------------------------------------------

#: The levels C{PADDLER_LOG_LEVEL} may name, lowest first.
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


def _log_level(text: str) -> str:
    name = text.strip().lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return name


@dataclass(frozen=True)
class LoggingConfig:
    """Settings of every command's log output (environment only: they apply before any flag is read)."""

    log_level: str = setting(
        "info",
        "Lowest level of the log lines written to stdout (every command, and twistd --logger=paddler.logs.observer).",
        Converted(_log_level, " | ".join(LOG_LEVELS)),
        cli=False,
    )


LOGGING_SETTINGS = settings_of(LoggingConfig, env_prefix="PADDLER_")


def build_logging_config(env: Mapping[str, str]) -> LoggingConfig:
    """The log settings from the environment; an unknown level is a L{ConfigError} naming the variable."""
    values = from_sources(LOGGING_SETTINGS, {}, env, {})
    return LoggingConfig(**values)


def configuration_reference() -> str:
    """docs/configuration.md, generated from the settings tables (``python -m paddler.config``)."""
    from paddler.settings import reference

    lines = [
        "# Configuration reference",
        "",
        "Generated from the settings tables in `paddler/config.py` by `python -m paddler.config`;",
        "a test fails when this file and the code disagree.",
        "",
        "## `paddler balancer`",
        "",
        "Precedence, highest first: flags, environment variables, the `--config` TOML file",
        "(named by `--config` or `PADDLER_CONFIG`), defaults. In the file a key may be written",
        "with `-` or `_`. Upstreams come whole from the first source that names any:",
        "`--upstream URL` or `--upstream NAME=URL` (repeatable), `PADDLER_UPSTREAMS=url,name=url,...`,",
        "or `[[upstream]]` tables with `url`, `name` and `api_key`.",
        "",
        *reference(BALANCER_SETTINGS),
        "",
        "## `paddler agent`",
        "",
        "Flags, then environment variables. `--llamacpp` and `--balancer` are required.",
        "",
        *reference(AGENT_SETTINGS, file_keys_too=False),
        "",
        "## `paddler simulate`",
        "",
        "Flags only.",
        "",
        *reference(SIMULATE_SETTINGS, file_keys_too=False),
        "",
        "## Every command",
        "",
        "Environment only; an unknown value stops the command with an error naming the variable.",
        "",
        *reference(LOGGING_SETTINGS, file_keys_too=False),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(configuration_reference(), end="")  # noqa: T201 - the generator's output
