"""
Connections move instead of closing (L{txgrace.handoff}): unit tests of the
HTTP/1.1 adapter and of the drain's moves on a fake channel, then real
processes on loopback, where a client connected across a restart keeps its
TCP connection and is answered by the successor.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from base64 import b64encode
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from txgrace.drain import FLUSH_POLL_SECONDS, IDLE_GRACE_SECONDS, DrainResult
from txgrace.handoff import HandoffReceiver, HTTPChannelHandoff, flushed, handoffFor
from txgrace.interfaces import IHandoff
from txgrace.test.test_drain import (
    REQUEST,
    DeferredResource,
    DrainTestsMixin,
    parseResponses,
)
from txgrace.test.test_process import startServer
from txgrace.test.test_restart import restart
from txgrace.testing import (
    HTTPLoad,
    PacedClient,
    ServerProcess,
    Serving,
    _Reader,
    _readResponse,
    isAlive,
    slowRequest,
    waitUntil,
    writeSelfSignedCertificate,
)

HOST = "127.0.0.1"


class HTTPChannelHandoffTests(DrainTestsMixin, SynchronousTestCase):
    """
    Twisted's HTTP/1.1 channel moves between requests, with the part of the
    next request line that has arrived.
    """

    def test_adapted(self) -> None:
        """
        An HTTP/1.1 channel adapts to L{IHandoff}.
        """
        connection, channel, transport = self.httpConnection()
        self.assertIsInstance(IHandoff(channel), HTTPChannelHandoff)

    def test_idle(self) -> None:
        """
        A channel between requests moves with no state.
        """
        connection, channel, transport = self.httpConnection()
        self.assertEqual(IHandoff(channel).handoffState(), b"")
        channel.dataReceived(REQUEST)
        self.assertEqual(IHandoff(channel).handoffState(), b"")

    def test_partialRequestLine(self) -> None:
        """
        The start of a request line moves with the channel.
        """
        connection, channel, transport = self.httpConnection()
        channel.dataReceived(b"GET / HT")
        self.assertEqual(IHandoff(channel).handoffState(), b"GET / HT")

    def test_busy(self) -> None:
        """
        A channel with a request in flight, or headers still arriving, does
        not move.
        """
        resource = DeferredResource()
        connection, channel, transport = self.httpConnection(resource)
        channel.dataReceived(REQUEST[:20])
        self.assertIsNone(IHandoff(channel).handoffState())
        channel.dataReceived(REQUEST[20:])
        self.assertIsNone(IHandoff(channel).handoffState())
        [request] = resource.requests
        request.finish()
        self.assertEqual(IHandoff(channel).handoffState(), b"")

    def test_closing(self) -> None:
        """
        A channel that closes after its response (HTTP/1.0, or
        C{Connection: close}) never moves.
        """
        connection, channel, transport = self.httpConnection(DeferredResource())
        channel.dataReceived(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertIsNone(IHandoff(channel).handoffState())

    def test_resume(self) -> None:
        """
        The state given to a fresh channel is parsed as if it had arrived on
        its connection.
        """
        connection, channel, transport = self.httpConnection()
        IHandoff(channel).resumeHandoff(REQUEST[:10])
        channel.dataReceived(REQUEST[10:])
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(body, b"ok")

    def test_unwrittenResponse(self) -> None:
        """
        A connection whose last response is not all in the kernel is not
        flushed: it moves only once it is.
        """
        connection, channel, transport = self.httpConnection()
        import txgrace.handoff as handoffModule

        self.patch(handoffModule, "pendingWriteBytes", lambda transport: 10)
        self.assertFalse(flushed(connection))
        self.patch(handoffModule, "pendingWriteBytes", lambda transport: 0)
        self.assertTrue(flushed(connection))


class FakePort:
    key = "tcp/*/8080"


class FakeSender:
    """
    Stands in for L{txgrace.handoff.HandoffSender}: records the moves; the
    test answers them.
    """

    handoffFor = staticmethod(handoffFor)

    def __init__(self) -> None:
        self.moves: list[tuple[Any, bytes, Deferred[bool]]] = []
        self.handedOff = 0
        self._moving: set[Any] = set()

    def readyToMove(self, connection: Any, handoff: Any) -> bytes | None:
        return handoff.handoffState()

    flushedNow = True

    def flushed(self, connection: Any) -> bool:
        return self.flushedNow

    def moving(self, connection: Any) -> bool:
        return connection in self._moving

    def move(self, connection: Any, state: bytes) -> Deferred[bool]:
        done: Deferred[bool] = Deferred()
        self.moves.append((connection, state, done))
        self._moving.add(connection)
        return done

    def answer(self, index: int, took: bool) -> None:
        connection, state, done = self.moves[index]
        self._moving.discard(connection)
        if took:
            self.handedOff += 1
            connection.close()
        done.callback(took)


class DrainMovesTests(DrainTestsMixin, SynchronousTestCase):
    """
    A drain with a successor that takes connections moves each one once it
    is between requests, and drains those it does not take.
    """

    def connection(self, resource: Any = None) -> tuple[Any, Any, Any]:
        connection, channel, transport = self.httpConnection(resource)
        connection.server = FakePort()
        return connection, channel, transport

    def test_idleMovesNextTurn(self) -> None:
        """
        An idle connection moves on the next reactor turn (after C{GO}), and
        the drain counts it.
        """
        sender = FakeSender()
        connection, channel, transport = self.connection()
        d = self.drain(60, handoff=sender).start()
        self.assertEqual(sender.moves, [])
        self.clock.advance(0)
        [(moved, state, _)] = sender.moves
        self.assertIs(moved, connection)
        self.assertEqual(state, b"")
        sender.answer(0, True)
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 0.0, 0, 1))

    def test_inFlightFinishesThenMoves(self) -> None:
        """
        A request in flight is answered here without C{Connection: close};
        the connection then moves.
        """
        sender = FakeSender()
        resource = DeferredResource()
        connection, channel, transport = self.connection(resource)
        channel.dataReceived(REQUEST)
        self.drain(60, handoff=sender).start()
        self.clock.advance(1)
        self.assertEqual(sender.moves, [])
        [request] = resource.requests
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertNotIn(b"connection", headers)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(len(sender.moves), 1)

    def test_movesTheMomentItComesToRest(self) -> None:
        """
        A connection whose request finishes during the drain is offered the
        moment it comes to rest, not at the next look on a timer: a client
        that sends its next request as soon as a response arrives leaves
        it at rest only that long.
        """
        sender = FakeSender()
        resource = DeferredResource()
        connection, channel, transport = self.connection(resource)
        channel.dataReceived(REQUEST)
        self.drain(60, handoff=sender).start()
        self.clock.advance(0)
        self.assertEqual(sender.moves, [])
        [request] = resource.requests
        request.finish()
        self.assertEqual(len(sender.moves), 1)
        # The timer's look afterwards does not offer it twice.
        self.clock.advance(5)
        self.assertEqual(len(sender.moves), 1)

    def test_heldUntilFlushed(self) -> None:
        """
        At rest but with its last response not all in the kernel, a
        connection stops reading at once and moves once the response is
        out; a drain given up meanwhile reads it again.
        """
        sender = FakeSender()
        sender.flushedNow = False
        connection, channel, transport = self.connection()
        reading: list[bool] = []
        connection.stopReading = lambda: reading.append(False)  # type: ignore[attr-defined]
        connection.startReading = lambda: reading.append(True)  # type: ignore[attr-defined]
        drain = self.drain(60, handoff=sender)
        drain.start()
        self.clock.advance(0)
        self.assertEqual((sender.moves, reading), ([], [False]))
        sender.flushedNow = True
        self.clock.advance(FLUSH_POLL_SECONDS)
        self.assertEqual(len(sender.moves), 1)

        other, _, _ = self.connection()
        other.stopReading = lambda: reading.append(False)  # type: ignore[attr-defined]
        other.startReading = lambda: reading.append(True)  # type: ignore[attr-defined]
        sender.flushedNow = False
        reading.clear()
        drain = self.drain(60, handoff=FakeSender())
        drain._handoff.flushedNow = False
        drain.start()
        self.clock.advance(0)
        drain.abandon()
        self.assertIn(True, reading)

    def test_refusedIsDrained(self) -> None:
        """
        A connection the successor does not take is drained here: closed
        after the idle grace.
        """
        sender = FakeSender()
        connection, channel, transport = self.connection()
        d = self.drain(60, handoff=sender).start()
        self.clock.advance(0)
        sender.answer(0, False)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(IDLE_GRACE_SECONDS)
        self.assertTrue(transport.disconnecting)
        self.settle()
        self.assertEqual(self.successResultOf(d).handedOff, 0)

    def test_hammerSparesConnectionsInTransit(self) -> None:
        """
        The hammer does not abort a connection the successor may already
        own; it aborts the others.
        """
        sender = FakeSender()
        moving, _, _ = self.connection()
        busy, busyChannel, _ = self.connection(DeferredResource())
        busyChannel.dataReceived(REQUEST)
        self.drain(5, handoff=sender).start()
        self.clock.advance(0)
        self.assertEqual([m[0] for m in sender.moves], [moving])
        self.clock.advance(5)
        self.assertFalse(moving.aborted)
        self.assertTrue(busy.aborted)

    def test_tlsDoesNotMove(self) -> None:
        """
        A TLS connection is not offered to the successor.
        """
        from twisted.internet.ssl import CertificateOptions
        from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

        connection, channel, transport = self.connection()
        plain = connection.protocol
        connection.protocol = TLSMemoryBIOProtocol(
            TLSMemoryBIOFactory(CertificateOptions(), False, None), plain
        )
        self.assertIsNone(handoffFor(connection))
        connection.protocol = plain
        self.assertIsNotNone(handoffFor(connection))


def sendRequest(skt: socket.socket, data: bytes) -> tuple[int, bytes, bool]:
    """
    Send C{data} on C{skt} and read one response.
    """
    skt.sendall(data)
    return _readResponse(skt, True)


def pidOf(body: bytes) -> int:
    return int(body.split(b"pid ")[1].split()[0].rstrip(b"."))


class HandoffProcessTests(TestCase):
    """
    Real processes: connections between requests move to the successor.
    """

    def test_clientsAcrossRestarts(self) -> None:
        """
        Over 20 restarts under load: keep-alive clients sending every 0.3,
        1.1 and 2.0 s keep the same local port and see no EOF; a client that
        connected before the trigger and sends its first request 1.5 s
        later, or after the old process exited, is answered; no request of
        the load fails and no keep-alive connection is closed by the
        server; every generation serves.
        """
        server, serving = startServer(self)
        port = serving.port()
        paced = [PacedClient(HOST, port, interval).start() for interval in (0.3, 1.1, 2.0)]
        load = HTTPLoad(HOST, port, clients=4).start()
        early: list[PacedClient] = []
        late: list[PacedClient] = []
        pids = [serving.pid]
        try:
            for _ in range(20):
                early.append(
                    PacedClient(HOST, port, interval=1, firstAfter=1.5, count=1).start()
                )
                lateClient = PacedClient(HOST, port, interval=1, firstAfter=0, count=1)
                late.append(lateClient)
                serving = restart(server, serving)
                pids.append(serving.pid)
                lateClient.start()
            for client in early + late:
                self.assertTrue(client.wait(30))
        finally:
            result = load.stop()
            for client in paced + early + late:
                client.stop()
        for client in paced:
            self.assertEqual(client.failures, [])
            self.assertEqual(len(client.localPorts), 1)
            self.assertEqual(client.closes, 0)
        self.assertEqual([c.failures for c in early + late], [[]] * 40)
        self.assertEqual([len(c.pids) for c in early + late], [1] * 40)
        self.assertEqual([c.closes for c in early + late], [0] * 40)
        # The late ones came after their old process had exited.
        self.assertEqual([c.pids[0] for c in late], pids[1:])
        self.assertEqual(result.failed, 0, result.failures)
        self.assertEqual(result.closedByServer, 0)
        served = set(result.pids)
        for client in paced + early + late:
            served.update(client.pids)
        self.assertEqual(set(pids) - served, set())

    def test_edges(self) -> None:
        """
        Across one restart: a request line half sent before the handover is
        answered by the successor; a request body in progress finishes in
        the old process, then the connection moves; three pipelined requests
        are all answered; a request sent right after a streamed response
        ended is answered.  None of these connections is closed.
        """
        server, serving = startServer(self)
        port = serving.port()

        def connect() -> socket.socket:
            skt = socket.create_connection((HOST, port), timeout=15)
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.addCleanup(skt.close)
            return skt

        partial, body, pipelined, streamed = connect(), connect(), connect(), connect()
        partial.sendall(b"GET / HT")
        body.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        pipelined.sendall(
            b"GET /sleep?duration=1.5 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        streamed.sendall(b"GET /stream?duration=2 HTTP/1.1\r\nHost: x\r\n\r\n")
        server.waitForMessage("sleeping 1.5")
        server.waitForMessage("streaming 2")
        since = server.eventCount()
        server.signal(signal.SIGHUP, serving.pid)
        server.waitForMessage(r"is ready; pid \d+ hands over", since=since)
        successor = server.waitServing(serving.generation + 1)

        body.sendall(b"67890")
        status, text, close = _readResponse(body, True)
        self.assertEqual((status, text, close), (200, f"got 10 bytes from pid {serving.pid}\n".encode(), False))

        reader = _Reader(pipelined)
        answers = [_readResponse(pipelined, True, reader) for _ in range(3)]
        self.assertEqual([a[0] for a in answers], [200] * 3)
        self.assertEqual([a[2] for a in answers], [False] * 3)
        self.assertEqual({pidOf(a[1]) for a in answers}, {serving.pid})

        status, text, close = _readResponse(streamed, True)
        self.assertEqual((status, close), (200, False))
        self.assertTrue(text.endswith(f"streamed from pid {serving.pid}\n".encode()))

        self.assertTrue(waitUntil(lambda: not isAlive(serving.pid), 30))
        report = server.waitForMessage("Restart report", since=since)
        self.assertEqual(
            (report["oldPid"], report["successor"], report["handedOff"], report["drained"]),
            (serving.pid, successor.pid, 4, 0),
        )
        # The body, the sleep (the pipelined ones behind it are not parsed
        # yet) and the stream.
        self.assertEqual(report["requestsInFlight"], 3)
        self.assertIsInstance(report["listenDropped"], int)
        partial.sendall(b"TP/1.1\r\nHost: x\r\n\r\n")
        for skt in (partial, body, pipelined, streamed):
            if skt is not partial:
                skt.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, text, close = _readResponse(skt, True)
            self.assertEqual((status, text, close), (200, f"hello from pid {successor.pid}\n".encode(), False))
        self.assertEqual(server.waitFirst(), 0)

    def test_backToBackPipelinedClient(self) -> None:
        """
        A client that sends 3 pipelined requests the moment the last
        response arrives, over and over, leaves its connection at rest only
        a moment each time: it moves then, promptly (the old process exits
        well before the hammer), with no failed request, on one connection.
        """
        import threading

        server, serving = startServer(self)
        skt = socket.create_connection((HOST, serving.port()), timeout=15)
        self.addCleanup(skt.close)
        reader = _Reader(skt)
        stop = threading.Event()
        answers: list[tuple[int, bytes, bool]] = []
        errors: list[BaseException] = []
        # Busy most of the time (a slow first request), at rest only
        # between the last response and the next batch.
        batch = (
            b"GET /sleep?duration=0.3 HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2
        )

        def loop() -> None:
            try:
                for _ in range(100_000):
                    if stop.is_set():
                        return
                    skt.sendall(batch)
                    for _ in range(3):
                        answers.append(_readResponse(skt, True, reader))
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.addCleanup(stop.set)
        self.assertTrue(waitUntil(lambda: len(answers) > 6, 15))
        successor = restart(server, serving, timeout=20)
        count = len(answers)
        self.assertTrue(waitUntil(lambda: len(answers) > count + 6, 15))
        stop.set()
        thread.join(15)
        self.assertEqual(errors, [])
        self.assertEqual({a[0] for a in answers}, {200})
        self.assertEqual({a[2] for a in answers}, {False})
        self.assertEqual(pidOf(answers[-1][1]), successor.pid)
        self.assertEqual(pidOf(answers[0][1]), serving.pid)

    def test_finalStopKeepsIdleConnections(self) -> None:
        """
        SIGTERM with 50 accepted idle connections, each sending its first
        request 1.5 s later: every one is answered, with C{Connection:
        close}, and the process exits 0.
        """
        server, serving = startServer(self)
        baseline = self.sockets(serving.pid)
        clients = [
            PacedClient(HOST, serving.port(), interval=1, firstAfter=1.5, count=1)
            for _ in range(50)
        ]
        # Accepted: the server has them before the signal.
        self.assertTrue(
            waitUntil(lambda: self.sockets(serving.pid) >= baseline + 50, 15)
        )
        server.signal(signal.SIGTERM)
        for client in clients:
            client.start()
        for client in clients:
            self.assertTrue(client.wait(30))
            client.stop()
        self.assertEqual([c.failures for c in clients], [[]] * 50)
        self.assertEqual([c.pids for c in clients], [[serving.pid]] * 50)
        self.assertEqual([c.closes for c in clients], [1] * 50)
        self.assertEqual(server.waitFirst(), 0)

    def sockets(self, pid: int) -> int:
        """
        How many sockets pid C{pid} holds open.
        """
        count = 0
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:"):
                count += 1
        return count

    def test_tlsFallsBackToTheDrain(self) -> None:
        """
        TLS connections cannot move: a client that connected before the
        trigger and sends at +1.5 s, and a keep-alive client sending every
        1.1 s, are answered through the drain, none fails.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        key, cert = writeSelfSignedCertificate(directory)
        server, serving = startServer(
            self,
            "--endpoint",
            f"grace:ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        port = serving.port()
        keepAlive = PacedClient(HOST, port, interval=1.1, context=context).start()
        early = PacedClient(HOST, port, interval=1, firstAfter=1.5, count=1, context=context).start()
        since = server.eventCount()
        serving = restart(server, serving)
        self.assertTrue(early.wait(30))
        time.sleep(2.5)
        keepAlive.stop()
        early.stop()
        self.assertEqual(early.failures, [])
        self.assertEqual(len(early.pids), 1)
        self.assertEqual(keepAlive.failures, [])
        self.assertIn(serving.pid, keepAlive.pids)
        server.waitForMessage(r"handed off 0, aborted 0", since=since)

    def test_noHandoff(self) -> None:
        """
        With C{--no-handoff}, idle connections are drained, not moved: the
        keep-alive client is told C{Connection: close} and reconnects, with
        no failed request.
        """
        server, serving = startServer(self, "--no-handoff")
        keepAlive = PacedClient(HOST, serving.port(), interval=0.3).start()
        since = server.eventCount()
        serving = restart(server, serving)
        time.sleep(1)
        keepAlive.stop()
        self.assertEqual(keepAlive.failures, [])
        self.assertEqual(keepAlive.closes, 1)
        self.assertEqual(len(keepAlive.localPorts), 2)
        self.assertEqual(keepAlive.pids[-1], serving.pid)
        server.waitForMessage(r"handed off 0, aborted 0", since=since)

    def faultyServer(self, fault: str) -> tuple[ServerProcess, Serving, str]:
        """
        A server whose successors misbehave as C{fault} says (see
        L{txgrace.test._apps}) once the returned file exists.
        """
        faultFile = os.path.abspath(self.mktemp())
        env = dict(os.environ, TXGRACE_TEST_FAULT=faultFile)
        server, serving = startServer(self, env=env)
        with open(faultFile, "w") as f:
            f.write(fault)
        return server, serving, faultFile

    def test_olderSuccessor(self) -> None:
        """
        A successor that does not take connections (an older txgrace) is
        detected in the handshake: the old process drains as before, with
        no failed request.
        """
        server, serving, _ = self.faultyServer("no-handoff")
        keepAlive = PacedClient(HOST, serving.port(), interval=0.3).start()
        since = server.eventCount()
        serving = restart(server, serving)
        time.sleep(1)
        keepAlive.stop()
        self.assertEqual(keepAlive.failures, [])
        self.assertEqual(keepAlive.pids[-1], serving.pid)
        server.waitForMessage(r"handed off 0, aborted 0", since=since)

    def test_successorDiesMidPass(self) -> None:
        """
        A successor killed in the middle of a pass of 40 connections: each
        connection is either still served by the old process, or was the
        dead successor's and ends at once (as in any crash); none is left
        with nobody reading it.  The old process serves again.
        """
        server, serving, _ = self.faultyServer("die-mid-handoff")
        oldPid = serving.pid
        clients = [
            PacedClient(HOST, serving.port(), interval=1, firstAfter=0, count=1, timeout=10)
            for _ in range(40)
        ]
        since = server.eventCount()
        server.signal(signal.SIGHUP, oldPid)
        server.waitForMessage(r"serves again", since=since)
        for client in clients:
            client.start()
        for client in clients:
            self.assertTrue(client.wait(30))
            client.stop()
        answered = [c for c in clients if c.pids == [oldPid]]
        ended = [c for c in clients if c.failures]
        self.assertEqual((len(answered), len(ended)), (35, 5))
        self.assertNotIn("timeout", [f for c in ended for f in c.failures])
        self.assertTrue(isAlive(oldPid))
        self.assertEqual(
            slowRequest(HOST, serving.port(), "/", timeout=15),
            (200, f"hello from pid {oldPid}\n".encode()),
        )


class ReceiverTests(SynchronousTestCase):
    """
    L{HandoffReceiver} refuses what it cannot serve, and closes its copy of
    the descriptor (never the connection: the sender still holds it).
    """

    def setUp(self) -> None:
        from txgrace.adopt import SocketRegistry

        self.registry = SocketRegistry(inherit=lambda: [])
        self.receiver = HandoffReceiver(self.registry)
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)

    def send(self, line: bytes) -> tuple[bytes, int]:
        fd = os.dup(self.theirs.fileno())
        self.receiver.descriptorReceived(fd)
        return self.receiver.connectionReceived(line), fd

    def assertClosed(self, fd: int) -> None:
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_noSuchPort(self) -> None:
        answer, fd = self.send(b"CONN 3 - " + b64encode(b"tcp/*/1"))
        self.assertEqual(answer, b"REFUSED 3 no port 'tcp/*/1' here")
        self.assertClosed(fd)
        # The connection itself lives on.
        self.theirs.sendall(b"x")
        self.assertEqual(self.ours.recv(1), b"x")

    def test_notServing(self) -> None:
        self.registry.accepting = False
        answer, fd = self.send(b"CONN 4 - " + b64encode(b"tcp/*/1"))
        self.assertEqual(answer, b"REFUSED 4 this process no longer serves")
        self.assertClosed(fd)

    def test_malformed(self) -> None:
        answer, fd = self.send(b"CONN 5 !!! ???")
        self.assertEqual(answer, b"REFUSED 5 malformed")
        self.assertClosed(fd)

    def test_noDescriptor(self) -> None:
        self.assertEqual(
            self.receiver.connectionReceived(b"CONN 6 - -"),
            b"REFUSED 6 no descriptor came with it",
        )
        self.assertEqual(self.receiver.resumed, 0)


