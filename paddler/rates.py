"""A decaying event rate on an injected clock, used by the pool (how fast slots free) and the
routing model (how fast a server drains its queue): in a neutral module so that neither
package imports the other for it."""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime

#: Half-life of a drain rate's decaying count, in seconds.
DRAIN_HALF_LIFE_SECONDS = 30.0
#: The shortest window a young rate is measured over, in seconds.
MIN_DRAIN_WINDOW_SECONDS = 5.0


class DecayingRate:
    """Events per second, from an exponentially decaying count on a clock."""

    def __init__(
        self,
        clock: IReactorTime,
        half_life: float = DRAIN_HALF_LIFE_SECONDS,
        min_window: float = MIN_DRAIN_WINDOW_SECONDS,
    ) -> None:
        self.clock = clock
        self.min_window = min_window
        self.decay = math.log(2) / half_life
        self.count = 0.0
        self.started = clock.seconds()
        self.updated = self.started
        self.events = 0

    def _advance(self) -> float:
        now = self.clock.seconds()
        if now > self.updated:
            self.count *= math.exp(-self.decay * (now - self.updated))
            self.updated = now
        return now

    def event(self) -> None:
        """One event now."""
        self._advance()
        self.count += 1.0
        self.events += 1

    def rate(self) -> float:
        """Events per second (0 before the first event)."""
        now = self._advance()
        if not self.events:
            return 0.0
        window = max(now - self.started, self.min_window)
        return self.count * self.decay / (1.0 - math.exp(-self.decay * window))
