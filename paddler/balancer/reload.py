"""Reloading the configuration while running (SIGHUP): what changed, applied without a dropped stream.

Applied at once: the static upstreams (new ones added; removed ones drained
and removed once idle), the policy, buffer limits, retries, timeouts, probe
settings, the upstream API key, the agents' expiry, the client limits
(head deadline, body rate, idle timeout, connection cap, body memory). Listeners, the
management token, StatsD and the dashboard need a restart: a change to them
is logged as such and not applied. A configuration that no longer parses
changes nothing (the error is logged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from paddler.balancer.proxy import ProxyConfig
from paddler.config import BalancerConfig
from paddler.fleet.upstream import Upstream, upstream_id
from paddler.routing.policies import CHOOSERS
from paddler.settings import ConfigError

if TYPE_CHECKING:
    from paddler.balancer.service import BalancerService

#: Settings that take effect only when the balancer restarts.
NEEDS_RESTART = (
    "listen",
    "management_listen",
    "management_token",
    "management_insecure",
    "dashboard",
    "access_log",
    "statsd",
    "statsd_prefix",
    "statsd_interval",
    "simulated_fleet",
)


#: Settings of the listeners' client limits (applied to connections from their next request on).
CLIENT_LIMITS = (
    "header_timeout", "min_request_body_rate", "client_idle_timeout", "max_connections", "max_connections_per_client",
)


class Reloader:
    """Reads the configuration again and applies the difference to a running L{BalancerService}."""

    log = Logger()

    def __init__(
        self,
        service: BalancerService,
        read: Callable[[], BalancerConfig],
        prober: Any,
        open_files: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.service = service
        self.read = read
        self.prober = prober
        self.open_files = open_files

    def reload(self) -> list[str]:
        """Apply the configuration as it reads now; return the changes (each logged)."""
        try:
            new = self.read()
        except (ConfigError, ValueError) as e:
            self.log.warn("reload: the configuration is not valid, nothing changed: {error}", error=str(e))
            return []
        old = self.service.config
        changes = self._upstreams(old, new)
        for f in dataclasses.fields(BalancerConfig):
            name = f.name
            if name == "upstreams" or getattr(old, name) == getattr(new, name):
                continue
            shown = "(hidden)" if name in ("management_token", "llamacpp_api_key") else getattr(new, name)
            if name in NEEDS_RESTART:
                changes.append(f"{name} changed to {shown}; it takes effect at the next restart")
                continue
            self._apply(name, new)
            changes.append(f"{name} is now {shown}")
        kept = {name: getattr(old, name) for name in NEEDS_RESTART}
        self.service.config = dataclasses.replace(new, **kept)
        for line in changes:
            self.log.info("reload: {change}", change=line)
        if not changes:
            self.log.info("reload: the configuration is unchanged")
        return changes

    def _apply(self, name: str, new: BalancerConfig) -> None:
        service = self.service
        pool = service.pool
        if name == "policy":
            pool.chooser = CHOOSERS[new.policy](pool.clock)
        elif name == "max_buffered_requests":
            pool.max_buffered = new.max_buffered_requests
        elif name == "buffered_request_timeout":
            pool.buffer_timeout = new.buffered_request_timeout
        elif name == "no_upstream_timeout":
            pool.no_upstream_timeout = new.no_upstream_timeout
        elif name == "allow_upstream_network" and getattr(service, "vetter", None) is not None:
            service.vetter.allowed = tuple(new.allow_upstream_network)
        elif name == "shutdown_timeout":
            service.shutdown_timeout = new.shutdown_timeout
        elif name == "agent_expiry" and service.registry is not None:
            service.registry.expiry = new.agent_expiry
        elif name == "probe_interval" and service.probes is not None:
            service.probes.set_interval(new.probe_interval)
            pool.recheck_interval = new.probe_interval
            if service.registry is not None:
                service.registry.check_every = new.probe_interval
        elif name == "probe_timeout":
            self.prober.timeout = new.probe_timeout
        elif name == "probe_mode":
            self.prober.mode = new.probe_mode
        elif name == "unhealthy_after":
            self.prober.unhealthy_after = new.unhealthy_after
        elif name in CLIENT_LIMITS:
            from paddler.web.descriptors import limits_for

            limits = limits_for(new, self.open_files())
            for site in service.sites:
                site.limits = limits
                site.timeOut = limits.idle_timeout
        elif name == "max_request_bodies_memory" and service.body_memory is not None:
            service.body_memory.limit = new.max_request_bodies_memory
        if name == "llamacpp_api_key":
            self.prober.api_key = new.llamacpp_api_key
        service.proxy.config = ProxyConfig.from_balancer(new)

    def _upstreams(self, old: BalancerConfig, new: BalancerConfig) -> list[str]:
        pool = self.service.pool
        changes = []
        before = {spec.url: spec for spec in old.upstreams}
        after = {spec.url: spec for spec in new.upstreams}
        for url, spec in after.items():
            current = pool.upstreams.get(upstream_id(url))
            if url not in before or current is None:
                if current is not None and current.source != "static":
                    changes.append(f"upstream {url} is already in the fleet from {current.source}; left as it is")
                    continue
                clock = pool.clock
                pool.add(Upstream(spec.url, spec.name, spec.api_key, source="static", clock=clock))
                changes.append(f"upstream {spec.name or url} ({url}) added")
                continue
            if before[url] != spec:
                if spec.name:
                    current.name = spec.name
                current.api_key = spec.api_key
                changes.append(f"upstream {url}: name or api_key updated")
            if pool.removal_pending(current.id):
                pool.undrain(current.id)
                changes.append(f"upstream {url} stays (its pending removal is cancelled)")
        for url in before.keys() - after.keys():
            current = pool.upstreams.get(upstream_id(url))
            if current is None or current.source != "static":
                continue
            pool.remove_when_idle(current.id)
            changes.append(
                f"upstream {current.name} ({url}) removed from the configuration: draining, "
                f"removed once its {current.in_flight} requests finish"
            )
        return changes
