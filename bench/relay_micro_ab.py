"""In-memory relay cost per chunk of one checkout, for interleaved A/B runs against others (docs/performance.md §2).

The L{bench.relay_micro} rig (the real proxy, channel and upstream client on
string transports) fed reads of one SSE chunk and of 4 chunks; the best of
25 runs of 4,000 reads each, in CPU microseconds per chunk. Run it per
checkout in turn, repeatedly, each with its own ``paddler`` first on the path:

    for i in 1 2 3; do for t in /tmp/before .; do
        (cd $t && PYTHONPATH=$t python -P -m bench.relay_micro_ab); done; done
"""

from __future__ import annotations

import time

from bench import relay_micro as m


def per_chunk(reads: int, chunks_per_read: int, runs: int = 25) -> float:
    channel, connections, client = m._rig("passthrough")
    m._post(channel, True)
    protocol, _ = connections.made[-1]
    protocol.dataReceived(m.SSE_HEAD + m.CHUNK)
    data = m.CHUNK * chunks_per_read
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        for _ in range(reads):
            protocol.dataReceived(data)
        best = min(best, (time.process_time() - start) / (reads * chunks_per_read) * 1e6)
        client.clear()
    return best


def main() -> None:
    import paddler

    print(paddler.__file__, " ".join(f"{c} per read: {per_chunk(4000, c):.3f} us/chunk" for c in (1, 4)))


if __name__ == "__main__":
    main()
