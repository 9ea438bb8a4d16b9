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

    def pause():  # type: ignore[no-untyped-def]
        """Stop reading the body (the consumer cannot keep up)."""

    def resume():  # type: ignore[no-untyped-def]
        """Read the body again."""

    def abort():  # type: ignore[no-untyped-def]
        """Drop the connection (the upstream sees the request cancelled); the consumer gets a failure."""

    def tail():  # type: ignore[no-untyped-def]
        """The last few KiB of the decoded payload (llama.cpp's C{timings} come there)."""
