"""Run ``paddler`` under cProfile and write the stats when the reactor shuts down.

``python -m cProfile`` cannot be used: twistd re-raises SIGTERM after a clean
shutdown, so the interpreter dies before cProfile writes its file.

    python -m bench.profiled OUT.prof balancer --listen ... --upstream ...
"""

from __future__ import annotations

import cProfile
import sys


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile()
    from paddler.cli import install_reactor, parse

    install_reactor(parse(args, sys.stderr))  # the reactor paddler would run on
    from twisted.internet import reactor

    def dump() -> None:
        profiler.disable()
        profiler.dump_stats(out)

    reactor.addSystemEventTrigger("after", "shutdown", dump)  # type: ignore[attr-defined]
    from paddler.cli import main as paddler_main

    profiler.enable()
    paddler_main(args)


if __name__ == "__main__":
    main()
