"""Upstream addresses vetted once, canonically, before the balancer ever connects to them.

Every URL that becomes an upstream (``--upstream``, the configuration file,
``POST /api/v1/upstreams``, an agent's registration) goes through
L{AddressVetter.vet}:

1. the host is canonicalised: every spelling of an IPv4 address that the
   C library's resolver accepts (``127.1``, ``2130706433``, ``0x7f.1``,
   ``0177.0.0.1``) and every IPv6 form that carries one
   (``[::ffff:127.0.0.1]``, NAT64 ``[64:ff9b::7f00:1]``) is written as the
   plain IPv4 address; other names are resolved with the injected resolver
   (with a deadline), and each address they resolve to is vetted;
2. an address in a refused network (L{REFUSED_NETWORKS}: link-local, cloud
   metadata services, "this network", multicast) is refused with 403
   unless ``--allow-upstream-network CIDR`` covers it;
3. an address and port this balancer listens on (its own proxy or
   management port, under any spelling) is refused with 400.

Loopback and private ranges stay allowed: fleets live there.

Names are vetted when they are registered; a name whose DNS answer later
changes is not vetted again (register addresses, or trust your resolver).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, TimeoutError as DeferredTimeout, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from paddler.fleet.upstream import InvalidUpstreamURL, normalise_url

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Networks an upstream may not be in unless --allow-upstream-network says so, and why.
REFUSED_NETWORKS: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(cidr), why)
    for cidr, why in (
        ("169.254.0.0/16", "link-local, where clouds serve instance metadata (169.254.169.254)"),
        ("fe80::/10", "IPv6 link-local"),
        ("fd00:ec2::254/128", "the AWS instance metadata service (IPv6)"),
        ("100.100.100.200/32", "the Alibaba Cloud instance metadata service"),
        ("0.0.0.0/8", "'this network': 0.0.0.0 reaches this host"),
        ("::/128", "the unspecified address: it reaches this host"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("ff00::/8", "IPv6 multicast"),
    )
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: Seconds a name may take to resolve.
RESOLVE_TIMEOUT = 2.0

#: C{resolve(host)}: a Deferred firing with the addresses (text) C{host} resolves to.
Resolver = Callable[[str], "Deferred[list[str]]"]


class UpstreamRefused(Exception):
    """A URL that may not be an upstream: C{status} 400 (not a server) or 403 (a refused network)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Vetted:
    """A URL that passed: its canonical form and the addresses it reaches."""

    url: str
    addresses: tuple[IPAddress, ...]


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """
    C{host} as an IPv4 address if it is one in any form C{inet_aton} takes
    (1 to 4 parts, each decimal, C{0x} hex or C{0} octal; the last part
    fills the remaining bytes), else C{None}.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                value = int(part[2:], 16) if part[2:] else 0
            elif len(part) > 1 and part.startswith("0"):
                value = int(part[1:], 8)
            elif part.isdigit():
                value = int(part)
            else:
                return None
        except ValueError:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


def canonical_address(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, NAT64), else C{address}."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.scope_id:
            return ipaddress.IPv6Address(str(address).split("%", 1)[0])
    return address


def literal_address(host: str) -> IPAddress | None:
    """C{host} (as C{urlsplit} gives it, no brackets) as a canonical address, or C{None} for a name."""
    v4 = parse_ipv4(host)
    if v4 is not None:
        return v4
    try:
        return canonical_address(ipaddress.ip_address(host))
    except ValueError:
        return None


def _with_host(url: str, host: str) -> str:
    parts = urlsplit(url)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}:{parts.port}"


def canonical_url(url: str) -> str:
    """C{url} normalised (L{normalise_url}), with an address host in its one canonical form."""
    url = normalise_url(url)
    host = urlsplit(url).hostname or ""
    address = literal_address(host)
    if address is not None:
        return _with_host(url, str(address))
    return _with_host(url, host.rstrip(".")) if host.endswith(".") and host != "." else url


def parse_networks(text: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (a list, or comma-separated text) as networks; C{ValueError} names a bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"a network must be written as CIDR text, got {item!r}")
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item[:60]!r} is not a network in CIDR form (like 169.254.0.0/16)") from None
    return tuple(networks)


#: A listener this balancer has: (its address, or None for every address of the host; its port).
OwnListener = tuple[Union[IPAddress, None], int]


def own_listener(host: str, port: int) -> OwnListener:
    """The L{OwnListener} of a bound address (a wildcard host stands for every address of the host)."""
    try:
        address = canonical_address(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        return (None, port)
    return (None if address.is_unspecified else address, port)


def _is_own(address: IPAddress, port: int, own: Iterable[OwnListener]) -> bool:
    for listening, listening_port in own:
        if listening_port != port:
            continue
        if listening is None:
            # a wildcard listener answers on every address of this host: the loopback ones
            # at least (the others are caught by the probe's X-Paddler-Instance check)
            if address.is_loopback or address.is_unspecified:
                return True
        elif listening == address:
            return True
    return False


class AddressVetter:
    """
    Vets upstream URLs (see the module docstring). C{resolve} resolves names
    (C{None}: names are refused unless C{allow_names}, for tests and tools
    that have no resolver); C{own} gives this balancer's listeners now;
    C{allowed} are the networks of C{--allow-upstream-network}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        resolve: Resolver | None = None,
        own: Callable[[], Iterable[OwnListener]] = lambda: (),
        allowed: Sequence[IPNetwork] = (),
        timeout: float = RESOLVE_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.resolve = resolve
        self.own = own
        self.allowed = tuple(allowed)
        self.timeout = timeout

    def check_address(self, url: str, address: IPAddress, port: int, name: str | None = None) -> None:
        """Raise L{UpstreamRefused} if C{address}:C{port} may not be an upstream."""
        address = canonical_address(address)
        via = f" ({name} resolves to {address})" if name else ""
        if _is_own(address, port, self.own()):
            raise UpstreamRefused(
                400, f"url {url} is this balancer itself{via} (one of its listeners), not a llama.cpp server"
            )
        if any(address in network for network in self.allowed):
            return
        for network, why in REFUSED_NETWORKS:
            if address.version == network.version and address in network:
                raise UpstreamRefused(
                    403,
                    f"url {url} is refused{via}: {address} is in {network}, {why}; "
                    "allow it explicitly with --allow-upstream-network if it really is a llama.cpp server",
                )

    def vet_literal(self, url: str) -> Vetted | None:
        """
        The synchronous part: C{url} canonicalised and, when its host is an
        address, vetted; C{None} when its host is a name (resolve it with L{vet}).
        Raises L{UpstreamRefused}.
        """
        try:
            canonical = canonical_url(url)
        except InvalidUpstreamURL as e:
            raise UpstreamRefused(400, str(e)) from None
        parts = urlsplit(canonical)
        address = literal_address(parts.hostname or "")
        if address is None:
            return None
        self.check_address(canonical, address, parts.port or 0)
        return Vetted(canonical, (address,))

    def vet(self, url: str) -> Deferred[Vetted]:
        """C{url} vetted: a Deferred of L{Vetted}, or failing with L{UpstreamRefused}."""
        try:
            literal = self.vet_literal(url)
        except UpstreamRefused as e:
            return fail(e)
        if literal is not None:
            return succeed(literal)
        canonical = canonical_url(url)
        parts = urlsplit(canonical)
        host, port = parts.hostname or "", parts.port or 0
        if host == "localhost" or host.endswith(".localhost"):
            # RFC 6761: always loopback, whatever a resolver says
            try:
                return succeed(self._resolved(canonical, host, port, ["127.0.0.1", "::1"]))
            except UpstreamRefused as e:
                return fail(e)
        if self.resolve is None:
            return succeed(Vetted(canonical, ()))
        d = self.resolve(host)
        d.addTimeout(self.timeout, self.clock)

        def failed(failure: Any) -> Vetted:
            if failure.check(DeferredTimeout):
                raise UpstreamRefused(400, f"url {canonical}: {host} did not resolve within {self.timeout:g} s")
            raise UpstreamRefused(400, f"url {canonical}: {host} does not resolve: {failure.getErrorMessage()}")

        vetted: Deferred[Vetted] = d.addCallbacks(
            lambda addresses: self._resolved(canonical, host, port, addresses), failed
        )
        return vetted

    def _resolved(self, canonical: str, host: str, port: int, addresses: list[str]) -> Any:
        found = []
        for text in addresses:
            try:
                found.append(canonical_address(ipaddress.ip_address(text.split("%", 1)[0])))
            except ValueError:
                continue
        if not found:
            raise UpstreamRefused(400, f"url {canonical}: {host} resolves to no address")
        for address in found:
            self.check_address(canonical, address, port, name=host)
        return Vetted(canonical, tuple(dict.fromkeys(found)))


def reactor_resolver(reactor: Any) -> Resolver:
    """A L{Resolver} on the reactor's name resolver (getaddrinfo in its thread pool, as connections use)."""
    from twisted.internet.interfaces import IResolutionReceiver

    def resolve(host: str) -> Deferred[list[str]]:
        addresses: list[str] = []
        done: Deferred[list[str]] = Deferred()

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                addresses.append(address.host)

            def resolutionComplete(self) -> None:
                if not done.called:
                    done.callback(addresses)

        reactor.nameResolver.resolveHostName(Receiver(), host, 0)
        return done

    return resolve
