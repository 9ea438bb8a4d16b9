"""Every zope interface of paddler lives here.

Interface methods take no ``self``; each implementation and each test fake
has a ``verifyObject`` test.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISlotChooser(Interface):
    """Picks the upstream that should serve the next slot-taking request (``--policy``)."""

    name = Attribute("The policy name given to --policy, e.g. 'slots'.")

    def prepare(body, path, headers):  # type: ignore[no-untyped-def]
        """
        What the policy needs to know of a request, derived once when it
        arrives (its prompt, its conversation), or C{None} when the policy
        needs nothing. C{body} is the parsed JSON object, C{path} the request
        path (bytes), C{headers} the request's C{Headers}. Never raises.
        """

    def choose(upstreams, model, demand):  # type: ignore[no-untyped-def]
        """
        Return the L{paddler.fleet.upstream.Upstream} to use, or C{None} when
        no upstream should take the request now (the request then waits).

        @param upstreams: the upstreams that may take traffic (healthy, not
            draining, serving C{model} when the fleet serves it).
        @param model: the model the request asked for, or C{None}.
        @param demand: what L{prepare} returned for the request (or C{None}).
            A policy that wants the request to wait until a given time sets
            C{demand.recheck_at}; the pool asks again then.
        """

    def rank(upstreams, model, demand):  # type: ignore[no-untyped-def]
        """
        Every one of C{upstreams}, best first, full ones included (they
        come last): the candidates a shared slot store grants from in order.
        """

    def dispatched(upstream, demand):  # type: ignore[no-untyped-def]
        """The request of C{demand} was given a slot on C{upstream}."""

    def finished(upstream, demand, timings):  # type: ignore[no-untyped-def]
        """
        The request ended on C{upstream}; C{timings} is llama.cpp's
        C{timings} object from its answer, or C{None}.
        """

    def forget(upstream):  # type: ignore[no-untyped-def]
        """C{upstream} left the fleet, restarted or lost its cache: drop what is known of it."""

    def describe(upstream):  # type: ignore[no-untyped-def]
        """Per-upstream figures of the policy (JSON-ready dict; empty for slot-blind policies)."""


class IUpstreamProber(Interface):
    """Finds out the health and slots of one upstream."""

    def probe(upstream):  # type: ignore[no-untyped-def]
        """
        Probe C{upstream} once, update it and the pool, and return a Deferred
        that fires when done (it never fails: problems are recorded on the
        upstream) with C{False} when the reading was the same as the last
        one (the probe service may then probe an idle upstream less often),
        anything else (C{True}, C{None}) otherwise. The Deferred has a deadline.
        """


class ISlotSource(Interface):
    """
    Where an L{paddler.fleet.pool.UpstreamPool} gets its slots and keeps its
    waiters: this process alone (L{paddler.fleet.pool.LocalSlotSource}), or a
    slot store shared with other balancers (L{paddler.sharedstate.fleet.SharedFleet}).
    The pool asks its source; the source never calls back into the pool's
    C{acquire}.
    """

    requests_waiting = Attribute(
        "Requests of this process waiting in a buffer other than the pool's own (the shared FIFO); 0 for local."
    )

    def acquire(model, exclude, demand, since):  # type: ignore[no-untyped-def]
        """
        A Deferred L{Lease} for a request for C{model} on an upstream whose id
        is not in C{exclude}, now or when a slot frees; C{since} is when the
        request began waiting (None: now), so its deadline stays the same.
        """

    def admits(upstream):  # type: ignore[no-untyped-def]
        """Whether this process may take one more slot on C{upstream} now (the shared store down: only its share)."""

    def taken_locally(lease):  # type: ignore[no-untyped-def]
        """The pool granted C{lease} from its own view of the fleet (a shared source adopts it later)."""

    def describe():  # type: ignore[no-untyped-def]
        """What C{/health} says of the source (a JSON-ready dict), or None when there is nothing to say."""

    def stop_waiting(error):  # type: ignore[no-untyped-def]
        """The balancer stops: this process's requests waiting in the source's buffer fail with C{error}."""


class ISlotStore(Interface):
    """
    Slot leases, server readings and one FIFO of waiting requests, shared by
    every balancer process ("owner") that uses the same store. Every method
    returns a Deferred with a deadline: it fails with
    L{paddler.sharedstate.errors.StoreUnavailable} (or its subclass
    L{paddler.sharedstate.errors.StoreTimeout}) instead of hanging, and with
    L{paddler.sharedstate.errors.InvalidArgument} before anything is written
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

    def claim_placement(model, server_id, victim_id, hold, residency):  # type: ignore[no-untyped-def]
        """
        Claim the loading of C{model} on server C{server_id} (a router's child
        upstream), evicting C{victim_id} or nothing (None). Fires with True when
        this owner may load it; False when another owner places the model now or
        the victim was placed less than C{residency} seconds ago. The claim
        lasts C{hold} seconds unless finished.
        """

    def finish_placement(model, hold=0.0):  # type: ignore[no-untyped-def]
        """End this owner's claim on C{model} at once or C{hold} seconds from now. Fires with a bool."""

    def reading(server_id, total, busy, mark, generation=None):  # type: ignore[no-untyped-def]
        """
        An absolute slot reading: C{total} slots, C{busy} processing (or
        C{None} when the server does not say), probe sent at C{mark}. Leases
        taken up to the mark and still open count as part of C{busy}; the rest
        of C{busy} is external. A freed slot goes to waiters at once. Fires
        with a L{paddler.sharedstate.model.Reading}.
        """

    def acquire(request_id, candidates, model="", wait=None, max_waiting=None):  # type: ignore[no-untyped-def]
        """
        A slot on the first of C{candidates} (server ids, best first) with a
        free slot, unless an older waiter can use it. Fires with a
        L{paddler.sharedstate.store.SharedLease}, or a L{Waiter} queued in the global FIFO whose
        C{deferred} fires with the lease when a slot is handed to it. Fails
        with L{NoFreeSlot} (waiting disabled), L{BufferFull} or L{IdInUse}.
        """

    def release(request_id, running=False):  # type: ignore[no-untyped-def]
        """
        End the lease (its slot goes straight to the oldest waiter that can
        use it) or take the waiter out of the queue (its Deferred fails
        with CancelledError). Idempotent. C{running}: the client left but the
        server goes on with the request: its slot counts as external load
        (nobody gets it) until the next reading of the server. Never fails for want of the store:
        while it is down it fires with C{None} and the release is sent when
        the store answers again. Otherwise fires with a
        L{paddler.sharedstate.model.Release}. C{cancel} is the same call.
        """

    def adopt(request_id, server_id, model=""):  # type: ignore[no-untyped-def]
        """
        Count a request already running on C{server_id} as a lease of this
        owner (after the store lost it), even past the server's slots. Fires
        with the L{paddler.sharedstate.store.SharedLease} or C{None} when the server is unknown.
        """

    def renew():  # type: ignore[no-untyped-def]
        """Extend every lease of this owner and its heartbeat; fires with the ids the store had lost."""

    def give_up_waiters(error):  # type: ignore[no-untyped-def]
        """
        Fail every local waiter with C{error} (an exception), oldest first:
        the store cannot be reached and their requests wait elsewhere, or the
        balancer stops. Their places in the store's FIFO are released now, or
        when it answers again. Returns how many (not a Deferred).
        """

    def poll():  # type: ignore[no-untyped-def]
        """Ask for the state of every local waiter (the backstop for lost pub/sub hints)."""

    def reap(limit=1000):  # type: ignore[no-untyped-def]
        """
        Release expired leases, drop waiters past their deadline or of dead
        owners (idempotent: every replica runs it). Fires with a
        L{paddler.sharedstate.model.ReapResult}.
        """

    def drain(server_id):  # type: ignore[no-untyped-def]
        """No new lease on the server for anyone; fires with whether it is known."""

    def undrain(server_id):  # type: ignore[no-untyped-def]
        """Take requests again; free slots go to waiters at once. Fires with whether it is known."""

    def snapshot():  # type: ignore[no-untyped-def]
        """Fires with a L{paddler.sharedstate.model.StoreSnapshot}: every server's shared figures."""
