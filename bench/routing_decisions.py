"""Join a balancer's routing decisions (``PADDLER_LOG_LEVEL=debug``) with a chat client's records.

For one config of ``python -m bench.routing_real --debug-log``: each turn in
the order it was sent, the upstream it went to, how long it waited, what the
index predicted and what the server reused (``cache_n``) and evaluated
(``prompt_n``, ``prompt_ms``), any hold-out, and the estimates per upstream
at the decision; then each conversation's upstreams turn by turn (a change
is a move, which re-evaluates its history).

    python -m bench.routing_decisions bench/results/tmp/rr1-paddler-default.log \\
        bench/results/tmp/rr1-paddler-default-client.json
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

BLOCK_TOKENS = 16  # paddler.routing.prefix: 64-character blocks at 4 characters per token


def parse(lines: list[str]) -> dict[int, dict[str, Any]]:
    """The route lines by request number."""
    routes: dict[int, dict[str, Any]] = {}
    for line in lines:
        m = re.search(r"route (\d+) \((\d+) tokens\) -> (\w+) after ([\d.]+)s, predicted cached (\d+) "
                      r"blocks: (.*)", line)
        if m:
            routes.setdefault(int(m[1]), {}).update(tokens=int(m[2]), up=m[3][:4], waited=float(m[4]),
                                                    pred=int(m[5]) * BLOCK_TOKENS, est=m[6])
            continue
        m = re.search(r"route (\d+) \((\d+) tokens\) holds for (\w+) until \+([\d.]+)s", line)
        if m:
            routes.setdefault(int(m[1]), {}).update(hold=m[3][:4], hold_until=float(m[4]))
            continue
        m = re.search(r"route (\d+) done on (\w+) after ([\d.]+)s: cache_n (\S+) prompt_n (\S+) prompt_ms (\S+)",
                      line)
        if m:
            routes.setdefault(int(m[1]), {}).update(held=float(m[3]), cache_n=int(m[4]), prompt_n=int(m[5]),
                                                    prompt_ms=float(m[6]))
    return routes


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0], errors="replace") as f:
        routes = parse(f.readlines())
    with open(args[1]) as f:
        records = sorted(json.load(f)["results"], key=lambda r: r["sent"])
    used: set[int] = set()
    upstreams: dict[int, list[str]] = {}
    for r in records:
        # the server's own cache_n and prompt_n name the request in both files
        seq = next((s for s, v in sorted(routes.items()) if s not in used and v.get("cache_n") == r["cache_n"]
                    and v.get("prompt_n") == r["prompt_n"]), None)
        v = routes.get(seq, {}) if seq is not None else {}
        if seq is not None:
            used.add(seq)
        upstreams.setdefault(r["conversation"], []).append(v.get("up", "?"))
        estimates = re.sub(r"\[(\w{4})\w+", r"[\1", v.get("est", ""))
        hold = f" HOLD {v['hold']} until +{v['hold_until']:.3f}s" if "hold" in v else ""
        print(f"t {r['sent']:6.2f} c{r['conversation']} t{r['turn']} -> {v.get('up', '?')} waited "
              f"{v.get('waited', 0):.3f} predicted {v.get('pred', 0):4d} cache_n {r['cache_n']} prompt_n "
              f"{r['prompt_n']} prompt_ms {v.get('prompt_ms', 0):.1f}{hold} | {estimates}")
    for conversation, ups in sorted(upstreams.items()):
        print("conversation", conversation, " ".join(ups))


if __name__ == "__main__":
    main()
