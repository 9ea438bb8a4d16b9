"""How many slots each model's requests call for, for model placement (``--model-placement``).

A model's demand is what its requests would keep busy, in slots: the
requests that arrived for it in the last C{window} seconds (at least those
still waiting) per second, times how long one of its requests holds a slot
(a decaying mean of its leases). Counted over a sliding window rather than
an exponential decay so that a change of popularity shows in full one window
later, and an old burst stops counting then. With shared state each balancer
counts only its own arrivals: the fleet-wide busy slots read by the probes
(the mean over the window of each check's sample) are a floor, so that a
model the other balancers keep busy is never seen as idle.
"""

from __future__ import annotations

import math
from collections import deque

from twisted.internet.interfaces import IReactorTime

__all__ = ["ModelDemand", "SlidingSum"]

#: How long a model's requests are assumed to hold a slot before one was seen to end, in seconds.
DEFAULT_SERVICE_SECONDS = 1.0
#: Weight of the newest lease in a model's decaying mean of lease seconds.
SERVICE_WEIGHT = 0.1
#: Names (requested models) tracked at most; past it, those with nothing in their window go.
MAX_NAMES = 1024


class SlidingSum:
    """The sum of values added in the last C{window} seconds, kept in C{buckets} time buckets
    (memory bounded whatever the rate; a value leaves the window up to one bucket late)."""

    def __init__(self, clock: IReactorTime, window: float, buckets: int = 30) -> None:
        self.clock = clock
        self.window = window
        self.width = window / buckets
        self._buckets: deque[list[float]] = deque()  # [bucket number, sum, count]

    def _prune(self, now: float) -> None:
        oldest = math.floor((now - self.window) / self.width)
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def add(self, value: float = 1.0) -> None:
        """Add C{value} now."""
        now = self.clock.seconds()
        number = math.floor(now / self.width)
        if self._buckets and self._buckets[-1][0] == number:
            self._buckets[-1][1] += value
            self._buckets[-1][2] += 1
        else:
            self._buckets.append([number, value, 1])
        self._prune(now)

    def total(self) -> float:
        """The sum over the window."""
        self._prune(self.clock.seconds())
        return sum(b[1] for b in self._buckets)

    def mean(self) -> float:
        """The mean of the values added over the window (0 when none)."""
        self._prune(self.clock.seconds())
        count = sum(b[2] for b in self._buckets)
        return sum(b[1] for b in self._buckets) / count if count else 0.0


class ModelDemand:
    """Per-model demand in slots (see the module docstring), fed by the pool: C{arrived} for
    each request (by the model name it asked for), C{served} for each lease given back (by
    the router model that served it); and by placement: C{observe_busy} once per check."""

    def __init__(self, clock: IReactorTime, window: float = 30.0) -> None:
        self.clock = clock
        self.window = window
        self.started = clock.seconds()
        self._arrivals: dict[str, SlidingSum] = {}
        self._busy: dict[str, SlidingSum] = {}
        #: Router model -> decaying mean of its lease seconds.
        self.service: dict[str, float] = {}

    def arrived(self, name: str) -> None:
        """A request for model C{name} arrived (not a retry)."""
        counter = self._arrivals.get(name)
        if counter is None:
            if len(self._arrivals) >= MAX_NAMES:
                for old in [n for n, c in self._arrivals.items() if not c.total()]:
                    del self._arrivals[old]
            counter = self._arrivals[name] = SlidingSum(self.clock, self.window)
        counter.add()

    def served(self, model: str, seconds: float) -> None:
        """A lease on a copy of router model C{model} was held C{seconds}."""
        seconds = max(0.0, seconds)
        mean = self.service.get(model)
        self.service[model] = seconds if mean is None else mean + SERVICE_WEIGHT * (seconds - mean)

    def observe_busy(self, model: str, busy: float) -> None:
        """C{model}'s copies have C{busy} slots processing now (fleet-wide: the routers' figures)."""
        counter = self._busy.get(model)
        if counter is None:
            counter = self._busy[model] = SlidingSum(self.clock, self.window)
        counter.add(busy)

    def service_seconds(self, model: str) -> float:
        """How long one of C{model}'s requests holds a slot: learned, else the mean over the
        models learned, else L{DEFAULT_SERVICE_SECONDS}."""
        if model in self.service:
            return self.service[model]
        if self.service:
            return sum(self.service.values()) / len(self.service)
        return DEFAULT_SERVICE_SECONDS

    def arrivals(self, name: str) -> float:
        """Requests for C{name} in the window."""
        counter = self._arrivals.get(name)
        return counter.total() if counter is not None else 0.0

    def slots(self, model: str, names: tuple[str, ...] | list[str] = (), waiting: int = 0) -> float:
        """C{model}'s demand in slots: requests for it (or any of C{names}, its aliases), at least
        the C{waiting} ones, per second over the window, times its lease seconds; at least the
        mean of its busy slots over the window."""
        now = self.clock.seconds()
        span = min(self.window, max(now - self.started, 1.0))
        arrived = sum(self.arrivals(n) for n in {model, *names})
        busy = self._busy.get(model)
        floor = busy.mean() if busy is not None else 0.0
        return max(max(arrived, float(waiting)) / span * self.service_seconds(model), floor)
