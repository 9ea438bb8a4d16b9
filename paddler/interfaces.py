"""Every zope interface of paddler lives here.

Interface methods take no ``self``; each implementation and each test fake
has a ``verifyObject`` test.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISlotChooser(Interface):
    """Picks the upstream that should serve the next slot-taking request."""

    name = Attribute("The policy name given to --policy, e.g. 'slots'.")

    def choose(upstreams, model):  # type: ignore[no-untyped-def]
        """
        Return the L{paddler.upstream.Upstream} to use, or C{None} when no
        upstream should take the request now (the request then waits).

        @param upstreams: the upstreams that may take traffic (healthy, not
            draining, serving C{model} when the fleet serves it).
        @param model: the model the request asked for, or C{None}.
        """


class IUpstreamProber(Interface):
    """Finds out the health and slots of one upstream."""

    def probe(upstream):  # type: ignore[no-untyped-def]
        """
        Probe C{upstream} once, update it and the pool, and return a Deferred
        that fires with C{None} when done (it never fails: problems are
        recorded on the upstream). The Deferred has a deadline.
        """
