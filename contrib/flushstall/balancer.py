"""Debug launcher for a balancer: a state dump on SIGUSR1 and an invariant auditor for the write flush (issue 26).

    python contrib/flushstall/balancer.py balancer --flush-before-poll ...

Runs paddler's CLI as ``python -m paddler`` does; once the reactor is
installed it (1) dumps, on SIGUSR1, to stderr every TCP transport (its
Twisted buffer: dataBuffer/offset/_tempDataLen, producer and producerPaused,
whether the reactor reads/writes it, whether the flusher has it dirty), the
HTTP channel's producer state and the relay's pause flags; (2) every 20 ms,
from a timed call (between reactor turns, where they must hold), checks on
every hooked transport: bytes pending => registered for write events or
dirty with the flush scheduled; a paused relay => the transport has it
paused and has bytes pending; a running relay => its upstream is read.
A violation is written to stderr with a dump; a line every ~5 s says how many
checks ran. Debugging only: it touches private state and is not shipped.
"""
import gc, sys, os

def dump(signum, frame):
    try:
        _dump()
    except BaseException as e:
        sys.stderr.write(f'DUMP failed {e!r}\n')

def _dump():
    from twisted.internet import reactor, tcp
    from paddler import flush
    out = []
    fl = flush._flushers.get(reactor)
    out.append(f"=== DUMP reactor={type(reactor).__name__} before_poll={getattr(reactor,'_before_poll',None)!r}")
    if fl is not None:
        out.append(f"flusher scheduled={fl._scheduled} dirty={[t.fileno() for t in fl._dirty]} sent={fl.sent} handed={fl.handed_over}")
    writes = getattr(reactor, "_writes", {}); reads = getattr(reactor, "_reads", {})
    for o in gc.get_objects():
        if type(o) in (tcp.Server, tcp.Client):
            try:
                fd = o.fileno()
            except Exception:
                fd = -1
            p = getattr(o, 'protocol', None)
            line = (f"{type(o).__name__} fd={fd} conn={o.connected} disc={o.disconnected} dbuf={len(o.dataBuffer)} off={o.offset} "
                    f"tmp={o._tempDataLen} prod={type(o.producer).__name__ if o.producer else None} streaming={o.streamingProducer} "
                    f"pPaused={o.producerPaused} inW={fd in writes} inR={fd in reads} dirty={fl is not None and o in fl._dirty} "
                    f"hooked={'startWriting' in o.__dict__} proto={type(p).__name__}")
            if hasattr(p, "_waitingForTransport"):
                line += f" chan.wait={p._waitingForTransport} chan.handling={p._handlingRequest} reqProd={type(p._requestProducer).__name__ if p._requestProducer else None}"
                rp = p._requestProducer
                if rp is not None and hasattr(rp, "_paused"):
                    line += f" relay.paused={rp._paused} body.paused={getattr(rp._body,'_paused',None)} bodyconn={getattr(getattr(rp._body,'_conn',None),'transport',None) and rp._body._conn.transport.fileno()}"
            if hasattr(p, "_state"):
                line += f" up.state={p._state}"
            out.append(line)
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()


import weakref
_hooked = weakref.WeakSet()
_viol = {"n": 0, "checks": 0}

def install_auditor():
    from twisted.internet import reactor
    from paddler import flush
    orig = flush.hook
    def hook(transport):
        r = orig(transport)
        if r:
            _hooked.add(transport)
        return r
    flush.hook = hook
    def check():
        try:
            _check(reactor, flush)
        except BaseException as e:
            sys.stderr.write(f"AUDIT failed {e!r}\n")
        reactor.callLater(0.02, check)
    reactor.callLater(0.5, check)

def _check(reactor, flush):
    _viol["checks"] += 1
    if _viol["checks"] % 250 == 0:
        fl0 = flush._flushers.get(reactor)
        counters = f" sent={fl0.sent} handed_over={fl0.handed_over}" if fl0 is not None else ""
        sys.stderr.write(f"AUDIT alive checks={_viol['checks']} hooked={len(_hooked)} violations={_viol['n']}{counters}\n")
    fl = flush._flushers.get(reactor)
    writes, reads = reactor._writes, reactor._reads
    for t in list(_hooked):
        if not t.connected or t.disconnected or t._aborting:
            continue
        fd = t.fileno()
        pending = (len(t.dataBuffer) - t.offset) + t._tempDataLen
        problems = []
        if pending and fd not in writes:
            dirty = fl is not None and t in fl._dirty
            sched = fl is not None and fl._scheduled and any(getattr(f, "__self__", None) is fl for f in getattr(reactor, "_before_poll", []))
            if not (dirty and sched):
                problems.append(f"pending {pending} not registered, dirty={dirty} sched={sched}")
        p = getattr(t, "protocol", None)
        rp = getattr(p, "_requestProducer", None)
        if rp is not None and hasattr(rp, "_paused"):
            if rp._paused and not t.producerPaused:
                problems.append("relay paused but transport.producerPaused False")
            if rp._paused and not pending and fd not in writes:
                problems.append("relay paused with nothing pending")
            body = rp._body
            conn = getattr(body, "_conn", None)
            if conn is not None and not rp._paused and not getattr(body, "_finished", True):
                ufd = conn.transport.fileno()
                if ufd not in reads:
                    problems.append(f"relay running but upstream fd {ufd} not reading (body._paused={body._paused})")
        if problems:
            _viol["n"] += 1
            if _viol["n"] <= 20:
                sys.stderr.write(f"AUDIT VIOLATION fd={fd} {problems}\n")
                _dump()


def _break_flusher() -> None:
    """Make the flusher never register for write events (what the auditor looks for): remainders are stranded."""
    from paddler import flush

    flush._twisted_start_writing = lambda transport: None


def _main() -> None:
    import signal as _signal
    import paddler.cli as cli
    install = cli.install_reactor

    def install_reactor(options):
        install(options)
        _signal.signal(_signal.SIGUSR1, dump)
        install_auditor()
        if os.environ.get("FLUSHSTALL_BREAK"):
            _break_flusher()  # a negative control: the auditor must report this

    cli.install_reactor = install_reactor
    sys.argv = ["paddler"] + sys.argv[1:]
    cli.main()


if __name__ == "__main__":
    _main()
