"""Blocking HTTP helpers for tests against real server processes.

These run in the test's own thread (or in plain helper threads), outside the
Twisted reactor: ``http.client`` for requests, threads for concurrency, and
deadline loops for every wait.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

#: Seconds between two looks in a deadline loop.
POLL = 0.02


def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


class Reply:
    """A whole HTTP answer: status, headers (lower-case names) and body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def sse(self) -> list[str]:
        """The ``data:`` payloads of an SSE body, in order (``[DONE]`` included)."""
        return sse_payloads(self.body)

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.body[:300]!r}>"


def sse_payloads(body: bytes) -> list[str]:
    """Split an SSE body into its ``data:`` payloads; every event ends with a blank line."""
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), f"SSE body does not end with a blank line: {text[-200:]!r}"
    payloads = []
    for event in text.split("\n\n")[:-1]:
        assert event.startswith("data: "), f"not an SSE data event: {event[:200]!r}"
        payloads.append(event[len("data: "):])
    return payloads


def request(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 60.0,
) -> Reply:
    """One request; ``body`` is JSON-encoded unless it is already bytes."""
    conn = _connection(url, timeout)
    try:
        payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, payload, headers)
        response = conn.getresponse()
        return Reply(
            response.status,
            {name.lower(): value for name, value in response.getheaders()},
            response.read(),
        )
    finally:
        conn.close()


def get(url: str, path: str, timeout: float = 10.0) -> Reply:
    return request(url, "GET", path, timeout=timeout)


def post(url: str, path: str, body: Any, timeout: float = 60.0) -> Reply:
    return request(url, "POST", path, body, timeout=timeout)


def get_json(url: str, path: str) -> Any:
    reply = get(url, path)
    assert reply.status == 200, reply
    return reply.json()


def metric(url: str, name: str) -> float:
    """One ``llamacpp:NAME`` value from ``/metrics``."""
    reply = get(url, "/metrics")
    assert reply.status == 200, reply
    for line in reply.body.decode().splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no llamacpp:{name} in /metrics")


def busy_slots(url: str) -> list[int]:
    """Ids of the slots ``/slots`` reports as processing."""
    return [slot["id"] for slot in get_json(url, "/slots") if slot["is_processing"]]


def wait_for(predicate: Callable[[], T], deadline: float, what: str) -> T:
    """Poll ``predicate`` until it returns something true; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    last: Any = None
    while True:
        try:
            last = predicate()
        except (OSError, http.client.HTTPException) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline:g} s (last: {last!r})")
        time.sleep(POLL)


def send_unread(url: str, path: str, body: Any) -> http.client.HTTPConnection:
    """Send a request and read nothing back; ``drop(conn)`` goes away later."""
    conn = _connection(url, 60.0)
    conn.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return conn


def drop(conn: http.client.HTTPConnection) -> None:
    """Go away without a word: shut the socket down and close it."""
    if conn.sock is not None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


class Background:
    """Run ``call()`` in a daemon thread; ``result(deadline)`` joins and returns (or raises)."""

    def __init__(self, call: Callable[[], T]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self.finished_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self._value = call()
        except BaseException as e:  # handed to the test by result()
            self._error = e
        self.finished_at = time.monotonic()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, deadline: float) -> Any:
        self._thread.join(deadline)
        if self._thread.is_alive():
            raise AssertionError(f"background request not finished within {deadline:g} s")
        if self._error is not None:
            raise self._error
        return self._value


class Stream:
    """A streaming POST whose events are read by a helper thread as they come.

    It is used to keep a slot busy for as long as a test needs (a long
    ``n_predict`` that the test ends by disconnecting) and to watch a stream
    arrive event by event. ``close()`` drops the connection abruptly, like
    a client that goes away.
    """

    def __init__(self, url: str, path: str, body: dict[str, Any], read: bool = True) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.ended = False
        self._read = read
        self._first = threading.Event()
        self._conn = _connection(url, 120.0)
        self._conn.connect()
        payload = json.dumps({**body, "stream": True}).encode()
        self._conn.request("POST", path, payload, {"Content-Type": "application/json"})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            response = self._conn.getresponse()
            self.status = response.status
            self.headers = {name.lower(): value for name, value in response.getheaders()}
            while True:
                line = response.readline()
                if not line:
                    self.ended = True
                    return
                if line.startswith(b"data: "):
                    self.events.append(line[len(b"data: "):].decode("utf-8").rstrip("\n"))
                    self._first.set()
                    if not self._read:
                        return  # leave the rest unread: the server keeps the slot
        except BaseException as e:  # a closed socket ends the reader; keep it for the test
            self.error = e
        finally:
            self._first.set()

    def wait_first_event(self, deadline: float = 30.0) -> str:
        """The first ``data:`` payload, once it has arrived (the request holds a slot then)."""
        if not self._first.wait(deadline):
            raise AssertionError(f"no stream event within {deadline:g} s")
        if not self.events:
            raise AssertionError(f"stream ended without events: {self.status} {self.error!r}")
        return self.events[0]

    def wait_end(self, deadline: float = 60.0) -> list[str]:
        """All payloads once the server has ended the stream."""
        self._thread.join(deadline)
        if self._thread.is_alive():
            raise AssertionError(f"stream not finished within {deadline:g} s")
        if self.error is not None:
            raise self.error
        return self.events

    def wait_closed(self, deadline: float) -> None:
        """Wait until the stream has ended, cleanly or not (the server or proxy closed it)."""
        self._thread.join(deadline)
        if self._thread.is_alive():
            raise AssertionError(f"stream still open after {deadline:g} s")

    def close(self) -> None:
        """Go away without a word: shut the socket down and close it."""
        drop(self._conn)
        self._thread.join(10.0)


class Streams:
    """Streams opened by one test, all closed at teardown."""

    def __init__(self) -> None:
        self.opened: list[Stream] = []

    def __call__(self, url: str, path: str, body: dict[str, Any], read: bool = True) -> Stream:
        stream = Stream(url, path, body, read)
        self.opened.append(stream)
        return stream

    def close_all(self) -> None:
        for stream in self.opened:
            stream.close()
