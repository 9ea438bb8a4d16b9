"""Listeners: an endpoint string, a site, and a service that owns the listening port.

Every listener takes a Twisted endpoint string (``tcp:8086:interface=127.0.0.1``,
``ssl:...``, ``unix:...``). L{ListeningService} binds it when the service
starts (with a listen backlog of L{LISTEN_BACKLOG} unless the string sets
one), fails start-up with one line naming the endpoint when it cannot
(L{ListenFailed}), logs the address it bound (port 0 included) and stops
listening first when the service stops.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site


class QuietSite(Site):
    """A site without an access log or tracebacks (probes, dashboards and SSE would flood it)."""

    noisy = False
    displayTracebacks = False

    def log(self, request: Any) -> None:
        pass


class ListenFailed(Exception):
    """A listener could not bind its endpoint; the message names the endpoint and the reason."""


class ListeningService(Service):
    """
    Listens on C{description} (an endpoint string) with C{factory} while running.

    @ivar address: the bound address once listening (C{None} before).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Any,
        what: str,
        path: str = "/",
        on_listening: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.on_listening = on_listening
        self.description = description
        self.factory = factory
        self.what = what
        self.path = path
        self.address: Any = None
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        outcome: list[Any] = []
        description = with_backlog(self.description)
        serverFromString(self.reactor, description).listen(self.factory).addBoth(outcome.append)
        if not outcome:  # an endpoint that binds later (none of Twisted's own do)
            raise ListenFailed(f"{self.what}: {self.description} did not bind at start-up")
        if isinstance(outcome[0], Failure):
            raise ListenFailed(
                f"{self.what} cannot listen on {self.description}: {outcome[0].getErrorMessage()}"
            )
        self._listening(outcome[0])

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.address = port.getHost()
        host = getattr(self.address, "host", None)
        if host is not None:
            shown = f"[{host}]" if ":" in host else host
            url = f"http://{shown}:{self.address.port}{self.path}"
        else:
            url = str(self.address)
        if self.on_listening is not None:
            self.on_listening(port)  # the owner announces it in its own words
        else:
            self.log.info("{what} listening on {url}", what=self.what, url=url)

    def stopListening(self) -> Deferred[None]:
        """Accept no new connection; connections already open stay."""
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        result = port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.stopListening()


#: The listen backlog of TCP and TLS listeners that do not set one. Twisted's
#: default of 50 made the kernel reset connections of a burst of clients
#: (the chaos flood: 21 of 300); the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """C{description} with C{backlog=} added when it is a tcp, tcp6 or ssl endpoint without one."""
    fields = endpoint_fields(description.strip())
    if fields[0].lower() not in ("tcp", "tcp6", "ssl"):
        return description
    if any(field.startswith("backlog=") for field in fields[1:]):
        return description
    return f"{description.strip()}:backlog={backlog}"


def endpoint_fields(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, unescaping C{\\:}."""
    fields, current, escaped = [], "", False
    for char in description:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    return fields


def endpoint_is_local(description: str) -> bool:
    """
    Whether a server endpoint string can only be reached from this host:
    unix sockets, and tcp/tcp6/ssl with a loopback C{interface=}. tcp
    without C{interface=} listens on every interface; other kinds and host
    names other than C{localhost} count as reachable from outside.
    """
    fields = endpoint_fields(description.strip())
    kind = fields[0].lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    interface = None
    for field in fields[1:]:
        if field.startswith("interface="):
            interface = field[len("interface="):]
    if not interface:
        return False
    if interface.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface.strip("[]")).is_loopback
    except ValueError:
        return False


def urls_of(address: Any) -> set[str]:
    """
    The upstream URLs (as L{paddler.fleet.upstream.normalise_url} writes
    them) that reach the bound TCP C{address} from this host: its own host,
    and the loopback names when it is a loopback or wildcard address.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return set()
    hosts = {f"[{host}]" if ":" in host else host}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and (ip.is_loopback or ip.is_unspecified):
        hosts |= {"localhost", "127.0.0.1", "[::1]"}
    return {f"{scheme}://{h}:{port}" for h in hosts for scheme in ("http", "https")}
