"""The interface of a shared slot store (to move into L{paddler.interfaces})."""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISlotStore(Interface):
    """
    Slot leases, server readings and one FIFO of waiting requests, shared by
    every balancer process ("owner") that uses the same store. Every method
    returns a Deferred with a deadline: it fails with
    L{paddler.shared.errors.StoreUnavailable} (or its subclass
    L{paddler.shared.errors.StoreTimeout}) instead of hanging, and with
    L{paddler.shared.errors.InvalidArgument} before anything is written
    when an argument is out of bounds.
    """

    owner = Attribute("This process's owner id: leases and waiters are in its name.")
    is_up = Attribute("True while the store answers (False: serve from local state).")
    leases = Attribute("The leases this owner holds, id -> SharedLease (read only).")
    waiters = Attribute("The waiters this owner has queued, id -> Waiter, oldest first (read only).")

    def subscribe_state(listener):  # type: ignore[no-untyped-def]
        """Call C{listener(up: bool)} when the store goes up or down; return an unsubscriber."""

    def subscribe_reset(listener):  # type: ignore[no-untyped-def]
        """
        Call C{listener()} after the store found it had lost its data (Redis
        restarted empty) and re-created what this owner knew: servers,
        drains, its leases and its waiters. Return an unsubscriber.
        """

    def register_server(server_id, total, meta="", restarted=False):  # type: ignore[no-untyped-def]
        """
        Make the server known with C{total} slots (idempotent; every replica
        may call it). C{restarted=True} starts a new generation: leases of the
        old one give no slot back. Fires with the generation.
        """

    def unregister_server(server_id):  # type: ignore[no-untyped-def]
        """Forget the server (its generation is kept). Fires with whether it was known."""

    def probe_mark():  # type: ignore[no-untyped-def]
        """Take before sending a probe; pass to L{reading}. Fires with an int."""

    def reading(server_id, total, busy, mark, generation=None):  # type: ignore[no-untyped-def]
        """
        An absolute slot reading: C{total} slots, C{busy} processing (or
        C{None} when the server does not say), probe sent at C{mark}. Leases
        taken up to the mark and still open count as part of C{busy}; the rest
        of C{busy} is external. A freed slot goes to waiters at once. Fires
        with a L{paddler.shared.model.Reading}.
        """

    def acquire(request_id, candidates, model="", wait=None, max_waiting=None):  # type: ignore[no-untyped-def]
        """
        A slot on the first of C{candidates} (server ids, best first) with a
        free slot, unless an older waiter can use it. Fires with a
        L{SharedLease}, or a L{Waiter} queued in the global FIFO whose
        C{deferred} fires with the lease when a slot is handed to it. Fails
        with L{NoFreeSlot} (waiting disabled), L{BufferFull} or L{IdInUse}.
        """

    def release(request_id):  # type: ignore[no-untyped-def]
        """
        End the lease (its slot goes straight to the oldest waiter that can
        use it) or take the waiter out of the queue (its Deferred fails
        with CancelledError). Idempotent. Never fails for want of the store:
        while it is down it fires with C{None} and the release is sent when
        the store answers again. Otherwise fires with a
        L{paddler.shared.model.Release}. C{cancel} is the same call.
        """

    def adopt(request_id, server_id, model=""):  # type: ignore[no-untyped-def]
        """
        Count a request already running on C{server_id} as a lease of this
        owner (after the store lost it), even past the server's slots. Fires
        with the L{SharedLease} or C{None} when the server is unknown.
        """

    def renew():  # type: ignore[no-untyped-def]
        """Extend every lease of this owner and its heartbeat; fires with the ids the store had lost."""

    def poll():  # type: ignore[no-untyped-def]
        """Ask for the state of every local waiter (the backstop for lost pub/sub hints)."""

    def reap(limit=1000):  # type: ignore[no-untyped-def]
        """
        Release expired leases, drop waiters past their deadline or of dead
        owners (idempotent: every replica runs it). Fires with a
        L{paddler.shared.model.ReapResult}.
        """

    def drain(server_id):  # type: ignore[no-untyped-def]
        """No new lease on the server for anyone; fires with whether it is known."""

    def undrain(server_id):  # type: ignore[no-untyped-def]
        """Take requests again; free slots go to waiters at once. Fires with whether it is known."""

    def snapshot():  # type: ignore[no-untyped-def]
        """Fires with a L{paddler.shared.model.StoreSnapshot}: every server's shared figures."""
