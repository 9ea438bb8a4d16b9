"""The upstreams' API keys (issue #24): the key the balancer probes with is not lent to clients
unless --lend-api-key says so; a client's own key goes through untouched; probes told 401
say which setting is missing."""

from __future__ import annotations


from treq.testing import StubTreq
from twisted.logger import capturedLogs

from paddler.balancer.proxy import ProxyConfig
from paddler.config import BalancerConfig
from paddler.fleet.probe import HTTPProber
from paddler.fleet.upstream import Upstream, UpstreamState
from paddler.llamacpp.errors import NeedsKey
from paddler.llamacpp.slots import http_getter, read_slots

from .fake_llama import FakeLlama
from .helpers import MemoryUpstreams, make_pool
from .proxy_harness import make_harness
import pytest

#: every test here runs with each request parser of the proxy port (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("both_parsers")

REFUSED = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}


def _keyed(h, *keys: str):
    fakes = []
    for n, key in enumerate(keys):
        fake, upstream = h.add_fake(f"llama{n}", slots=1)
        fake.api_key = key
        fakes.append((fake, upstream))
    return fakes


def _authorization(fake: FakeLlama) -> list[bytes] | None:
    headers = {k.lower(): v for k, v in fake.seen[-1][2].items()}
    return headers.get(b"authorization")


def test_a_client_without_a_key_is_refused_by_the_server_itself(request):
    """The probes' key is not lent: each server answers its own 401, in its own shape."""
    h = make_harness(request, config=ProxyConfig(api_key="operator"))
    fakes = _keyed(h, "operator", "operator")
    for fake, _ in fakes:
        response = h.result(h.post("/completion", {"prompt": "hi"}))
        assert response.code == 401
        assert h.json(response) == REFUSED
    assert all(_authorization(fake) is None for fake, _ in fakes)
    assert all(upstream.in_flight == 0 for _, upstream in fakes)


def test_a_client_key_goes_through_untouched_to_both_upstreams(request):
    h = make_harness(request, config=ProxyConfig(api_key="operator", lend_api_key=True))
    fakes = _keyed(h, "mine", "mine")
    for _ in fakes:
        response = h.result(h.post("/completion", {"prompt": "hi"}, headers={b"Authorization": [b"Bearer mine"]}))
        assert response.code == 200
    assert [_authorization(fake) for fake, _ in fakes] == [[b"Bearer mine"], [b"Bearer mine"]]


def test_a_wrong_client_key_is_not_replaced_by_the_operators(request):
    h = make_harness(request, config=ProxyConfig(api_key="operator", lend_api_key=True))
    ((fake, _),) = _keyed(h, "operator")
    response = h.result(h.post("/completion", {"prompt": "hi"}, headers={b"Authorization": [b"Bearer wrong"]}))
    assert response.code == 401 and h.json(response) == REFUSED


def test_lend_api_key_gives_each_upstream_its_own_key(request):
    """--lend-api-key: key-less clients get the upstream's api_key, else --llamacpp-api-key."""
    h = make_harness(request, config=ProxyConfig(api_key="operator", lend_api_key=True))
    (own, own_upstream), (shared, _) = _keyed(h, "own", "operator")
    own_upstream.api_key = "own"
    for _ in range(2):
        response = h.result(h.post("/completion", {"prompt": "hi"}))
        assert response.code == 200
    assert _authorization(own) == [b"Bearer own"]
    assert _authorization(shared) == [b"Bearer operator"]


def test_lend_api_key_leaves_an_anthropic_x_api_key_alone(request):
    h = make_harness(request, config=ProxyConfig(api_key="operator", lend_api_key=True))
    ((fake, _),) = _keyed(h, "theirs")
    response = h.result(h.post("/completion", {"prompt": "hi"}, headers={b"X-Api-Key": [b"theirs"]}))
    assert response.code == 200
    assert _authorization(fake) is None


def test_lending_is_off_by_default_and_a_setting():
    assert BalancerConfig().lend_api_key is False
    assert ProxyConfig.from_balancer(BalancerConfig(llamacpp_api_key="k", lend_api_key=True)).lend_api_key


# -- probes ------------------------------------------------------------------------------


async def _read(fake: FakeLlama, key: str | None = None, **kwargs):
    return await read_slots(http_getter(StubTreq(fake), "http://fake:1", key), **kwargs)


def _result(d):
    results = []
    d.addBoth(results.append)
    return results[0]


def test_a_probe_without_the_key_raises_needs_key_naming_the_setting():
    from twisted.internet.defer import ensureDeferred

    for slots_status in (200, 501):  # /slots, and /props for a --no-slots server
        fake = FakeLlama()
        fake.api_key = "k"
        fake.slots_status = slots_status
        failure = _result(ensureDeferred(_read(fake, method="slots" if slots_status == 200 else "props")))
        assert failure.check(NeedsKey), failure
        assert "401" in str(failure.value) and "--llamacpp-api-key" in str(failure.value)
        reading = _result(ensureDeferred(_read(fake, "k", method="props")))
        assert reading.total == 4


def test_a_probe_told_401_marks_the_upstream_at_once_and_logs_once():
    """The server answers, just not to a key-less probe: no second failure is waited for;
    one warning per change names the missing setting. The keyed upstream is healthy."""
    upstreams = MemoryUpstreams(connect_timeout=2, max_idle_per_host=1)
    clock = upstreams.clock
    pool = make_pool(clock)
    for name in ("a", "b"):
        fake = FakeLlama(name)
        fake.api_key = "k"
        upstreams.serve(fake, f"http://{name}:8080")
    prober = HTTPProber(upstreams.client, clock, pool, timeout=2, unhealthy_after=3)
    keyless = pool.add(Upstream("http://a:8080", name="a", clock=clock))
    keyed = pool.add(Upstream("http://b:8080", name="b", clock=clock))
    keyed.api_key = "k"

    def probe(upstream):
        d = prober.probe(upstream)
        upstreams.flush()
        return _result(d)

    with capturedLogs() as events:
        for _ in range(3):
            probe(keyless)
    assert keyless.state is UpstreamState.UNREACHABLE
    assert "401" in keyless.last_error and "--llamacpp-api-key" in keyless.last_error
    warnings = [e for e in events if "401" in e.get("reason", "") and "state" not in e]
    assert len(warnings) == 1
    probe(keyed)
    assert keyed.state is UpstreamState.HEALTHY


def test_probes_of_a_no_slots_server_never_scrape_metrics():
    """/metrics has "since last scrape" figures: a probe's scrape would empty its owner's."""
    from twisted.internet.defer import ensureDeferred

    fakes = [FakeLlama(slots=2), FakeLlama(slots=3)]
    for fake in fakes:
        fake.slots_status = 501
        reading = _result(ensureDeferred(_read(fake)))
        assert (reading.total, reading.processing, reading.method) == (fake.slots, None, "props")
        reading = _result(ensureDeferred(_read(fake, method="props")))
        assert reading.total == fake.slots
        assert b"/metrics" not in [uri for _, uri, _, _ in fake.seen]
