"""Reading small HTTP response bodies with a size bound and real cancellation."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import PotentialDataLoss, ResponseDone


class BodyTooLarge(Exception):
    """The body was larger than the caller allows."""


class _Collector(Protocol):
    transport: Any

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._chunks: list[bytes] = []
        self.done: Deferred[bytes] = Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(BodyTooLarge(f"body larger than {self._limit} bytes"))
            self._abort()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def read_body(response: Any, limit: int = 4 * 1024 * 1024) -> Deferred[bytes]:
    """The body of C{response}, at most C{limit} bytes; cancelling aborts the connection."""
    collector = _Collector(limit)
    response.deliverBody(collector)
    return collector.done
