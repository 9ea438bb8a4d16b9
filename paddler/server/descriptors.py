"""File descriptors: the open-files limit, raised at start, and connection caps that fit under it.

Every client connection costs a descriptor, and a proxied one a second one
for its upstream connection. With the common soft limit of 1,024, about a
thousand idle or slow clients made every other request fail (EMFILE), and
Twisted's accept loop then spins on the listening socket. So the balancer
raises its soft C{RLIMIT_NOFILE} to the hard limit at start (L{raise_open_files_limit}),
and lowers C{--max-connections} to what the limit allows (L{fit_connection_cap}),
so that a listener refuses connections with an answer before the process
runs out of descriptors.
"""

from __future__ import annotations

from typing import Any

#: Most descriptors kept for everything but client connections: logs, listeners,
#: probes, idle upstream connections, the body of a reload... A low limit keeps a
#: quarter of itself (L{reserved_descriptors}): 256 of 256 left one connection.
RESERVED_DESCRIPTORS = 256


def reserved_descriptors(limit: int) -> int:
    """The descriptors kept for the rest under an open-files C{limit}: min(256, limit // 4)."""
    return min(RESERVED_DESCRIPTORS, max(0, limit) // 4)


def open_files_limit() -> int | None:
    """The soft limit on open files of this process, or C{None} where there is none (or no C{resource})."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> tuple[int | None, int | None]:
    """Raise the soft open-files limit to the hard one; return C{(before, after)} (C{None}: unlimited)."""
    try:
        import resource
    except ImportError:
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def shown(value: int) -> int | None:
        return None if value == resource.RLIM_INFINITY else value

    if soft == hard:
        return shown(soft), shown(soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return shown(soft), shown(soft)
    return shown(soft), shown(hard)


def fit_connection_cap(cap: int, limit: int | None, per_connection: int = 3) -> int:
    """
    The largest cap at most C{cap} that fits under C{limit} open files: each
    connection of the proxy listener may take two descriptors (client and
    upstream) and one of the management listener one, so C{per_connection}
    descriptors per unit of the cap, after L{reserved_descriptors}.
    """
    if limit is None:
        return cap
    return max(1, min(cap, (limit - reserved_descriptors(limit)) // per_connection))


def cap_explained(cap: int, limit: int | None, per_connection: int = 3) -> str:
    """Why the connection cap is what it is, for the start-up log."""
    fitted = fit_connection_cap(cap, limit, per_connection)
    if limit is None:
        return f"connection cap {fitted} per listener (--max-connections; no open-files limit)"
    reserve = reserved_descriptors(limit)
    if fitted < cap:
        return (
            f"connection cap {fitted} per listener, lowered from --max-connections {cap}: the open-files "
            f"limit is {limit}, {reserve} are kept for listeners, probes and logs (min(256, limit/4)), "
            f"and each connection may take {per_connection}"
        )
    return (
        f"connection cap {fitted} per listener (--max-connections); the open-files limit {limit} "
        f"allows {(limit - reserve) // per_connection} after keeping {reserve} for the rest"
    )


def limits_for(config: Any, open_files: int | None) -> Any:
    """The L{paddler.server.channel.ClientLimits} of a balancer configuration, its cap fitted to C{open_files}."""
    from paddler.server.channel import ClientLimits

    return ClientLimits(
        header_timeout=config.header_timeout,
        min_body_rate=float(config.min_request_body_rate),
        idle_timeout=config.client_idle_timeout,
        max_connections=fit_connection_cap(config.max_connections, open_files),
        max_connections_per_client=config.max_connections_per_client,
    )
