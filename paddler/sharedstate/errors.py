"""What can go wrong with shared slot state, for callers to tell apart."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every shared-state error."""


class StoreUnavailable(StoreError):
    """The store cannot answer now (Redis down, connection lost): fall back to local state."""


class StoreTimeout(StoreUnavailable):
    """The store did not answer within the command's deadline (it may still have acted)."""


class InvalidArgument(StoreError, ValueError):
    """A bad id, slot count, ttl or candidate list: rejected before anything is written."""


class IdInUse(StoreError):
    """The request id is already a lease or a waiter of another owner."""


class UnknownServer(StoreError):
    """The server is not registered in the store."""


class NoFreeSlot(StoreError):
    """No candidate has a free slot and waiting is disabled (C{max_waiting=0})."""


class SharedBufferFull(StoreError):
    """No candidate has a free slot and the fleet-wide buffer holds C{max_waiting} waiters."""


class WaitExpired(StoreError):
    """A waiter's deadline passed before a slot was handed to it."""


class WaiterLost(StoreError):
    """The store forgot a waiter (its owner was taken for dead, or Redis restarted empty)."""
