"""The shared slot store on Redis: the Lua scripts of L{paddler.sharedstate.scripts}
run through L{paddler.sharedstate.client.RedisClient}, grant hints through
L{paddler.sharedstate.client.RedisSubscriber}."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from paddler.sharedstate.client import (
    LinkState,
    RedisAddress,
    RedisClient,
    RedisSubscriber,
    parse_state_url,
)
from paddler.sharedstate.errors import InvalidArgument
from paddler.interfaces import ISlotStore
from paddler.sharedstate.scripts import KEY_NAMES, SCRIPTS, key_names
from paddler.sharedstate.store import SlotStoreBase

_PREFIX = re.compile(r"[A-Za-z0-9_.:-]*\{[A-Za-z0-9_.:-]+\}[A-Za-z0-9_.:-]*")


@implementer(ISlotStore)
class RedisSlotStore(SlotStoreBase):
    """
    Shared slot state in one Redis (or one Cluster shard: every key shares
    the hash tag of C{prefix}). Start it as a service: it connects (and
    reconnects with backoff capped at C{max_backoff}), subscribes to this
    owner's grant channel and runs the renew, poll and reap loops.

    Every call has a deadline of C{timeout} seconds. While Redis is down,
    calls fail at once with L{paddler.sharedstate.errors.StoreUnavailable} and
    releases are kept for later; C{is_up} says which.
    """

    def __init__(
        self,
        reactor: Any,
        state: str | RedisAddress,
        owner: str,
        clock: IReactorTime | None = None,
        prefix: str = "{pd}",
        timeout: float = 0.25,
        connect_timeout: float = 2.0,
        max_backoff: float = 2.0,
        **kwargs: Any,
    ) -> None:
        clock = clock if clock is not None else reactor
        super().__init__(owner, clock, **kwargs)
        if not isinstance(prefix, str) or len(prefix) > 64 or not _PREFIX.fullmatch(prefix):
            raise InvalidArgument("prefix must hold exactly one hash tag, like '{pd}' (at most 64 characters)")
        address = parse_state_url(state) if isinstance(state, str) else state
        self.address = address
        self.prefix = prefix
        self.keys = key_names(prefix)
        self.channel_prefix = f"{prefix}:grant:"
        self.channel = self.channel_prefix + self.owner
        link = dict(clock=clock, connect_timeout=connect_timeout, command_timeout=timeout, max_backoff=max_backoff)
        self.client = RedisClient(reactor, address, scripts=SCRIPTS.values(), **link)
        self.subscriber = RedisSubscriber(reactor, address, **link)
        self.client.setServiceParent(self)
        self.subscriber.setServiceParent(self)
        self.client.subscribe_state(self._link_changed)
        self.subscriber.subscribe(self.channel, self._message)
        self.subscriber.on_connected(self._resubscribed)

    @property
    def is_up(self) -> bool:
        return self.client.is_up

    def _link_changed(self, state: LinkState) -> None:
        if state is LinkState.UP:
            self._state_changed(True)
        elif state is LinkState.DOWN:
            self._state_changed(False)

    def _resubscribed(self) -> None:
        # hints published while the pub/sub connection was away are lost: ask now
        if self.waiters and self.client.is_up:
            self._call_quietly(self.poll)

    def _run(self, name: str, args: Sequence[Any]) -> Deferred[Any]:
        return self.client.evalsha(SCRIPTS[name], self.keys, [self.channel_prefix, *args])

    def _get_mark(self) -> Deferred[Any]:
        return self.client.execute("GET", self.keys[KEY_NAMES.index("seq")])
