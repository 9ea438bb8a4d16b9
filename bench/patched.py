"""Run ``paddler`` with the two hot-path fixes proposed in docs/performance.md, for an A/B.

Monkeypatches, for measurement only (the real fix belongs in paddler/):

1. no access log line per request (``Site.log`` does nothing; paddler's
   RequestStats already counts every request);
2. one endpoint per upstream, cached, instead of a new ``HostnameEndpoint``
   (with IDNA encoding of the host) per request inside ``Agent``.

    python -m bench.patched balancer --listen ... --upstream ...
"""

from __future__ import annotations

import sys
from typing import Any


def patch() -> None:
    from twisted.web import client, server

    server.Site.log = lambda self, request: None  # type: ignore[method-assign]
    original = client.Agent._getEndpoint

    def cached(self: Any, uri: Any) -> Any:
        cache = self.__dict__.setdefault("_bench_endpoints", {})
        key = (uri.scheme, uri.host, uri.port)
        endpoint = cache.get(key)
        if endpoint is None:
            endpoint = cache[key] = original(self, uri)
        return endpoint

    client.Agent._getEndpoint = cached  # type: ignore[method-assign]


def main() -> None:
    patch()
    from paddler.cli import main as paddler_main

    paddler_main(sys.argv[1:])


if __name__ == "__main__":
    main()
