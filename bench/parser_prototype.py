"""Would a faster HTTP parser on the proxy port pay? Three Twisted servers answering a fixed JSON, under wrk.

A prototype, not paddler: each server answers every POST with the same
small completion JSON on a kept-alive connection, on Twisted's reactor,
pinned to one core (wrk on the other):

- ``twisted-site``: ``twisted.web.server.Site`` with a leaf resource (what
  paddler's proxy port runs on, with ``parsePOSTFormSubmission=False``);
- ``httptools``: a ``Protocol`` parsing with ``httptools`` (llhttp, C);
- ``h11``: a ``Protocol`` parsing with ``h11`` (pure Python).

The CPU per request of each is the floor that server side puts under any
proxy built on it. Results: bench/results/parser_prototype.json.

    python -m bench.parser_prototype [--reps N] [--seconds S]
    python -m bench.parser_prototype --serve KIND --port P     (one server; used by the bench)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

BODY = (b'{"id":"cmpl-bench","object":"text_completion","model":"bench","choices":[{"index":0,'
        b'"text":" the quick brown fox","finish_reason":"length"}],"usage":{"prompt_tokens":8}}')
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
KINDS = ("twisted-site", "httptools", "h11")


def serve(kind: str, port: int) -> None:
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    if kind == "twisted-site":
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Leaf(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                request.content.read()
                request.setHeader(b"content-type", b"application/json")
                return BODY

        site = Site(Leaf(), parsePOSTFormSubmission=False)
        site.log = lambda request: None  # type: ignore[method-assign]
        factory: Any = site
    elif kind == "httptools":
        import httptools

        class Fast(Protocol):
            def connectionMade(self) -> None:
                self.parser = httptools.HttpRequestParser(self)
                self.body: list[bytes] = []

            def on_body(self, body: bytes) -> None:
                self.body.append(body)

            def on_message_complete(self) -> None:
                self.body = []
                self.transport.write(ANSWER)

            def dataReceived(self, data: bytes) -> None:
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserError:
                    self.transport.loseConnection()

        factory = Factory.forProtocol(Fast)
    else:
        import h11

        class Pure(Protocol):
            def connectionMade(self) -> None:
                self.conn = h11.Connection(h11.SERVER)

            def dataReceived(self, data: bytes) -> None:
                self.conn.receive_data(data)
                while True:
                    event = self.conn.next_event()
                    if event is h11.NEED_DATA:
                        return
                    if isinstance(event, h11.EndOfMessage):
                        self.transport.write(self.conn.send(h11.Response(status_code=200, headers=[
                            ("content-type", "application/json"), ("content-length", str(len(BODY)))])))
                        self.transport.write(self.conn.send(h11.Data(data=BODY)))
                        self.transport.write(self.conn.send(h11.EndOfMessage()))
                        self.conn.start_next_cycle()
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return

        factory = Factory.forProtocol(Pure)
    factory.noisy = False
    reactor.listenTCP(port, factory, interface="127.0.0.1", backlog=4096)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=KINDS)
    parser.add_argument("--port", type=int)
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3, 1 with --quick)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per run (default 4, 2 with --quick)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.seconds = args.seconds or (2.0 if args.quick else 4.0)
    if args.serve:
        serve(args.serve, args.port)
        return {}
    from bench.common import PROXY_CORE, PYTHON, Processes, free_port, log, machine, median, pinned, save, spread
    from bench.common import wait_port
    from bench.overhead import run_wrk

    rows: dict[str, Any] = {}
    with Processes() as procs:
        servers = {}
        for kind in KINDS:
            port = free_port()
            proc = procs.start(pinned([PYTHON, "-m", "bench.parser_prototype", "--serve", kind, "--port", str(port)],
                                      PROXY_CORE), f"parser-{kind}")
            wait_port(port, 15, proc)
            run_wrk(port, 16, 1, proc.pid)
            servers[kind] = (port, proc.pid)
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
        for rep in range(args.reps):
            for kind, (port, pid) in servers.items():
                result = run_wrk(port, 16, args.seconds, pid)
                runs[kind].append(result)
                log(f"parser rep {rep + 1}/{args.reps} {kind}: {result['rps']:.0f} req/s, "
                    f"{result['cpu_s_per_1000']:.3f} CPU ms per request")
    for kind, rs in runs.items():
        cpu = [r["cpu_s_per_1000"] for r in rs]
        rows[kind] = {"cpu_ms_per_request": median(cpu), "cpu_ms_per_request_spread": spread(cpu),
                      "rps": median(r["rps"] for r in rs)}
    data = {"scenario": "parser_prototype", "machine": machine(), "concurrency": 16, "repetitions": args.reps,
            "rows": rows, "runs": runs}
    save("parser_prototype", data)
    return data


if __name__ == "__main__":
    main(sys.argv[1:])
