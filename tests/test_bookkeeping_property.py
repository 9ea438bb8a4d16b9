"""Property test: slot counts never go negative or drift under any interleaving
of dispatch, completion and (delayed) probe answers."""

from hypothesis import given, settings
from hypothesis import strategies as st

from paddler.fleet.upstream import Upstream

TOTAL = 4

operations = st.lists(
    st.one_of(
        st.tuples(st.just("dispatch")),
        st.tuples(st.just("complete"), st.integers(min_value=0, max_value=50)),
        st.tuples(st.just("probe_send")),
        st.tuples(st.just("probe_answer"), st.integers(min_value=0, max_value=5)),
        st.tuples(st.just("external"), st.integers(min_value=-1, max_value=1)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_counts_stay_in_range_and_converge_after_a_quiet_probe(ops):
    upstream = Upstream("http://a:1")
    truth_ours: list[int] = []  # leases running on the server (server admits up to TOTAL)
    external = 0  # requests from other clients
    pending_probes: list[tuple[int, int]] = []  # (mark, processing seen by server)
    for op in ops:
        kind = op[0]
        if kind == "dispatch":
            truth_ours.append(upstream.take_lease())
        elif kind == "complete" and truth_ours:
            upstream.return_lease(truth_ours.pop(op[1] % len(truth_ours)))
        elif kind == "external":
            external = max(0, min(TOTAL, external + op[1]))
        elif kind == "probe_send":
            # the server answers at once with what it runs now; we learn it later
            seen = min(TOTAL, external + len(truth_ours))
            pending_probes.append((upstream.probe_mark(), seen))
        elif kind == "probe_answer" and pending_probes:
            mark, seen = pending_probes.pop(op[1] % len(pending_probes))
            upstream.apply_slots(TOTAL, seen, mark)
        assert 0 <= upstream.slots_processing <= upstream.slots_total
        assert upstream.slots_idle >= 0
        assert upstream.slots_idle + upstream.slots_processing == upstream.slots_total
        assert upstream.in_flight == len(truth_ours)
    # Quiesce: every request finishes, then one fresh probe.
    while truth_ours:
        upstream.return_lease(truth_ours.pop())
    upstream.apply_slots(TOTAL, external, upstream.probe_mark())
    assert upstream.slots_processing == min(TOTAL, external)
    assert upstream.slots_idle == TOTAL - min(TOTAL, external)
