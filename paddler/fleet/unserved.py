"""When nothing can serve: no healthy upstream, none loading, none registering.

Then a buffered request would wait for nothing, so it waits only
``--no-upstream-timeout`` seconds (scale-from-zero operators raise it to the
time a server takes to come up), not ``--buffered-request-timeout``, and
the 503 says why, upstream by upstream. "Busy, but healthy" is another
matter: those requests wait the whole buffer timeout for a slot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from paddler.errors import NoHealthyUpstream
from paddler.fleet.upstream import Upstream, UpstreamState

#: Upstreams named in the 503; the rest are counted.
SHOWN = 5
#: States in which an upstream can serve soon: it serves, it loads its model, or it was just added.
HOPEFUL = (UpstreamState.HEALTHY, UpstreamState.LOADING, UpstreamState.UNKNOWN)


def nothing_can_serve(upstreams: Iterable[Upstream], registering: int = 0) -> bool:
    """Whether no upstream serves or can soon (draining ones take nothing new), and none is registering."""
    for upstream in upstreams:
        if not upstream.draining and upstream.state in HOPEFUL:
            return False
    return registering == 0


def why(upstream: Upstream) -> str:
    """One upstream's part of the answer: C{gpu-1 unreachable: /slots answered 500}."""
    if upstream.draining:
        return f"{upstream.name} draining"
    reason = f": {upstream.last_error}" if upstream.last_error else ""
    return f"{upstream.name} {upstream.state.value}{reason}"


def no_healthy_upstream(upstreams: list[Upstream], waited: float, setting_wait: float,
                        retry_after: float) -> NoHealthyUpstream:
    """The 503 for a request nothing can serve, naming each upstream's state and its last error."""
    if not upstreams:
        detail = "no upstream is registered"
    else:
        parts = [why(u) for u in upstreams[:SHOWN]]
        if len(upstreams) > SHOWN:
            parts.append(f"and {len(upstreams) - SHOWN} more")
        detail = "; ".join(parts)
    waited_text = (
        f" (waited {waited:.1f} s of --no-upstream-timeout {setting_wait:g} s)" if waited > 0 else ""
    )
    return NoHealthyUpstream(
        f"no healthy upstream: {detail}{waited_text}",
        # the balancer learns that a server came back at its next probe or report: not sooner
        headers={b"retry-after": str(max(1, min(300, math.ceil(retry_after)))).encode("ascii")},
    )