@implementer(IHandoff)
class _ResumeRaises(Protocol):
    def handoffState(self) -> bytes | None:
        return b""

    def resumeHandoff(self, state: bytes) -> None:
        raise RuntimeError("cannot resume")


class ReceiverServesTests(TestCase):
    """
    L{HandoffReceiver} with a real port on the reactor.
    """

    async def test_resumeRaises(self) -> None:
        """
        An application protocol whose C{resumeHandoff} raises: the
        connection is refused, so the old process keeps it, and this
        process has let go of it before reading a byte.
        """
        from twisted.internet import reactor

        from txgrace.adopt import SocketRegistry, adoptPort

        registry = SocketRegistry(inherit=lambda: [])
        port = adoptPort(
            reactor, registry, "tcp/127.0.0.1/0", socket.AF_INET, ("127.0.0.1", 0),
            Factory.forProtocol(_ResumeRaises),
        )
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        # Take the connection off the port's queue by hand: this test is the
        # old process that holds it.
        port.stopReading()
        held, _ = port.socket.accept()
        self.addCleanup(held.close)
        receiver = HandoffReceiver(registry)
        receiver.descriptorReceived(os.dup(held.fileno()))
        answer = receiver.connectionReceived(b"CONN 9 - " + b64encode(port.key.encode()))
        self.assertEqual(answer, b"REFUSED 9 resuming it raised RuntimeError")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(registry.connections, set())
        client.sendall(b"still here")
        held.settimeout(5)
        self.assertEqual(held.recv(100), b"still here")
