"""Suite-wide fixtures: every test fails if it logged an unhandled error."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import provider


@pytest.fixture(autouse=True)
def fail_on_logged_errors(request: pytest.FixtureRequest) -> Iterator[list[dict]]:
    """Collect critical log events and unhandled failures; fail the test if any appear.

    A test that expects an error logged marks itself with
    ``@pytest.mark.allow_logged_errors``.
    """
    errors: list[dict] = []

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        if event.get("log_level") == LogLevel.critical or (
            event.get("isError") and "failure" in event
        ):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield errors
        # Unhandled Deferred errors surface on collection: blame this test. What
        # survives is frozen, so the next test's collection scans only what that
        # test made (a full collection of the whole heap took ~60 ms per test).
        gc.collect()
        gc.freeze()
    finally:
        globalLogPublisher.removeObserver(observe)
    if errors and request.node.get_closest_marker("allow_logged_errors") is None:
        from twisted.logger import formatEvent

        messages = []
        for event in errors:
            failure = event.get("log_failure") or event.get("failure")
            messages.append(formatEvent(event) + ("\n" + failure.getTraceback() if failure else ""))
        pytest.fail("test logged unhandled errors:\n" + "\n".join(messages))


@pytest.fixture
def procs(tmp_path):
    """Starts real paddler processes on 127.0.0.1 (L{tests.processes.Processes}); stops them all after the test."""
    from .processes import Processes

    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()


@pytest.fixture(params=["twisted", "httptools"])
def both_parsers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with each request parser of the proxy port (--request-parser)."""
    from paddler.server.channel import GuardedSite

    monkeypatch.setattr(GuardedSite, "request_parser", request.param)
    return str(request.param)
