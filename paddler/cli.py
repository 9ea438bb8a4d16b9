"""The ``paddler`` console script (and ``python -m paddler``).

It parses the command line itself, so it needs no Twisted plugin discovery
(``twistd paddler`` goes on working through ``twisted/plugins/``). A bad
flag, value or configuration file prints one line and a hint on stderr and
exits with status 2; a listener that cannot bind prints one line naming its
endpoint and exits with status 1. The service then runs in the foreground
until SIGTERM or SIGINT, which stop it gracefully (a second one stops it at
once); SIGHUP reloads the balancer's configuration. A balancer runs on
paddler's lean epoll reactor (L{paddler.lean_reactor}) unless
C{--no-lean-reactor}; ``twistd`` keeps its own reactor choice.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from twisted.python import usage

#: Exit status for a command line that cannot be used.
USAGE_ERROR = 2
#: Exit status when the service cannot start (a listener that cannot bind...).
START_ERROR = 1


def parse(argv: Sequence[str], stderr: TextIO) -> Any:
    """The parsed options, or C{SystemExit(2)} after one line (and a hint) on C{stderr}."""
    from paddler.tap import Options

    options = Options()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        command = "paddler" + (f" {options.subCommand}" if options.subCommand else "")
        print(f"{command}: error: {e}", file=stderr)  # noqa: T201 - before logging starts
        print(f"Try '{command} --help' for the options.", file=stderr)  # noqa: T201
        raise SystemExit(USAGE_ERROR) from None
    options.argv = list(argv)  # a balancer with --workers starts its workers with the same arguments
    return options


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run a paddler subcommand in the foreground."""
    try:
        options = parse(sys.argv[1:] if argv is None else argv, sys.stderr)
    except BrokenPipeError:  # --help into a pager or head that stopped reading
        raise SystemExit(0) from None
    install_reactor(options)
    from paddler.tap import run

    raise SystemExit(run(options, sys.stderr))


def install_reactor(options: Any) -> None:
    """
    Install paddler's lean epoll reactor (L{paddler.lean_reactor}) for a
    balancer unless C{--no-lean-reactor}; otherwise, and for the other
    subcommands, Twisted's default is installed on first use.
    """
    if "twisted.internet.reactor" in sys.modules:
        return  # one is installed already (a profiler or a test harness that imported it first)
    if options.subCommand == "balancer" and options.subOptions.config.lean_reactor:
        from paddler.lean_reactor import install

        install()
