"""Loop tests/test_relay_slow_reader.py's scenario against a real balancer; flag stalls and slow spells, dump state.

    .venv/bin/python contrib/flushstall/repro.py --runs 30 --fresh --flags="--flush-before-poll --no-relay-passthrough"

Starts tests/pattern_upstream.py and a balancer through contrib/flushstall/balancer.py
(state dump on SIGUSR1, invariant auditor), then per run a slow reader (4 KiB
SO_RCVBUF, 4 KiB every 0.5 ms) and a fast one per --pairs, checks every event
arrived once in order, and when a reader makes no progress for --stall s or
reads under --min-rate B/s over 3 s it sends SIGUSR1 and prints ``ss -tnoimp``
for the balancer's sockets. --fresh: a new balancer per run. Debugging only.
"""
import argparse, os, signal, socket, subprocess, sys, threading, time
ROOT = os.environ.get("PADDLER_ROOT") or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tests.pattern_upstream import expected_events
from tests.processes import free_port, get_json, wait_for
from tests.relay_checks import post_raw

ap = argparse.ArgumentParser()
ap.add_argument("--runs", type=int, default=10)
ap.add_argument("--events", type=int, default=30000)
ap.add_argument("--flags", default="--flush-before-poll --no-relay-passthrough")
ap.add_argument("--stall", type=float, default=2.0)
ap.add_argument("--timeout", type=float, default=60.0)
ap.add_argument("--cpu", default=None, help="taskset cpu list for the balancer")
ap.add_argument("--pairs", type=int, default=1)
ap.add_argument("--fresh", action="store_true")
ap.add_argument("--log", default="/tmp/flushstall-balancer.log")
ap.add_argument("--min-rate", type=float, default=60000.0)
a = ap.parse_args()

up_port = free_port()
up = subprocess.Popen([sys.executable, "-m", "tests.pattern_upstream", str(up_port)], cwd=ROOT)
ap2 = None
def start_balancer():
    global port, proxy, bal, logf
    port, mport = free_port(), free_port()
    cmd = [sys.executable, os.path.join(ROOT, "contrib", "flushstall", "balancer.py"), "balancer", "--listen", f"tcp:{port}:interface=127.0.0.1",
       "--management-listen", f"tcp:{mport}:interface=127.0.0.1", "--upstream", f"http://127.0.0.1:{up_port}",
       "--probe-interval", "0.2", *a.flags.split()]
    if a.cpu:
        cmd = ["taskset", "-c", a.cpu] + cmd
    logf = open(a.log, "ab")
    bal = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1"), cwd=ROOT, start_new_session=True)
    proxy = f"http://127.0.0.1:{port}"
    wait_for(lambda: get_json(proxy + "/health")[1]["upstreams"]["healthy"] == 1, 30, "healthy")
def stop_balancer():
    os.killpg(bal.pid, signal.SIGTERM); bal.wait(10)
expected = expected_events(a.events)

def reader(name, rcvbuf, piece, per_chunk, res, prog):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(a.timeout)
    sock.connect(("127.0.0.1", port))
    got = bytearray()
    try:
        post_raw(sock, "/completion", {"events": a.events, "per_chunk": per_chunk, "stream": True}, extra="Connection: close\r\n")
        if piece:
            time.sleep(0.3)
        while True:
            data = sock.recv(piece or 1 << 20)
            if not data:
                break
            got += data
            prog[name] = (time.monotonic(), len(got))
            if piece:
                time.sleep(0.0005)
    except Exception as e:
        res[name + "_err"] = repr(e)
    finally:
        sock.close()
        res[name] = bytes(got)

def decode(raw):
    head, _, rest = raw.partition(b"\r\n\r\n")
    parts, pos = [], 0
    while True:
        end = rest.index(b"\r\n", pos)
        size = int(rest[pos:end].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(rest[end + 2:end + 2 + size]); pos = end + 4 + size

open(a.log, "wb").close()
try:
    wait_for(lambda: get_json(f"http://127.0.0.1:{up_port}/health")[0] == 200, 20, "up")
    start_balancer()
    stalls = 0; times = []
    for run in range(a.runs):
        if a.fresh and run:
            stop_balancer(); start_balancer()
        res, prog = {}, {}
        t0 = time.monotonic()
        ths = []
        for k in range(a.pairs):
            ths += [threading.Thread(target=reader, args=(f"slow{k}", 4096, 4096, 1, res, prog)),
                    threading.Thread(target=reader, args=(f"fast{k}", None, None, 7, res, prog))]
        names = [f"{x}{k}" for k in range(a.pairs) for x in ("slow", "fast")]
        for t in ths: t.start()
        stalled = False; dumps = 0; hist = {}

        def flag(why):
            print(f"run {run}: {why}; dumping", flush=True)
            os.kill(bal.pid, signal.SIGUSR1)
            lines = subprocess.run(["ss", "-tnoimp"], capture_output=True, text=True).stdout.splitlines()
            print("\n".join(l + "\n" + (lines[i + 1] if i + 1 < len(lines) else "") for i, l in enumerate(lines)
                            if f"pid={bal.pid}," in l or f":{port} " in l), flush=True)

        while any(t.is_alive() for t in ths):
            time.sleep(0.2)
            now = time.monotonic()
            for n in names:
                if n not in prog or n in res or dumps >= 6:
                    continue
                h = hist.setdefault(n, [])
                h.append((now, prog[n][1]))
                while now - h[0][0] > 3:
                    h.pop(0)
                rate = (h[-1][1] - h[0][1]) / max(1e-3, h[-1][0] - h[0][0])
                if now - prog[n][0] > a.stall:
                    stalled = True; dumps += 1
                    flag(f"{n} stalled at {prog[n][1]} bytes for {now - prog[n][0]:.1f}s")
                    prog[n] = (now, prog[n][1])
                elif n.startswith("slow") and now - t0 > 8 and h[-1][0] - h[0][0] > 2.5 and rate < a.min_rate:
                    stalled = True; dumps += 1
                    flag(f"{n} slow: {rate:.0f} B/s over 3 s at {prog[n][1]} bytes")
                    hist[n] = []
        el = time.monotonic() - t0
        ok = all(n in res and decode(res[n]) == expected for n in names) if not any(k.endswith("_err") for k in res) else False
        stalls += stalled
        times.append(el)
        print(f"run {run}: {el:.2f}s ok={ok} stalled={stalled} errs={[res[k] for k in res if k.endswith('_err')]}", flush=True)
    times.sort()
    print(f"SUMMARY runs={a.runs} stalls={stalls} median={times[len(times)//2]:.2f}s min={times[0]:.2f} max={times[-1]:.2f}", flush=True)
finally:
    stop_balancer()
    up.terminate(); up.wait(10)
