"""Log observers for twistd's ``--logger``: text to stdout, filtered by level.

The ``paddler`` console script uses L{observer}; the level comes from
``PADDLER_LOG_LEVEL`` (debug, info, warn, error; default info).
"""

from __future__ import annotations

import os
import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)


def level_from_env(environ: dict[str, str] | None = None) -> LogLevel:
    name = (environ if environ is not None else os.environ).get("PADDLER_LOG_LEVEL", "info")
    try:
        return LogLevel.levelWithName(name.strip().lower())
    except Exception:
        return LogLevel.info


def observer() -> ILogObserver:
    """Text lines on stdout at C{PADDLER_LOG_LEVEL} and above."""
    return FilteringLogObserver(
        textFileLogObserver(sys.stdout), [LogLevelFilterPredicate(level_from_env())]
    )
