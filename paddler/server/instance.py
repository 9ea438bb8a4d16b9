"""Who is answering: a random id per balancer process, so the balancer can recognise itself.

Every answer of the balancer's listeners carries C{X-Paddler-Instance: ID}.
A probe (or a registration) that reads its own id from an upstream has
reached the balancer itself, not a llama.cpp server: that upstream would
show the fleet's slots as its own (phantom slots) and send requests round
in a loop. Requests the proxy forwards carry C{Via: 1.1 paddler-TOKEN}
(RFC 9110 section 7.6.3), where TOKEN is a second random id that only
upstreams see; a request that comes back with the balancer's own token in
its C{Via} is answered 508 at once. The token is not the public id, so a
client cannot make the balancer answer 508 by copying a header it was sent.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

#: The response header naming the balancer process that answered.
INSTANCE_HEADER = b"x-paddler-instance"


def new_instance_id() -> str:
    """A fresh random id (16 hex digits) for one balancer process."""
    return secrets.token_hex(8)


def via_token(loop_token: str) -> bytes:
    """The C{Via} entry the balancer adds to the requests it forwards."""
    return b"1.1 paddler-" + loop_token.encode("ascii")


def came_through(loop_token: str, via_headers: Sequence[bytes] | None) -> bool:
    """Whether a request's C{Via} headers show it already went through the balancer with C{loop_token}."""
    if not via_headers:
        return False
    token = via_token(loop_token)
    return any(entry.strip() == token for value in via_headers for entry in value.split(b","))


def answered_by(headers: object) -> str | None:
    """The paddler instance id an HTTP response's C{Headers} carry, if any."""
    values = getattr(headers, "getRawHeaders", lambda name: None)(INSTANCE_HEADER)
    if not values:
        return None
    return values[0].decode("latin-1", "replace").strip()


#: An upstream's last error once a probe found it is the balancer itself.
THIS_BALANCER = (
    "this URL answers as this balancer itself (X-Paddler-Instance), not as a llama.cpp server: "
    "remove it from the upstreams"
)


class ThisBalancer(Exception):
    """An upstream answered with the balancer's own instance id: it is the balancer itself."""

    def __init__(self) -> None:
        super().__init__(THIS_BALANCER)
