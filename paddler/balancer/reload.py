"""Reloading the configuration while running (SIGHUP): what changed, applied without a dropped stream.

Each setting's entry in the settings table (L{paddler.config.BalancerConfig})
says whether a reload applies it and how (L{paddler.settings.Info.reload});
this module has no list of its own. Applied at once: the static upstreams
(new ones added; removed ones drained and removed once idle), the policy,
buffer limits, retries, timeouts, probe settings, the upstream API key, the
agents' expiry, the client limits (head deadline, body rate, idle timeout,
connection cap, body memory). Listeners, the management token, StatsD, the
dashboard, the shared state and the workers need a restart: a change to them
is logged as such and not applied. A configuration that no longer parses
changes nothing (the error is logged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from paddler.balancer.proxy import ProxyConfig
from paddler.config import BALANCER_SETTINGS, BalancerConfig
from paddler.fleet.upstream import Upstream, upstream_id
from paddler.routing.policies import CHOOSERS
from paddler.settings import RESTART, ConfigError

if TYPE_CHECKING:
    from paddler.balancer.service import BalancerService

#: How a reload applies each balancer setting, as its entry in the settings table says
#: (an entry without one is a restart setting; tests/test_settings.py makes every entry say).
RELOAD = {s.name: s.info.reload or RESTART for s in BALANCER_SETTINGS}


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
        secret = {s.name for s in BALANCER_SETTINGS if s.info.secret}
        for f in dataclasses.fields(BalancerConfig):
            name = f.name
            if name == "upstreams" or getattr(old, name) == getattr(new, name):
                continue
            shown = "(hidden)" if name in secret else getattr(new, name)
            if RELOAD[name] == RESTART:
                changes.append(f"{name} changed to {shown}; it takes effect at the next restart")
                continue
            self._apply(name, new)
            changes.append(f"{name} is now {shown}")
        kept = {name: getattr(old, name) for name, how in RELOAD.items() if how == RESTART}
        self.service.config = dataclasses.replace(new, **kept)
        for line in changes:
            self.log.info("reload: {change}", change=line)
        if not changes:
            self.log.info("reload: the configuration is unchanged")
        return changes

    def _apply(self, name: str, new: BalancerConfig) -> None:
        """Apply the new value of setting C{name} the way its table entry says (L{RELOAD})."""
        service = self.service
        pool = service.pool
        how = RELOAD[name]
        value = getattr(new, name)
        if how == "chooser":
            pool.chooser = CHOOSERS[value](pool.clock)
        elif how == "probe_interval":
            if service.probes is not None:
                service.probes.set_interval(value)
                pool.recheck_interval = value
                if service.registry is not None:
                    service.registry.check_every = value
        elif how == "client_limits":
            from paddler.server.descriptors import limits_for

            limits = limits_for(new, self.open_files())
            for site in service.sites:
                site.limits = limits
                site.timeOut = limits.idle_timeout
        elif how != "proxy":
            part_name, _, attribute = how.partition(".")
            parts = {
                "pool": pool, "service": service, "prober": self.prober,
                "registry": service.registry, "body_memory": service.body_memory,
                "vetter": service.vetter,
            }
            part = parts[part_name]
            if part is not None:  # no registry or body budget in this balancer: nothing to set
                setattr(part, attribute, tuple(value) if isinstance(value, list) else value)
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
