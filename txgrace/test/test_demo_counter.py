"""
The demo's line counter (C{demo/counter.py}) opts in to the handoff through
L{IHandoff}: unit tests of its state, then a real C{twist txgrace} whose
client keeps its TCP connection, and its count, across a restart.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from types import ModuleType
from typing import BinaryIO

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from txgrace.interfaces import IDrainable, IHandoff
from txgrace.test.test_install import _sourceTree
from txgrace.test.test_process import startServer
from txgrace.test.test_restart import restart
from txgrace.testing import ServerProcess, Serving, isAlive, waitUntil

APP = "demo.counter.factory"
HOST = "127.0.0.1"


def counterModule() -> ModuleType:
    """
    C{demo.counter}, imported from the source tree, or skip.
    """
    source = _sourceTree()
    if source not in sys.path:
        sys.path.append(source)
    try:
        from demo import counter
    except ImportError as e:
        raise SkipTest(f"demo.counter cannot be imported: {e}") from None
    return counter


class CounterTests(SynchronousTestCase):
    """
    L{demo.counter.Counter} carries its count and the part of a line that
    has arrived, and is busy while a slow answer is pending.
    """

    def setUp(self) -> None:
        self.module = counterModule()
        self.clock = Clock()

    def connect(self) -> tuple[object, StringTransport]:
        factory = self.module.CounterFactory(self.clock)
        protocol = factory.buildProtocol(IPv4Address("TCP", HOST, 1234))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def answers(self, transport: StringTransport) -> list[bytes]:
        lines = transport.value().splitlines()
        transport.clear()
        return [line.rsplit(b" from pid ", 1)[0] for line in lines]

    def test_provides(self) -> None:
        """
        The counter provides L{IHandoff} and L{IDrainable}.
        """
        protocol, _ = self.connect()
        self.assertTrue(IHandoff.providedBy(protocol))
        self.assertTrue(IDrainable.providedBy(protocol))

    def test_counts(self) -> None:
        """
        Each line is answered with its number; CRLF and LF both end a line.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"one\r\ntwo\nthr")
        self.assertEqual(self.answers(transport), [b"1: one", b"2: two"])
        protocol.dataReceived(b"ee\n")
        self.assertEqual(self.answers(transport), [b"3: three"])

    def test_state(self) -> None:
        """
        The state is the count and the part of a line that has arrived.
        """
        protocol, transport = self.connect()
        self.assertEqual(IHandoff(protocol).handoffState(), b"0 ")
        protocol.dataReceived(b"one\ntwo\nthr")
        self.assertEqual(IHandoff(protocol).handoffState(), b"2 thr")

    def test_resume(self) -> None:
        """
        A fresh counter resumed from a state goes on counting, and the
        partial line is completed by what arrives next.
        """
        protocol, transport = self.connect()
        protocol.resumeHandoff(b"2 thr")
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"ee\nfour\n")
        self.assertEqual(self.answers(transport), [b"3: three", b"4: four"])

    def test_busyWhileSlow(self) -> None:
        """
        While a slow answer is pending the counter is busy, and lines that
        arrive meanwhile wait for it; then it is at rest again.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"slow\nnext\npart")
        self.assertIsNone(IHandoff(protocol).handoffState())
        self.assertEqual(transport.value(), b"")
        self.clock.advance(self.module.SLOW_SECONDS)
        self.assertEqual(self.answers(transport), [b"1: slow", b"2: next"])
        self.assertEqual(IHandoff(protocol).handoffState(), b"2 part")

    def test_drain(self) -> None:
        """
        A drain says goodbye and closes, after a pending slow answer.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"slow\n")
        IDrainable(protocol).drain()
        self.assertFalse(transport.disconnecting)
        self.clock.advance(self.module.SLOW_SECONDS)
        self.assertEqual(
            [line.split(b" pid ")[0] for line in transport.value().splitlines()],
            [b"1: slow from", b"going away:"],
        )
        self.assertTrue(transport.disconnecting)

    def test_lineTooLong(self) -> None:
        """
        A line longer than C{MAX_LINE} ends the connection.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"x" * (self.module.MAX_LINE + 1))
        self.assertEqual(transport.value(), b"line too long\n")
        self.assertTrue(transport.disconnecting)


class CounterProcessTests(TestCase):
    """
    The counter under C{twist txgrace}: a client's connection moves to the
    successor at a restart, with its count and its partial line.
    """

    def start(self) -> tuple[ServerProcess, Serving]:
        return startServer(self, "--app", APP, cwd=_sourceTree())

    def connect(self, port: int) -> tuple[socket.socket, BinaryIO]:
        skt = socket.create_connection((HOST, port), timeout=15)
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.addCleanup(skt.close)
        return skt, skt.makefile("rb")

    def assertStillOpen(self, skt: socket.socket) -> None:
        """
        C{skt} has nothing to read and was not ended by the server: a
        closed connection would read as EOF (C{b""}), a reset would raise.
        """
        skt.setblocking(False)
        try:
            self.assertRaises(BlockingIOError, skt.recv, 1)
        finally:
            skt.setblocking(True)
            skt.settimeout(15)

    def test_countGoesOn(self) -> None:
        """
        Two lines and the start of a third, then a restart: the successor
        (a new pid) answers the rest of the third line with count 3 and the
        next with 4, on the same TCP connection, which the server never
        ended; the old process moved it rather than drained it, and exited.
        """
        server, serving = self.start()
        skt, reader = self.connect(serving.port())
        localPort = skt.getsockname()[1]
        skt.sendall(b"one\ntwo\n")
        self.assertEqual(
            [reader.readline(), reader.readline()],
            [b"1: one from pid %d\n" % serving.pid, b"2: two from pid %d\n" % serving.pid],
        )
        skt.sendall(b"thr")
        since = server.eventCount()
        successor = restart(server, serving)
        self.assertNotEqual(successor.pid, serving.pid)
        server.waitForMessage(r"handed off 1, aborted 0, failed 0", since=since)
        self.assertStillOpen(skt)
        skt.sendall(b"ee\nfour\n")
        self.assertEqual(
            [reader.readline(), reader.readline()],
            [
                b"3: three from pid %d\n" % successor.pid,
                b"4: four from pid %d\n" % successor.pid,
            ],
        )
        self.assertEqual(skt.getsockname()[1], localPort)
        self.assertStillOpen(skt)

    def test_slowAnswerFinishesFirst(self) -> None:
        """
        A connection waiting for slow answers when the successor becomes
        ready is busy: the old process writes them, then the connection
        moves, and the count goes on in the successor.
        """
        server, serving = self.start()
        skt, reader = self.connect(serving.port())
        skt.sendall(b"slow a\nslow b\nslow c\n")
        since = server.eventCount()
        server.signal(signal.SIGHUP, serving.pid)
        ready = server.waitForMessage(r"is ready; pid \d+ hands over", since=since)
        answers = [reader.readline() for _ in range(3)]
        answered = time.time()
        self.assertEqual(
            answers,
            [b"%d: slow %s from pid %d\n" % (n, c, serving.pid) for n, c in ((1, b"a"), (2, b"b"), (3, b"c"))],
        )
        # The successor was ready before the last slow answer was written.
        self.assertLess(ready["log_time"], answered)
        successor = server.waitServing(serving.generation + 1)
        self.assertTrue(waitUntil(lambda: not isAlive(serving.pid), 30))
        skt.sendall(b"d\n")
        self.assertEqual(reader.readline(), b"4: d from pid %d\n" % successor.pid)
        self.assertStillOpen(skt)
