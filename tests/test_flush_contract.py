"""Every behaviour of Twisted that paddler/flush.py relies on, one test each, on the installed Twisted.

The flush replaces C{startWriting} on a transport and calls its
C{doWrite()} itself; if an upgrade of Twisted changes where bytes wait,
how writing is toggled or how closing is flagged, one of these fails
instead of streams being corrupted.
"""

from __future__ import annotations

import socket
from typing import Any

import twisted
from twisted.internet import abstract, ssl, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from paddler import flush

from .driven_reactor import Driven, Recorder, drain


def connected_pair() -> tuple[Driven, socket.socket, Recorder]:
    driven = Driven(EPollReactor)
    port, built = driven.listen(Recorder)
    sock, server = driven.accept(port, built)
    return driven, sock, server  # type: ignore[return-value]


def test_the_installed_twisted_is_within_the_tested_range():
    """An upgrade past the range fails here first: re-run these tests on it, then widen TESTED_TWISTED."""
    assert flush.twisted_tested(twisted.__version__), twisted.__version__
    assert flush.SUPPORTED


def test_accepted_and_connected_tcp_transports_are_exactly_tcp_server_and_tcp_client_with_their_reactor():
    driven, sock, server = connected_pair()
    try:
        assert type(server.transport) is tcp.Server and server.transport.reactor is driven.reactor
        assert tcp.Client in flush.PLAIN_TCP and issubclass(tcp.Client, abstract.FileDescriptor)
        assert tcp.Server.doWrite is abstract.FileDescriptor.doWrite  # no transport-specific doWrite
        assert tcp.Client.doWrite is abstract.FileDescriptor.doWrite
    finally:
        driven.close()


def test_write_and_write_sequence_queue_in_temp_buffer_then_call_start_writing_looked_up_on_the_instance():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        calls: list[int] = []
        t.startWriting = lambda: calls.append(t._tempDataLen)
        t.write(b"abc")
        t.writeSequence([b"de", b"f"])
        assert t._tempDataBuffer == [b"abc", b"de", b"f"] and t._tempDataLen == 6
        assert calls == [3, 6] and t.dataBuffer == b"" and t.offset == 0
    finally:
        driven.close()


def test_start_writing_is_add_writer_and_stop_writing_is_remove_writer():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        abstract.FileDescriptor.startWriting(t)
        assert t in driven.reactor.getWriters()
        t.stopWriting()
        assert t not in driven.reactor.getWriters()
        t.stopWriting()  # removing a writer that is not registered is harmless
    finally:
        driven.close()


def test_do_write_sends_the_buffer_at_once_stops_writing_and_resumes_a_paused_streaming_producer():
    @implementer(IPushProducer)
    class P:
        resumed = 0

        def resumeProducing(self) -> None:
            self.resumed += 1

        def pauseProducing(self) -> None:
            pass

        def stopProducing(self) -> None:
            pass

    driven, sock, server = connected_pair()
    try:
        t = server.transport
        producer = P()
        t.registerProducer(producer, True)
        t.startWriting = lambda: None
        t.write(b"x" * (t.bufferSize + 1))  # a full buffer pauses the producer
        assert t.producerPaused
        stopped: list[bool] = []
        t.stopWriting = lambda: stopped.append(True)
        assert t.doWrite() is None
        assert t._tempDataLen == 0 and t.dataBuffer == b"" and t.offset == 0
        assert stopped == [True] and producer.resumed == 1 and not t.producerPaused
    finally:
        driven.close()


def test_do_write_resumes_a_pull_producer_when_the_buffer_empties_and_sends_on_the_transports_socket():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        resumed: list[bool] = []

        class Pull:
            def resumeProducing(self) -> None:
                resumed.append(True)

            def stopProducing(self) -> None:
                pass

        t.startWriting = lambda: None
        t.registerProducer(Pull(), False)
        assert t.producer is not None and t.streamingProducer is False
        assert resumed == [True]  # registering a pull producer resumes it once, at once
        del resumed[:]
        t.write(b"abc")
        sent: list[bytes] = []
        real = t.socket

        class Recording:
            def send(self, data: Any) -> int:
                sent.append(bytes(data))
                return real.send(data)

        t.socket = Recording()
        assert t.doWrite() is None and resumed == [True] and sent == [b"abc"]
        t.socket = real
    finally:
        driven.close()


def test_a_partial_send_leaves_the_remainder_in_data_buffer_from_offset():
    driven = Driven(EPollReactor)
    try:
        port, built = driven.listen(Recorder)
        sock, server = driven.accept(port, built, rcvbuf=4096)
        t = server.transport
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        t.startWriting = lambda: None
        data = bytes(range(256)) * 2048  # 512 KiB: more than the socket buffers take
        t.write(data)
        assert t.doWrite() is None
        assert 0 < t.offset < len(t.dataBuffer) and t._tempDataLen == 0
        assert bytes(t.dataBuffer) == data
    finally:
        driven.close()


def test_a_failed_send_returns_connection_lost_and_keeps_the_buffer():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        t.startWriting = lambda: None
        t.write(b"abc")
        t.socket.shutdown(socket.SHUT_WR)  # every send now fails with EPIPE
        why = t.doWrite()
        assert isinstance(why, ConnectionLost)
        assert t.offset == 0 and bytes(t.dataBuffer) == b"abc"
    finally:
        driven.close()


def test_lose_connection_calls_start_writing_then_flags_disconnecting():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        seen: list[int] = []
        t.startWriting = lambda: seen.append(t.disconnecting)
        t.write(b"a")
        t.loseConnection()
        assert seen == [0, 0] and t.disconnecting
    finally:
        driven.close()


def test_lose_write_connection_flags_write_disconnecting_then_calls_start_writing():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        seen: list[bool] = []
        t.startWriting = lambda: seen.append(t._writeDisconnecting)
        t.loseWriteConnection()
        assert seen == [True]
    finally:
        driven.close()


def test_abort_connection_flags_aborting():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        assert t._aborting is False
        t.abortConnection()
        assert t._aborting is True and t.connected
    finally:
        driven.close()


def test_tls_is_false_on_plain_tcp_and_true_after_start_tls():
    driven, sock, server = connected_pair()
    try:
        t = server.transport
        assert t.TLS is False
        t.startTLS(ssl.CertificateOptions())
        assert t.TLS is True
    finally:
        driven.close()


def test_the_reactors_disconnect_selectable_loses_the_connection_with_the_reason():
    driven, sock, server = connected_pair()
    try:
        driven.reactor._disconnectSelectable(server.transport, RuntimeError("boom"), False)
        assert isinstance(server.lost, Failure) and server.lost.check(RuntimeError)
        got = bytearray()
        driven.until(lambda: not drain(sock, got), what="closed")
    finally:
        driven.close()


def test_a_hooked_transport_sees_writes_through_the_flusher(monkeypatch: Any):
    """The hook itself: the instance's startWriting is the flusher's."""
    driven, sock, server = connected_pair()
    try:
        flusher = flush.enable(driven.reactor)
        assert flush.hook(server.transport)
        server.transport.write(b"z")
        assert server.transport in flusher._dirty
        flusher.flush()
        got = bytearray()
        driven.until(lambda: (drain(sock, got), got == b"z")[1], what="z")
    finally:
        flush.disable(driven.reactor)
        driven.close()
