"""Client endpoints for upstream URLs, built once per upstream instead of per request."""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """
    TCP for ``http``, TLS for ``https``, like Twisted's standard factory, but
    each (scheme, host, port) gets one endpoint object that is reused:
    ``Agent`` otherwise builds (and IDNA-encodes) a new one for every request.
    At most C{max_entries} are kept; the cache is emptied when it is full.
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float | None = None,
        tls_policy: Any = None,
        max_entries: int = 4096,
    ) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()
        self._max_entries = max_entries
        self._cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint_for(uri.scheme, uri.host, uri.port)

    def endpoint_for(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        """The endpoint for C{scheme://host:port} (built on first use, then reused)."""
        key = (scheme, host, port)
        endpoint = self._cache.get(key)
        if endpoint is None:
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            endpoint = self._build(scheme, host, port)
            self._cache[key] = endpoint
        return endpoint

    def _build(self, scheme: bytes, host: bytes, port: int) -> IStreamClientEndpoint:
        timeout = 30.0 if self._connect_timeout is None else self._connect_timeout
        tcp = HostnameEndpoint(self._reactor, host, port, timeout=timeout)
        if scheme == b"http":
            return tcp
        if scheme == b"https":
            creator = self._tls_policy.creatorForNetloc(host, port)
            return wrapClientTLS(creator, tcp)
        raise ValueError(f"unsupported scheme {scheme!r}")
