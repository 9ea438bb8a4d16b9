"""A fuzzer for the proxy and management ports of a real balancer (hypothesis, raw sockets).

Each case is a whole HTTP request built from hostile parts: methods, request
targets of every form, versions, header names and values (Host twice,
framing headers that contradict each other, Expect, Via...), JSON and
binary bodies, chunked or not, CRLF or bare LF, sometimes cut short.

For every case: a request sent whole gets an answer (none hangs); nothing
the client sends gets a 5xx from the balancer (llama-server's own 500 for
JSON it cannot parse is relayed as it is, and counted); every error has a JSON body, a
malformed chunked body's included;
a management request that is refused changes nothing (upstreams and agents
are compared before and after). After all cases: the balancer logged no
traceback, no critical and no error line, and holds no more descriptors
than before.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import (
    LONG,
    Simulated,
    call,
    free_port,
    get_json,
    held,
    log_problems,
    parse_response,
    raw_exchange,
    report,
    scaled,
    start_balancer,
    upstreams,
    wait_for,
)

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

CASES = scaled(250, 6000)  # per port: the long form runs 12,000 cases
TOKEN = "fuzz-token"
MAX_BODY = 65536

FUZZ_SETTINGS = settings(
    max_examples=CASES,
    deadline=None,
    database=None,
    derandomize=not LONG,  # the suite replays the same cases; the long form explores
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Case:
    """A request as bytes, and what may be expected of the answer."""

    raw: bytes
    complete: bool  # sent whole: an answer must come
    mutating: bool = False


# -- the parts ------------------------------------------------------------------------

METHODS = st.one_of(
    st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
                     b"get", b"PRI", b"M-SEARCH"]),
    st.binary(max_size=8),
)
PROXY_PATHS = [
    b"/", b"/health", b"/slots", b"/completion", b"/completions", b"/v1/completions", b"/v1/chat/completions",
    b"/chat/completions", b"/embedding", b"/v1/embeddings", b"/infill", b"/rerank", b"/tokenize",
    b"/detokenize", b"/props", b"/metrics", b"/v1/models", b"/models", b"/api/v1/upstreams",
]
MANAGEMENT_PATHS = [
    b"/health", b"/api/v1/upstreams", b"/api/v1/upstreams/u1", b"/api/v1/upstreams/u1/drain",
    b"/api/v1/upstreams/u1/undrain", b"/api/v1/agents", b"/api/v1/agents/a1/report",
    b"/api/v1/agents/../report", b"/metrics", b"/api/v1/state", b"/dashboard", b"/dashboard/app.js",
    b"/api/v1/upstreams/%ff", b"/api/v1/upstreams/\xff",
]
QUERY = st.sampled_from([b"", b"?", b"?force=true", b"?force=maybe", b"?a=%zz", b"?" + b"x" * 3000, b"#frag"])
HOSTS = st.sampled_from([b"evil.example", b"127.0.0.1:1", b"[::1]", b"[::1", b"user@host", b"h:99999999", b""])
TEXT = st.text(max_size=30).map(lambda t: t.encode("utf-8"))


def targets(paths: list[bytes]) -> st.SearchStrategy[bytes]:
    path = st.sampled_from(paths)
    return st.one_of(
        st.builds(lambda p, q: p + q, path, QUERY),
        st.builds(lambda s, h, p: s + b"://" + h + p, st.sampled_from([b"http", b"https", b"HTTP", b"ftp"]),
                  HOSTS, path),
        st.builds(lambda h: h + b":" + b"443", HOSTS),
        st.sampled_from([b"*", b"69/api/v1/upstreams", b"I", b"//x", b"/" + b"a" * 17000, b"/%00", b"/\x7f"]),
        st.builds(lambda t: b"/" + t, TEXT),
        st.binary(max_size=20),
    )


VERSIONS = st.one_of(
    st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1", b""]),
    st.binary(max_size=9),
)
HEADER_NAMES = st.one_of(
    st.sampled_from([b"Host", b"Content-Type", b"Expect", b"Via", b"Connection", b"Transfer-Encoding",
                     b"Content-Length", b"Authorization", b"X-Forwarded-For", b"Upgrade", b"Accept",
                     b"Cookie", b"Te", b"Trailer", b"Keep-Alive", b"Proxy-Connection"]),
    st.binary(min_size=0, max_size=16),
)
HEADER_VALUES = st.one_of(
    st.sampled_from([b"100-continue", b"close", b"keep-alive, Upgrade", b"chunked", b"gzip, chunked",
                     b"application/json", b"Bearer " + TOKEN.encode(), b"Bearer wrong", b"h2c", b"-1",
                     b"99999999999999999999", b"1.1 paddler-0123456789abcdef", b"\xff\xfe", b" a\tb "]),
    st.binary(max_size=40),
)
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False), st.text(max_size=20),
        st.sampled_from([10**4000, "http://[::1", "[" * 3000, "http://127.0.0.1:9", "\u0000", "ok"]),
    ),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
REQUEST_FIELDS = ["prompt", "messages", "stream", "n_predict", "max_tokens", "model", "input", "content",
                  "tokens", "query", "documents", "url", "name", "api_key", "slots_idle", "slots_processing",
                  "slots_total", "state", "error", "models", "interval"]


def _dump(value: Any) -> bytes:
    try:
        return json.dumps(value).encode()
    except (ValueError, RecursionError):
        return b"{}"


JSON_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(REQUEST_FIELDS), JSON_VALUES, max_size=6).map(_dump),
    JSON_VALUES.map(_dump),
    st.sampled_from([b"[" * 3000, b"{" * 3000, b'{"prompt": "hi", "n_predict": 3}', b'{"stream": true, '
                     b'"prompt": "x", "n_predict": 4}', b"\xff\xfe{", b"x" * (MAX_BODY + 10)]),
)
BODIES = st.one_of(JSON_BODIES, JSON_BODIES, st.binary(max_size=300))


@st.composite
def requests(draw: Any, paths: list[bytes], auth: bool = False) -> Case:
    """Seven cases in ten are well formed around one hostile part (a body, a header, a query);
    the rest are hostile throughout."""
    hostile = draw(st.integers(0, 9)) >= 7
    if hostile:
        method, target, version = draw(METHODS), draw(targets(paths)), draw(VERSIONS)
        eol = draw(st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r"]))
    else:
        method = draw(st.sampled_from([b"GET", b"POST", b"POST", b"POST", b"DELETE", b"PUT", b"HEAD"]))
        target = draw(st.builds(lambda p, q: p + q, st.sampled_from(paths), QUERY))
        version, eol = b"HTTP/1.1", b"\r\n"
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)):
        headers.append((b"Host", b"balancer"))
    if auth and draw(st.integers(0, 3)):
        headers.append((b"Authorization", b"Bearer " + TOKEN.encode()))
    if hostile or draw(st.integers(0, 3)) == 0:
        headers += draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=5))
    body = draw(BODIES) if hostile or method in (b"POST", b"PUT") else b""
    framing = draw(st.sampled_from(["length"] * 12 + ["chunked", "chunked", "chunked-broken", "short", "none"]))
    complete = True
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    elif framing == "chunked-broken":
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = b"zz\r\n" + body
        complete = False
    elif framing == "short":
        headers.append((b"Content-Length", str(len(body) + 10).encode()))
        complete = False
    if any(name.lower() in (b"content-length", b"transfer-encoding", b"expect") for name, _ in headers[:-1]):
        complete = False  # fuzzed framing headers: the server may rightly wait for more
    if hostile and draw(st.integers(0, 10)) == 0:
        complete = False
        cut = draw(st.integers(0, 40))
        raw = (method + b" " + target + b" " + version + eol)[:cut]
    else:
        head = method + b" " + target + b" " + version + eol
        head += b"".join(name + b": " + value + eol for name, value in headers)
        raw = head + eol + body
    if eol != b"\r\n" and b"\n" not in raw:
        complete = False  # a bare CR is no line ending at all: the head never ends
    return Case(raw, complete, mutating=method in (b"POST", b"DELETE", b"PUT", b"PATCH"))


# -- checking an answer ------------------------------------------------------------------


def check(case: Case, port: int, seen: dict[str, int]) -> tuple[int, bytes] | None:
    # A request sent whole must be answered; one cut short is followed by the client's FIN, which
    # closes the connection at once (an answer given before is still read and checked).
    data, closed = raw_exchange("127.0.0.1", port, case.raw, timeout=5.0, half_close=not case.complete)
    if not data:
        seen["no answer"] = seen.get("no answer", 0) + 1
        assert not case.complete, f"no answer ({'closed' if closed else 'within 5 s'}) to {case.raw[:300]!r}"
        return None
    try:
        status, headers, body = parse_response(data)
    except (ValueError, IndexError):
        raise AssertionError(f"not an HTTP response: {data[:300]!r} to {case.raw[:300]!r}") from None
    seen[str(status)] = seen.get(str(status), 0) + 1
    if status >= 500 and headers.get(b"server") == b"llama.cpp":
        # llama-server itself answers JSON it cannot parse with 500: relayed as it is, not the balancer's
        seen["relayed llama.cpp 5xx"] = seen.get("relayed llama.cpp 5xx", 0) + 1
        return status, body
    assert status < 500, f"{status} {body[:300]!r} to {case.raw[:300]!r}"
    if status >= 400 and case.raw[:5] != b"HEAD " and case.raw[:5] != b"head ":
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{status} without a JSON error: {data[:300]!r} to {case.raw[:300]!r}")
        assert isinstance(error, dict) and error.get("message"), error
    return status, body


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    from ..processes import Processes

    procs = Processes(tmp_path_factory.mktemp("fuzz"))
    try:
        sims = [Simulated(procs, free_port(), 2, 200000.0)]
        sims[0].start()
        sims[0].wait_up()
        # Registrations the fuzzer gets through name closed ports or bad URLs: those upstreams are
        # never healthy, so the proxy's own upstream serves every proxied case.
        process, proxy, management = start_balancer(
            procs, "--upstream", sims[0].url, "--probe-interval", "0.5", "--probe-timeout", "0.3",
            "--max-request-body", str(MAX_BODY), "--header-timeout", "2", "--management-token", TOKEN,
            "--agent-expiry", "86400",
        )
        wait_for(lambda: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 1, 20, "fleet probed")
        yield process, proxy, process, management
        for sim in sims:
            problems = log_problems(sim.process.log())
            assert problems == [], problems[:10]
    finally:
        procs.stop_all()


def test_fuzzing_the_proxy_port_gets_no_5xx_no_hang_and_no_traceback(fleet):
    process, proxy, _, _ = fleet
    port = int(proxy.rsplit(":", 1)[1])
    pid = process.process.pid
    held_before = held(pid, {port})
    seen: dict[str, int] = {}
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(requests(PROXY_PATHS))
    def fuzz(case: Case) -> None:
        check(case, port, seen)

    fuzz()
    seconds = time.monotonic() - started
    assert call(proxy, "GET", "/health").status == 200
    assert process.process.poll() is None
    wait_for(lambda: held(pid, {port})["clients"] == 0, 5, "every client connection closed")
    held_after = held(pid, {port})
    report("fuzz_proxy", cases=CASES, seconds=round(seconds, 1), answers=seen, held_before=held_before,
           held_after=held_after)
    assert held_after["other"] <= held_before["other"], (held_before, held_after)
    problems = log_problems(process.log())
    assert problems == [], problems[:10]


def _state(management: str) -> tuple[Any, Any]:
    fleet = sorted((u["id"], u["name"], u["url"], u["draining"], u["source"], u["removal_pending"])
                   for u in upstreams(management))
    agents = sorted((a["agent_id"], a["upstream_id"], a["name"])
                    for a in get_json(management + "/api/v1/agents")[1]["agents"])
    return fleet, agents


def test_fuzzing_the_management_port_changes_nothing_it_refuses(fleet):
    _, _, process, management = fleet
    port = int(management.rsplit(":", 1)[1])
    seen: dict[str, int] = {}
    refused_mutations = [0]
    started = time.monotonic()

    @FUZZ_SETTINGS
    @given(requests(MANAGEMENT_PATHS, auth=True))
    def fuzz(case: Case) -> None:
        before = _state(management) if case.mutating else None
        answer = check(case, port, seen)
        if before is not None and (answer is None or answer[0] >= 400):
            refused_mutations[0] += 1
            assert _state(management) == before, f"refused {case.raw[:300]!r} changed the fleet"

    fuzz()
    seconds = time.monotonic() - started
    assert process.process.poll() is None and call(management, "GET", "/health").status == 200
    report("fuzz_management", cases=CASES, seconds=round(seconds, 1), answers=seen,
           refused_mutations_checked=refused_mutations[0])
    problems = log_problems(process.log())
    assert problems == [], problems[:10]
