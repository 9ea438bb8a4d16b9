"""The log observer of the ``paddler`` console script (and of ``twistd --logger=paddler.logs.observer``).

Text lines on stdout, filtered by level; the level comes from
``PADDLER_LOG_LEVEL`` (debug, info, warn, error, critical; default info), read
through the settings table (L{paddler.config.LoggingConfig}): an unknown level
is a L{paddler.settings.ConfigError} naming the variable, not a silent info.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    textFileLogObserver,
)
from zope.interface import provider


def level_from_env(environ: Mapping[str, str] | None = None) -> LogLevel:
    """The level C{PADDLER_LOG_LEVEL} names (info when unset); L{ConfigError} when it names none."""
    from paddler.config import build_logging_config

    config = build_logging_config(os.environ if environ is None else environ)
    return LogLevel.levelWithName(config.log_level)


#: Twisted's lines for every outbound connection pool factory: noise at any level.
_NOISE = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


@provider(ILogFilterPredicate)
def drop_noise(event: dict[str, Any]) -> PredicateResult:
    """Drop Twisted's per-connection factory lines (the HTTP client's pools start one per connection)."""
    return PredicateResult.no if event.get("log_format") in _NOISE else PredicateResult.maybe


def observer() -> ILogObserver:
    """Text lines on stdout at C{PADDLER_LOG_LEVEL} and above, without Twisted's connection noise."""
    return FilteringLogObserver(
        textFileLogObserver(sys.stdout), [drop_noise, LogLevelFilterPredicate(level_from_env())]
    )
