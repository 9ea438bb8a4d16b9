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
        that fires with C{None} when done (it never fails: problems are
        recorded on the upstream). The Deferred has a deadline.
        """
