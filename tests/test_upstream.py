"""The upstream record: URLs, slot bookkeeping, state changes."""

import pytest
from twisted.logger import LogLevel, capturedLogs

from paddler.fleet.upstream import FailureSeen, InvalidUpstreamURL, SlotsSeen, Upstream, normalise_url, upstream_id


@pytest.mark.parametrize(
    "given, expected",
    [
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("http://10.0.0.5:8080/", "http://10.0.0.5:8080"),
        ("http://Example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("http://[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_urls_are_normalised_to_scheme_host_port(given, expected):
    assert normalise_url(given) == expected


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("", "non-empty"),
        ("ftp://x:1", "http://"),
        ("http://", "no host"),
        ("http://x:99999", "bad port"),
        ("http://x:1/v1", "path"),
        ("10.0.0.5:8080", "http://"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(bad, fragment):
    with pytest.raises(InvalidUpstreamURL, match=fragment):
        normalise_url(bad)


def test_id_is_stable_for_the_same_url():
    assert Upstream("http://a:1/").id == Upstream("http://a:1").id == upstream_id("http://a:1")
    assert Upstream("http://a:1").id != Upstream("http://a:2").id


def test_our_requests_count_as_processing_until_returned():
    u = Upstream("http://a:1")
    u.apply_slots(4, 0, u.probe_mark())
    leases = [u.take_lease() for _ in range(3)]
    assert (u.slots_idle, u.slots_processing, u.in_flight) == (1, 3, 3)
    u.return_lease(leases[0])
    assert (u.slots_idle, u.slots_processing) == (2, 2)


def test_a_lease_cannot_be_returned_twice():
    u = Upstream("http://a:1")
    lease = u.take_lease()
    u.return_lease(lease)
    with pytest.raises(KeyError):
        u.return_lease(lease)


def test_probe_result_is_reconciled_with_requests_dispatched_after_it_was_sent():
    """A probe sent before two dispatches reports 1 busy (someone else's):
    the two later requests are ours on top of it, not double-counted."""
    u = Upstream("http://a:1")
    u.apply_slots(4, 0, u.probe_mark())
    mark = u.probe_mark()
    u.take_lease()
    u.take_lease()
    u.apply_slots(4, 1, mark)
    assert (u.external_processing, u.slots_processing, u.slots_idle) == (1, 3, 1)


def test_probe_counting_our_running_requests_does_not_double_count_them():
    u = Upstream("http://a:1")
    first = u.take_lease()
    u.take_lease()
    mark = u.probe_mark()
    u.apply_slots(4, 2, mark)  # the server sees our two
    assert (u.external_processing, u.slots_processing) == (0, 2)
    u.return_lease(first)
    assert u.slots_processing == 1


def test_processing_never_exceeds_total_nor_goes_negative():
    u = Upstream("http://a:1")
    mark = u.probe_mark()
    for _ in range(6):
        u.take_lease()
    u.apply_slots(2, 0, mark)
    assert (u.slots_processing, u.slots_idle) == (2, 0)
    u.apply_slots(2, 7, u.probe_mark())
    assert (u.slots_processing, u.slots_idle) == (2, 0)


def test_state_change_logs_one_event_and_repeat_logs_nothing():
    u = Upstream("http://a:1", name="gpu-1")
    with capturedLogs() as events:
        assert u.record(FailureSeen("connection refused"), 1.0)
        assert not u.record(FailureSeen("connection refused"), 2.0)
    assert len(events) == 1
    assert events[0]["log_level"] == LogLevel.info
    assert (events[0]["name"], events[0]["previous"], events[0]["state"]) == ("gpu-1", "unknown", "unreachable")


def test_status_shows_busy_and_draining():
    u = Upstream("http://a:1")
    u.record(SlotsSeen(1, 0, u.probe_mark()), 0.0)
    assert u.status == "healthy" and u.accepts_requests
    u.take_lease()
    assert u.status == "busy"
    u.draining = True
    assert u.status == "draining" and not u.accepts_requests


def test_international_host_names_are_stored_in_idna_form():
    assert normalise_url("http://bücher.example:8080") == "http://xn--bcher-kva.example:8080"
