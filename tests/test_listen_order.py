"""The proxy port is bound last: a balancer (or a worker of ``--workers``) that cannot start never
takes client connections it would then drop."""

from __future__ import annotations

import socket

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock

from paddler.config import BalancerConfig
from paddler.tap import makeBalancerService
from paddler.server.listeners import ListenFailed


class BusyPort(MemoryReactorClock):
    """A memory reactor on which one TCP port is taken by someone else."""

    def __init__(self, busy: int) -> None:
        super().__init__()
        self.busy = busy

    def listenTCP(self, port, factory, backlog=50, interface=""):  # type: ignore[no-untyped-def]
        if port == self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("worker_index", [0, 1, 2])
def test_a_management_port_that_is_taken_stops_the_start_before_the_proxy_port_is_bound(worker_index):
    """
    Worker i serves the management API on the management port + i. A worker
    whose management port is taken exits, and its supervisor starts it again;
    had it bound the shared proxy port (SO_REUSEPORT) first, the kernel would
    have queued client connections on it and reset them when it exited (a
    benchmark lost 16-104 of 512 streams that way).
    """
    management = 20000
    reactor = BusyPort(busy=management + worker_index)
    config = BalancerConfig(
        listen=f"tcp:{free_port()}:interface=127.0.0.1",
        management_listen=f"tcp:{management}:interface=127.0.0.1",
        **({"workers": 3, "worker_index": worker_index, "state": "redis://127.0.0.1:1/0"} if worker_index else {}),
    )
    top = makeBalancerService(config, reactor)
    with pytest.raises(ListenFailed, match="paddler management cannot listen"):
        top.privilegedStartService()
    assert reactor.tcpServers == [] and reactor.adoptedPorts == []


def test_both_ports_are_bound_when_both_are_free():
    reactor = MemoryReactorClock()
    proxy, management = free_port(), free_port()
    top = makeBalancerService(
        BalancerConfig(listen=f"tcp:{proxy}:interface=127.0.0.1", management_listen=f"tcp:{management}:interface=127.0.0.1"),
        reactor,
    )
    top.privilegedStartService()
    assert [port for port, *_ in reactor.tcpServers] == [management, proxy]