class IUpstreamClient(Interface):
    """Sends requests to upstreams over kept-alive HTTP/1.1 connections."""

    def send(method, origin, target, headers, body):  # type: ignore[no-untyped-def]
        """
        Send C{method} C{target} (bytes, origin-form) to C{origin}
        (C{b"http://host:port"}) with C{headers} (a list of (name, value)
        bytes pairs, C{Host} included) and C{body} (bytes or C{None}). Return
        a Deferred firing with an L{IUpstreamBody} once the response head
        arrived; cancelling it aborts the connection.
        """

    def close():  # type: ignore[no-untyped-def]
        """Close the idle connections and keep no new ones; a Deferred fires when they closed."""


class IUpstreamBody(Interface):
    """An upstream response: status and headers at once, the body when a consumer takes it."""

    code = Attribute("The status code (int).")
    phrase = Attribute("The reason phrase (bytes).")
    headers = Attribute("Every header as received: a list of (name, value) bytes pairs.")
    framing = Attribute("How the body is delimited: 'chunked', 'length', 'close' or 'none'.")

    def deliver(consumer, raw):  # type: ignore[no-untyped-def]
        """
        Send the body to C{consumer}: C{consumer.body_data(bytes)} per piece,
        then C{consumer.body_done(None)} at its end or
        C{consumer.body_done(failure)}. With C{raw} (honoured for 'chunked'
        and 'length' framing only) the pieces are the bytes as received, chunk
        framing included; otherwise the decoded payload.
        """

    def take_body():  # type: ignore[no-untyped-def]
        """
        The whole body (bytes) if it already arrived with the head, the
        response then over; C{None} otherwise (then use L{deliver}).
        """

    def pause():  # type: ignore[no-untyped-def]
        """Stop reading the body (the consumer cannot keep up)."""

    def resume():  # type: ignore[no-untyped-def]
        """Read the body again."""

    def abort():  # type: ignore[no-untyped-def]
        """Drop the connection (the upstream sees the request cancelled); the consumer gets a failure."""

    def tail():  # type: ignore[no-untyped-def]
        """The last few KiB of the decoded payload (llama.cpp's C{timings} come there)."""


