"""A stand-in llama-server that streams a known body fast, for the slow-reader relay test (its own process).

    python -m tests.pattern_upstream PORT

``GET /health`` and ``/slots`` (4 idle slots) answer like llama-server;
``POST /completion`` with ``{"events": N, "per_chunk": K}`` answers a
chunked ``text/event-stream`` of N events ``data: {"i": I}`` (I from 0),
K events per chunk, written as fast as the connection takes them: every
byte is known in advance (L{expected_events}), so a client can check that
it got each one once, in order. Standard library only (a thread per
connection), so it is not the code under test.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def event(i: int) -> bytes:
    return b'data: {"i": %d}\n\n' % i


def expected_events(count: int) -> bytes:
    """The payload of an answer of C{count} events."""
    return b"".join(event(i) for i in range(count))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass

    def _json(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        if self.path.startswith("/slots"):
            self._json([{"id": i, "n_ctx": 512, "is_processing": False} for i in range(4)])
        else:
            self._json({"status": "ok"})

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        count, per_chunk = int(body.get("events", 1000)), int(body.get("per_chunk", 1))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, count, per_chunk):
            data = b"".join(event(i) for i in range(start, min(count, start + per_chunk)))
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client (the balancer) that closes its connection is no error here


def main() -> None:
    server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
