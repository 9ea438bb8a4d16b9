"""The time of the current reactor turn, read once per turn: for bookkeeping done per chunk.

Why this module exists. The relay moves a stream's idle deadline with every
chunk it relays (L{paddler.balancer.relay.Relay}), which took one
C{reactor.seconds()} (C{time.time()}) per chunk: 0.25-0.37 us each on the
loaded 2-core machine paddler was measured on (a vDSO read, no system call:
C{perf} counts none; about what one Python function call costs there), a
tenth of the relay's Python work per chunk in memory (~2.5 us,
C{bench/relay_micro_ab.py}); one py-spy sample at 512 streams put 8 % of
the proxy's samples on that line, a later one far less. A deadline of
seconds does not need the time to the microsecond: the time when the
reactor woke for this turn's events is as good, and under load a turn
dispatches many chunks.

L{TurnClock.seconds} reads the reactor's clock once, the first time it is
asked in a turn, and keeps it until just before the reactor next waits
(L{paddler.interfaces.IReactorBeforePoll}, the lean reactor's hook). The
value is never ahead of the true time and at most one turn behind it. On a
reactor without that hook (Twisted's own, C{task.Clock} in tests) it is the
reactor's own C{seconds()}: exact, uncached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from paddler.interfaces import IReactorBeforePoll


class TurnClock:
    """C{seconds()} read once per reactor turn on a reactor with C{callBeforePoll}, else the reactor's own."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._now: float | None = None
        self.seconds: Callable[[], float]
        if IReactorBeforePoll.providedBy(reactor):
            self.seconds = self._turn_seconds
        else:
            self.seconds = reactor.seconds

    def _turn_seconds(self) -> float:
        now = self._now
        if now is None:
            now = self._now = self._reactor.seconds()
            self._reactor.callBeforePoll(self._forget)
        return now

    def _forget(self) -> None:
        self._now = None
