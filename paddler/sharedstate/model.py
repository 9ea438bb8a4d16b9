"""Values the shared slot store hands out, and the argument checks both stores share."""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from paddler.sharedstate.errors import InvalidArgument
from paddler.sharedstate.scripts import (
    MAX_BATCH,
    MAX_CANDIDATES,
    MAX_ID,
    MAX_META,
    MAX_MODEL,
    MAX_REAP,
    MAX_SLOTS,
    MAX_TTL_MS,
    MAX_WAITERS,
    MIN_TTL_MS,
)

_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,%d}" % MAX_ID)


def check_id(value: Any, what: str) -> str:
    """An owner, request or server id: 1-128 of C{A-Z a-z 0-9 . _ : @ / + = -}."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidArgument(f"{what} must be 1-{MAX_ID} characters of A-Z a-z 0-9 . _ : @ / + = -, got {value!r:.80}")
    return value


def check_count(value: Any, what: str, high: int = MAX_SLOTS, low: int = 0) -> int:
    """An integer in [low, high]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{what} must be an integer, got {value!r:.40}")
    if not low <= value <= high:
        raise InvalidArgument(f"{what} must be between {low} and {high}, got {value}")
    return value


def check_seconds(value: Any, what: str, low_ms: int = MIN_TTL_MS, allow_zero: bool = False) -> int:
    """A duration in seconds (int or float), returned in whole milliseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a number of seconds, got {value!r:.40}")
    ms = int(round(value * 1000))
    if allow_zero and ms == 0:
        return 0
    if not low_ms <= ms <= MAX_TTL_MS:
        raise InvalidArgument(f"{what} must be between {low_ms / 1000:g} and {MAX_TTL_MS // 1000} s, got {value!r}")
    return ms


def check_model(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value.encode("utf-8")) > MAX_MODEL:
        raise InvalidArgument(f"model must be a string of at most {MAX_MODEL} bytes")
    return value


def check_meta(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value.encode("utf-8")) > MAX_META:
        raise InvalidArgument(f"server metadata must be a string of at most {MAX_META} bytes")
    return value


def check_candidates(values: Iterable[Any]) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise InvalidArgument("candidates must be a sequence of server ids, not one string")
    candidates = [check_id(value, "candidate server id") for value in values]
    if len(candidates) > MAX_CANDIDATES:
        raise InvalidArgument(f"at most {MAX_CANDIDATES} candidates, got {len(candidates)}")
    if len(set(candidates)) != len(candidates):
        raise InvalidArgument("candidates must not repeat a server")
    return candidates


LIMITS = {
    "max_batch": MAX_BATCH,
    "max_reap": MAX_REAP,
    "max_waiters": MAX_WAITERS,
}


class Release(enum.Enum):
    """What a release or cancel did in the store."""

    UNKNOWN = 0  # nothing by that id (already released, reaped or lost)
    RELEASED = 1  # a lease ended: its slot went to the oldest waiter that can use it, or was freed
    CANCELLED = 2  # a waiter left the queue
    STALE = 3  # a lease of an older server generation (or removed server) ended: no slot added


class Reading(enum.Enum):
    """What became of a slot reading."""

    UNKNOWN_SERVER = 0
    APPLIED = 1
    OTHER_GENERATION = 2  # the server restarted since (a newer generation is registered)
    STALE = 3  # an older reading than one already applied, or from before Redis lost its data


@dataclass(frozen=True)
class ServerFigures:
    """One server as every replica sees it."""

    server_id: str
    total: int
    external: int  # busy slots that are no lease of ours (other clients), from the last reading
    leased: int  # live leases of every owner, current generation
    draining: bool
    generation: int
    seen: float | None  # store time (s) of the last reading
    mark: int
    waiting: int  # waiters that list this server
    meta: str

    @property
    def busy(self) -> int:
        return min(self.total, self.external + self.leased)

    @property
    def idle(self) -> int:
        return 0 if self.draining else self.total - self.busy


@dataclass(frozen=True)
class StoreSnapshot:
    """The whole shared state at one instant (store clock)."""

    now: float
    seq: int
    waiting: int
    oldest_wait: float
    leases: int
    owners: int
    epoch: str
    servers: dict[str, ServerFigures]
    owner_ids: tuple[str, ...] = ()  # the owners alive (at most 1,024 listed)


@dataclass(frozen=True)
class ReapResult:
    released: int
    stale: int
    expired_waiters: int
    orphaned_waiters: int
    owners_removed: int
    handed_on: int
    #: Lapsed placement records (the time a model was placed on a server) and expired claims dropped.
    placements_dropped: int = 0


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def parse_snapshot(reply: list[Any]) -> StoreSnapshot:
    head = reply[0]
    now_ms = int(head[0])
    oldest = int(head[3])
    servers: dict[str, ServerFigures] = {}
    for row in reply[1:]:
        server_id = _text(row[0])
        seen = int(row[6])
        servers[server_id] = ServerFigures(
            server_id=server_id,
            total=int(row[1]),
            external=int(row[2]),
            leased=int(row[3]),
            draining=bool(int(row[4])),
            generation=int(row[5]),
            seen=seen / 1000.0 if seen else None,
            mark=int(row[7]),
            waiting=int(row[8]),
            meta=_text(row[9]),
        )
    return StoreSnapshot(
        now=now_ms / 1000.0,
        seq=int(head[1]),
        waiting=int(head[2]),
        oldest_wait=max(0.0, (now_ms - oldest) / 1000.0) if oldest >= 0 else 0.0,
        leases=int(head[4]),
        owners=int(head[5]),
        epoch=_text(head[6]),
        servers=servers,
        owner_ids=tuple(sorted(_text(owner) for owner in head[7])) if len(head) > 7 else (),
    )
