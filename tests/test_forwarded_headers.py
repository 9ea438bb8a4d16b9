"""What reaches the upstream: no hop-by-hop header, and forwarding headers only as paddler wrote them.

``--forwarded-headers replace`` (the default) drops what a client says about
where its request came from; ``append`` (behind a trusted proxy) keeps it and
appends the peer's address to X-Forwarded-For.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.python.usage import UsageError

from paddler.balancer.proxy import ProxyConfig
from paddler.config import BalancerConfig
from paddler.tap import BalancerOptions
from tests.proxy_harness import make_harness

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")

SPOOFED = {
    b"X-Forwarded-For": [b"10.1.1.1"],
    b"X-Forwarded-Proto": [b"https"],
    b"X-Forwarded-Host": [b"evil.example"],
    b"Forwarded": [b"for=10.1.1.1;proto=https"],
    b"X-Real-IP": [b"10.1.1.1"],
    b"Via": [b"1.1 front"],
}
HOP_BY_HOP = {
    b"Connection": [b"keep-alive, X-Private, X-Other"],
    b"X-Private": [b"1"],
    b"X-Other": [b"2"],
    b"Keep-Alive": [b"timeout=5"],
    b"TE": [b"trailers"],
    b"Upgrade": [b"websocket"],
    b"Proxy-Authorization": [b"Basic eA=="],
    b"Proxy-Something": [b"x"],
}


def sent(request: Any, mode: str, headers: dict[bytes, list[bytes]]) -> list[dict[bytes, list[bytes]]]:
    """Two clients' requests through the proxy to two upstreams: the headers each upstream got."""
    h = make_harness(request, config=ProxyConfig(forwarded_headers=mode))
    fakes = [h.add_fake("a")[0], h.add_fake("b")[0]]
    for _ in range(2):
        response = h.result(h.post("/completion", {"prompt": "hi"}, headers={**headers, b"Host": [b"llm.example"]}))
        assert response.code == 200
    seen = [entry for fake in fakes for entry in fake.seen if entry[1] == b"/completion"]
    assert len(seen) == 2
    return [{k.lower(): v for k, v in entry[2].items()} for entry in seen]


@pytest.mark.parametrize("mode", ["replace", "append"])
def test_hop_by_hop_headers_never_reach_the_upstream(request, mode):
    """Connection and every header it names, Keep-Alive, TE, Upgrade and Proxy-* are dropped."""
    for headers in sent(request, mode, HOP_BY_HOP):
        for name in (b"x-private", b"x-other", b"keep-alive", b"te", b"upgrade", b"proxy-authorization",
                     b"proxy-something"):
            assert name not in headers, name
        assert headers.get(b"connection") in (None, [b"close"], [b"keep-alive"])


def test_replace_drops_what_the_client_claims_and_writes_the_peer(request):
    """By default the client's X-Forwarded-*, Forwarded and X-Real-IP are not passed on: the upstream
    sees only what paddler knows (the peer address, http, the Host the client asked for). Via is kept
    (each hop appends to it; paddler's own entry comes last)."""
    for headers in sent(request, "replace", SPOOFED):
        assert headers[b"x-forwarded-for"] == [b"127.0.0.1"]
        assert headers[b"x-forwarded-proto"] == [b"http"]
        assert headers[b"x-forwarded-host"] == [b"llm.example"]
        assert b"forwarded" not in headers and b"x-real-ip" not in headers
        assert headers[b"via"][0] == b"1.1 front"


def test_append_keeps_a_trusted_proxys_headers_and_appends_the_peer(request):
    """Behind a trusted proxy: its X-Forwarded-For gets the peer appended, its proto, host, Forwarded
    and X-Real-IP pass as it wrote them."""
    for headers in sent(request, "append", SPOOFED):
        assert headers[b"x-forwarded-for"] == [b"10.1.1.1, 127.0.0.1"]
        assert headers[b"x-forwarded-proto"] == [b"https"]
        assert headers[b"x-forwarded-host"] == [b"evil.example"]
        assert headers[b"forwarded"] == [b"for=10.1.1.1;proto=https"]
        assert headers[b"x-real-ip"] == [b"10.1.1.1"]


def test_the_setting_reaches_the_proxy_and_refuses_other_values():
    """--forwarded-headers is in the settings table: replace by default, append or replace only."""
    assert ProxyConfig.from_balancer(BalancerConfig()).forwarded_headers == "replace"
    assert ProxyConfig.from_balancer(BalancerConfig(forwarded_headers="append")).forwarded_headers == "append"
    with pytest.raises(UsageError, match="forwarded-headers"):
        BalancerOptions().parseOptions(["--forwarded-headers", "trust-everyone"])
