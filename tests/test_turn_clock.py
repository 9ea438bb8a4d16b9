"""TurnClock: the reactor's time read once per reactor turn where the reactor has callBeforePoll, else exact."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from zope.interface import implementer

from paddler.balancer.relay import Relay, RelayedHead, UpstreamIdleTimeout
from paddler.interfaces import IReactorBeforePoll
from paddler.turn_clock import TurnClock


@implementer(IReactorBeforePoll)
class TurnReactor(Clock):
    """A Clock with the lean reactor's before-poll hook; C{end_turn()} runs what was added, as before a wait."""

    def __init__(self) -> None:
        super().__init__()
        self.before_poll: list[Any] = []
        self.reads = 0

    def seconds(self) -> float:
        self.reads += 1
        return super().seconds()

    def callBeforePoll(self, f: Any) -> None:
        self.before_poll.append(f)

    def end_turn(self) -> None:
        calls, self.before_poll = self.before_poll, []
        for f in calls:
            f()


def test_the_time_is_read_once_per_turn_and_refreshed_after_it():
    """Within a turn every call returns the time read first (one read, one before-poll callable); after the
    turn ends the next call reads the clock again, so the value is never ahead and at most a turn behind."""
    reactor = TurnReactor()
    reactor.advance(10)
    clock = TurnClock(reactor)
    assert [clock.seconds() for _ in range(5)] == [10.0] * 5
    assert reactor.reads == 1 and len(reactor.before_poll) == 1
    reactor.advance(0.5)
    assert clock.seconds() == 10.0  # still this turn
    reactor.end_turn()
    assert clock.seconds() == 10.5 and reactor.reads == 2
    reactor.end_turn()
    reactor.end_turn()
    assert reactor.before_poll == []  # nothing asked for the time: nothing scheduled


def test_a_reactor_without_the_hook_gives_its_own_exact_time():
    """Twisted's reactors and task.Clock have no callBeforePoll: seconds() is theirs, uncached."""
    reactor = Clock()
    clock = TurnClock(reactor)
    reactor.advance(3)
    assert clock.seconds() == 3.0
    reactor.advance(0.25)
    assert clock.seconds() == 3.25


class Body:
    framing = "chunked"

    def __init__(self) -> None:
        self.consumer: Any = None
        self.aborted = False

    def deliver(self, consumer: Any, raw: bool = False) -> None:
        self.consumer = consumer

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def tail(self) -> bytes:
        return b""


class Request:
    """Just what the relay touches of a request (decoded path: every piece through write)."""

    def __init__(self) -> None:
        self.producer: Any = None
        self.channel = None
        self.written: list[bytes] = []
        self.responseHeaders = type("H", (), {"setRawHeaders": lambda *a: None})()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def setResponseCode(self, code: int, phrase: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_the_idle_deadline_moves_with_each_turns_pieces_and_still_fires():
    """With the turn clock the idle deadline follows the pieces (a stream that keeps talking is not cut) and
    a silent one is cut once the idle timeout passed since the turn of its last piece."""
    reactor = TurnReactor()
    turn = TurnClock(reactor)
    body = Body()
    relay = Relay(Request(), reactor, 10.0, RelayedHead(200, b"OK", []), activity_clock=turn.seconds)  # type: ignore[arg-type]
    failures: list[Any] = []
    relay.done.addErrback(failures.append)
    relay.start(body)
    for _ in range(5):  # a piece every 6 s for 30 s: never idle for 10 s
        reactor.advance(6)
        body.consumer.body_data(b"x")
        reactor.end_turn()
    assert failures == [] and not body.aborted
    reactor.advance(9.9)
    assert failures == []
    reactor.advance(0.2)
    assert len(failures) == 1 and failures[0].check(UpstreamIdleTimeout) and body.aborted
