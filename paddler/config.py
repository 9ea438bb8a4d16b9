"""Balancer settings from flags, environment and a TOML file.

Precedence, highest first: command-line flags, ``PADDLER_*`` environment
variables, the ``--config`` file, built-in defaults. Upstreams are taken
whole from the first of these that names any (they are not merged).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from paddler.routing.policies import CHOOSERS
from paddler.llamacpp.slots import PROBE_MODES
from paddler.fleet.upstream import InvalidUpstreamURL, normalise_url


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class UpstreamSpec:
    """An upstream named in the configuration."""

    url: str
    name: str | None = None
    api_key: str | None = None


@dataclass
class BalancerConfig:
    """Every balancer setting, with its safe default."""

    listen: str = "tcp:8086:interface=127.0.0.1"
    upstreams: list[UpstreamSpec] = field(default_factory=list)
    policy: str = "slots"
    probe_interval: float = 1.0
    probe_timeout: float = 2.0
    probe_mode: str = "slots"
    unhealthy_after: int = 2
    llamacpp_api_key: str | None = None
    slots_endpoint_enable: bool = False
    rewrite_host_header: bool = False
    max_request_body: int = 10 * 1024 * 1024
    upstream_timeout: float = 300.0
    idle_timeout: float = 60.0
    max_retries: int = 3
    max_buffered_requests: int = 30
    buffered_request_timeout: float = 30.0
    management_listen: str = "tcp:8085:interface=127.0.0.1"
    management_token: str | None = None
    management_insecure: bool = False
    agent_expiry: float = 3.0
    dashboard: bool = True
    access_log: bool = False
    statsd: str | None = None
    statsd_prefix: str = "paddler"
    statsd_interval: float = 1.0
    simulated_fleet: int = 0


_FIELDS = {f.name: f for f in dataclasses.fields(BalancerConfig)}
_BOOLEANS = {name for name, f in _FIELDS.items() if f.type in ("bool", bool)}
_POSITIVE = {"probe_interval", "probe_timeout", "upstream_timeout", "idle_timeout",
             "buffered_request_timeout", "agent_expiry", "statsd_interval"}
_COUNTS = {"unhealthy_after": 1, "max_request_body": 1, "max_retries": 0,
           "max_buffered_requests": 0, "simulated_fleet": 0}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_upstream(text: str, where: str) -> UpstreamSpec:
    """``URL`` or ``NAME=URL``."""
    name = None
    if "=" in text and not text.split("=", 1)[0].startswith(("http://", "https://")):
        name, text = text.split("=", 1)
        name = name.strip() or None
    try:
        return UpstreamSpec(url=normalise_url(text.strip()), name=name)
    except InvalidUpstreamURL as e:
        raise ConfigError(f"{where}: {e}")


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
        raise ConfigError(f"{where} must end with a port number, got {text!r}")
    if not 0 < port < 65536:
        raise ConfigError(f"{where} port must be between 1 and 65535, got {port}")
    return host, port


def _coerce(name: str, value: Any, where: str) -> Any:
    if name in _BOOLEANS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if name in _POSITIVE:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not number > 0 or math.isinf(number):
            raise ConfigError(f"{where} must be a positive number, got {value!r}")
        return number
    if name in _COUNTS:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a whole number, got {value!r}")
        if number < _COUNTS[name]:
            raise ConfigError(f"{where} must be at least {_COUNTS[name]}, got {number}")
        return number
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if name == "policy" and value not in CHOOSERS:
        raise ConfigError(f"{where} must be one of {', '.join(sorted(CHOOSERS))}, got {value!r}")
    if name == "statsd":
        host, port = parse_statsd_address(value, where)
        return f"udp:[{host}]:{port}" if ":" in host else f"udp:{host}:{port}"
    if name == "statsd_prefix" and not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*", value):
        raise ConfigError(
            f"{where} must be dot-separated names of letters, digits, _ and -, got {value!r}"
        )
    if name == "probe_mode" and value not in PROBE_MODES:
        raise ConfigError(f"{where} must be 'slots' or 'health', got {value!r}")
    return value


def _from_file(path: str) -> tuple[dict[str, Any], list[UpstreamSpec]]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it: {e.strerror}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}")
    settings: dict[str, Any] = {}
    upstreams: list[UpstreamSpec] = []
    for key, value in data.items():
        name = key.replace("-", "_")
        where = f"{path}: {key}"
        if name in ("upstream", "upstreams"):
            if not isinstance(value, list):
                raise ConfigError(f"{where} must be an array of tables or URLs")
            for index, entry in enumerate(value):
                upstreams.append(_file_upstream(entry, f"{where}[{index}]"))
        elif name in _FIELDS:
            settings[name] = _coerce(name, value, where)
        else:
            raise ConfigError(f"{where}: unknown setting")
    return settings, upstreams


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


def _from_env(env: Mapping[str, str]) -> tuple[dict[str, Any], list[UpstreamSpec]]:
    settings: dict[str, Any] = {}
    upstreams: list[UpstreamSpec] = []
    for name in _FIELDS:
        var = "PADDLER_" + name.upper()
        if name == "upstreams":
            raw = env.get(var, "").strip()
            upstreams = [parse_upstream(p, var) for p in raw.split(",") if p.strip()]
        elif var in env:
            settings[name] = _coerce(name, env[var], var)
    return settings, upstreams


def build_config(
    flags: Mapping[str, Any],
    flag_upstreams: Sequence[str],
    env: Mapping[str, str],
    config_path: str | None = None,
) -> BalancerConfig:
    """Merge the sources (flags given explicitly are those not C{None} in C{flags})."""
    path = config_path or env.get("PADDLER_CONFIG")
    file_settings, file_upstreams = _from_file(path) if path else ({}, [])
    env_settings, env_upstreams = _from_env(env)
    merged: dict[str, Any] = {**file_settings, **env_settings}
    for name, value in flags.items():
        if value is not None:
            merged[name] = _coerce(name, value, flag(name))
    upstreams = [parse_upstream(u, "--upstream") for u in flag_upstreams] or env_upstreams or file_upstreams
    seen: dict[str, str] = {}
    names: set[str] = set()
    for spec in upstreams:
        if spec.url in seen:
            raise ConfigError(f"upstream {spec.url} is given twice")
        seen[spec.url] = spec.url
        if spec.name is not None:
            if spec.name in names:
                raise ConfigError(f"upstream name {spec.name!r} is given twice")
            names.add(spec.name)
    return BalancerConfig(upstreams=list(upstreams), **merged)
