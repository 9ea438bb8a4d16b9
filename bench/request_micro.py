"""In-memory cost of one small non-streaming request through the proxy port as paddler builds it.

The real proxy site (L{paddler.tap.proxy_site}: L{paddler.server.channel.GuardedSite},
L{paddler.server.request.BoundedRequest} with the loop token and the instance id, the
real L{paddler.balancer.proxy.ProxyResource}) with the client and the upstream on
in-memory transports: no sockets, no reactor, so what is measured is the Python work
of one request (parsing, the resource, the pool, encoding the upstream request,
parsing its answer, writing it back), free of the machine's noise. The request is
wrk's (bench/post.lua) as wrk sends it, the answer nginx's as bench/common.py
configures it.

    python -m bench.request_micro [--requests N] [--profile] [--parser twisted|httptools]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from bench.relay_micro import _Connections, _Transport
from paddler.balancer.proxy import ProxyConfig, ProxyResource
from paddler.fleet.pool import UpstreamPool
from paddler.fleet.upstream import SlotsSeen, Upstream
from paddler.routing.policies import MostIdleSlotsChooser
from paddler.server.memory import BodyMemory
from paddler.upstream.client import UpstreamClient

BODY = b'{"model":"bench","prompt":"The quick brown fox","max_tokens":4,"stream":false}'
#: what wrk 4 sends for bench/post.lua
REQUEST = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
           b"Content-Type: application/json\r\n\r\n%s" % (len(BODY), BODY))
ANSWER_BODY = (b'{"id":"cmpl-bench","object":"text_completion","created":1,"model":"bench","choices":'
               b'[{"index":0,"text":" jumps over the","finish_reason":"length"}],'
               b'"usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}')
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 08 Dec 2026 02:00:00 GMT\r\n"
          b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
          % (len(ANSWER_BODY), ANSWER_BODY))


def rig(parser: str = "twisted") -> tuple[Any, _Connections, _Transport]:
    from paddler.tap import proxy_site

    clock = Clock()
    pool = UpstreamPool(clock, MostIdleSlotsChooser(), 30, 30.0)
    for i in range(2):  # two upstreams, as the overhead bench runs
        upstream = Upstream(f"http://10.0.0.{i + 1}:8080", name=f"u{i}", clock=clock)
        upstream.record(SlotsSeen(100000, 0, upstream.probe_mark(), models=("bench",)), 0.0)
        pool.add(upstream)
    connections = _Connections()
    client = UpstreamClient(None, connections, clock=clock)  # type: ignore[arg-type]
    proxy = ProxyResource(pool, client, clock, ProxyConfig())
    kwargs: dict[str, Any] = {}
    if parser != "twisted":
        kwargs["parser"] = parser
    site = proxy_site(proxy, clock, memory=BodyMemory(1 << 30), instance_id="bench-instance", **kwargs)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4000))
    transport = _Transport()
    channel.makeConnection(transport)
    return channel, connections, transport


def runner(parser: str = "twisted") -> Any:
    channel, connections, transport = rig(parser)

    def one() -> None:
        channel.dataReceived(REQUEST)
        # the request went to a kept-alive connection (the last one that got bytes)
        for protocol, upstream in connections.made:
            if upstream.value():
                upstream.clear()
                protocol.dataReceived(ANSWER)
                break
        else:
            raise AssertionError("no upstream request written")
        out = transport.value()
        if not out.startswith(b"HTTP/1.1 200"):
            raise AssertionError(out[:300])
        transport.clear()

    return one


def per_request(requests: int, parser: str = "twisted") -> float:
    """CPU microseconds for one small request (best of 5 runs)."""
    one = runner(parser)
    for _ in range(200):
        one()
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        for _ in range(requests):
            one()
        best = min(best, (time.process_time() - start) / requests * 1e6)
    return best


def calls_per_request(requests: int = 500, parser: str = "twisted") -> float:
    """Python function calls (and calls into C) per request: a deterministic measure of the work."""
    import sys

    one = runner(parser)
    for _ in range(200):
        one()
    count = [0]

    def tracer(frame: Any, event: str, arg: Any) -> None:
        if event == "call" or event == "c_call":
            count[0] += 1

    sys.setprofile(tracer)
    try:
        for _ in range(requests):
            one()
    finally:
        sys.setprofile(None)
    return count[0] / requests


def profile(requests: int, parser: str = "twisted", limit: int = 45) -> str:
    one = runner(parser)
    for _ in range(200):
        one()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(requests):
        one()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--parser", default="twisted")
    args = parser.parse_args(argv)
    if args.profile:
        print(profile(args.requests, args.parser))
    print(json.dumps({"parser": args.parser, "us_per_request": round(per_request(args.requests, args.parser), 1),
                      "calls_per_request": round(calls_per_request(parser=args.parser), 1)}))


if __name__ == "__main__":
    main()
