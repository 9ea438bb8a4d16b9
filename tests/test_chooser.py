"""Slot choosers: the default picks the most idle slots; the others are slot-blind."""

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from paddler.routing.policies import CHOOSERS, LeastConnectionsChooser, MostIdleSlotsChooser, RoundRobinChooser
from paddler.interfaces import ISlotChooser

from .helpers import healthy_upstream


def test_every_chooser_provides_the_interface():
    for name, make in CHOOSERS.items():
        chooser = make(Clock())
        assert verifyObject(ISlotChooser, chooser) and chooser.name == name
    assert sorted(CHOOSERS) == ["cache-aware", "cost", "least-connections", "round-robin", "slots"]


def test_most_idle_wins():
    a = healthy_upstream("http://a:1", total=4, processing=3)
    b = healthy_upstream("http://b:1", total=4, processing=1)
    assert MostIdleSlotsChooser().choose([a, b], None) is b


def test_ties_go_to_the_least_recently_chosen():
    a = healthy_upstream("http://a:1", total=2)
    b = healthy_upstream("http://b:1", total=2)
    a.last_chosen, b.last_chosen = 5, 3
    assert MostIdleSlotsChooser().choose([a, b], None) is b


def test_no_idle_slot_means_no_choice():
    a = healthy_upstream("http://a:1", total=2, processing=2)
    assert MostIdleSlotsChooser().choose([a], None) is None
    assert MostIdleSlotsChooser().choose([], None) is None


def test_round_robin_ignores_slots():
    a = healthy_upstream("http://a:1", total=1, processing=1)
    b = healthy_upstream("http://b:1", total=8)
    a.last_chosen, b.last_chosen = 1, 2
    assert RoundRobinChooser().choose([a, b], None) is a


def test_least_connections_counts_our_requests_only():
    a = healthy_upstream("http://a:1", total=1, processing=1)
    b = healthy_upstream("http://b:1", total=8)
    b.take_lease()
    assert LeastConnectionsChooser().choose([a, b], None) is a
