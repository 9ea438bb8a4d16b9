"""The ``paddler`` console script: ``twistd -n paddler ...`` for people who do not know twistd."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def twistd_argv(args: Sequence[str]) -> list[str]:
    """The twistd command line equivalent to ``paddler ARGS``: foreground, no pid file."""
    return ["twistd", "--nodaemon", "--pidfile=", "--logger=paddler.logs.observer", "paddler", *args]


def main(argv: Sequence[str] | None = None) -> None:
    """Run a paddler subcommand in the foreground under twistd."""
    from twisted.scripts.twistd import run

    sys.argv = twistd_argv(sys.argv[1:] if argv is None else argv)
    run()
