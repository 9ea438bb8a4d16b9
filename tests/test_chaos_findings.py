"""Bugs the chaos harness (tests/chaos) found, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from paddler.fleet.registry import AgentRegistry
from paddler.management.api import ManagementAPI
from paddler.server.router import PrefixRouter
from tests.simulator_support import MakeServer
from tests.simulator_support import clock, server  # noqa: F401 - pytest fixtures

from .helpers import make_pool


def test_the_simulator_answers_json_nested_too_deeply_like_llama_server_without_a_traceback(server: MakeServer):
    """The fuzzer's '[' x 3000 on /tokenize: a RecursionError escaped as a logged 500 'Internal server
    error'; llama-server answers its parse error (500 server_error) and logs nothing."""
    client = server()
    for path in ("/tokenize", "/completion", "/v1/chat/completions"):
        response = client.post(path, b"[" * 3000).response
        assert response.status == 500
        error = json.loads(response.body)["error"]
        assert error["type"] == "server_error" and "parse error" in error["message"]


@pytest_twisted.ensureDeferred
async def test_a_non_utf8_path_or_host_on_the_management_port_is_a_json_400_without_a_traceback():
    """GET /api/v1/upstreams/%ff got Klein's text/html 'Non-UTF-8 encoding in URL.' and a logged
    traceback (the conftest fixture fails a test that logs one)."""
    clock = Clock()
    pool = make_pool(clock)
    api = ManagementAPI(pool, AgentRegistry(pool, clock), clock)
    http = StubTreq(PrefixRouter([], api.app.resource()))
    for url, headers in (
        ("http://mgmt/api/v1/upstreams/%ff", {}),
        ("http://mgmt/api/v1/upstreams", {b"Host": [b"\xff.example"]}),
    ):
        response = await http.get(url, headers=headers)
        body = json.loads(await response.content())
        assert response.code == 400 and "UTF-8" in body["error"]["message"]
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/json")
    response = await http.get("http://mgmt/api/v1/upstreams/caf%C3%A9")
    assert response.code == 404  # UTF-8 percent-encoded is fine


def test_listeners_get_a_backlog_large_enough_for_a_burst():
    """Twisted's default backlog of 50: a burst of 150 clients saw 21 connections reset by the kernel."""
    from twisted.internet.testing import MemoryReactor
    from twisted.web.server import Site
    from twisted.web.resource import Resource

    from paddler.server.listeners import LISTEN_BACKLOG, ListeningService, with_backlog

    reactor = MemoryReactor()
    service = ListeningService(reactor, "tcp:0:interface=127.0.0.1", Site(Resource()), "test")
    service.startService()
    assert reactor.tcpServers[0][2] == LISTEN_BACKLOG == 1024
    assert with_backlog("tcp:80:backlog=7") == "tcp:80:backlog=7"
    assert with_backlog("unix:/tmp/x.sock") == "unix:/tmp/x.sock"
    assert with_backlog("tcp6:80:interface=\\:\\:1") == "tcp6:80:interface=\\:\\:1:backlog=1024"