# -- what the listener's channel, its requests and the proxy tell each other ----------


class IBoundedRequest(Interface):
    """
    A request that holds a bounded body (L{paddler.server.request.BoundedRequest}).
    The channel (L{IGuardedChannel}) asks it for its limit and memory before
    the body is read; the proxy reads its flags.
    """

    max_body = Attribute("The largest body, in bytes, the request keeps.")
    body_too_large = Attribute("True once the body was found over max_body (or refused for memory).")
    client_gone = Attribute("True once the client's connection closed.")

    def too_large():  # type: ignore[no-untyped-def]
        """The L{paddler.errors.RequestTooLarge} for a body over C{max_body}."""

    def claim_body(size):  # type: ignore[no-untyped-def]
        """Claim C{size} bytes of body memory; C{False} when they are not there."""

    def release_body():  # type: ignore[no-untyped-def]
        """Give the request's body memory back (idempotent)."""


class IGuardedChannel(Interface):
    """A connection that can answer a request itself, before any resource sees it (L{paddler.server.channel.GuardedChannel})."""

    def refuse(error):  # type: ignore[no-untyped-def]
        """Answer the L{paddler.errors.PaddlerHTTPError} C{error} now and close the connection."""


class IGuardedSite(Interface):
    """The site of guarded channels (L{paddler.server.channel.GuardedSite}): it counts early answers."""

    def answered_early(error):  # type: ignore[no-untyped-def]
        """Count (and log) one request answered with C{error} before any resource saw it."""


class IReactorBeforePoll(Interface):
    """A reactor that runs callables once just before it next waits for I/O (L{paddler.lean_reactor})."""

    def callBeforePoll(f):  # type: ignore[no-untyped-def]
        """
        Call C{f()} once, after this turn's events and timed calls and before
        the reactor next waits; a callable added while these run is called
        before the following wait, which then does not block.
        """
