"""
Tests for L{txgrace.adopt}: who removes a UNIX socket path, and how a port
takes the connections queued on its socket before it closes.

Every socket is real: UNIX sockets in a temporary directory, TCP on
127.0.0.1.  Each test uses its own L{SocketRegistry}.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from txgrace import adopt
from txgrace.adopt import (
    GraceTCPPort,
    GraceUNIXPort,
    SocketRegistry,
    adoptPort,
    holdSocket,
)
from txgrace.inherit import InheritedSocket


def _registry(inherited: list[InheritedSocket] | None = None) -> SocketRegistry:
    return SocketRegistry(inherit=lambda: list(inherited or []))


class _SocketsMixin:
    """
    Temporary directories, listening sockets and clients, all closed in
    cleanup.
    """

    addCleanup: Any

    def directory(self) -> str:
        """
        A short temporary directory (UNIX socket paths are limited to about
        100 bytes), removed in cleanup.
        """
        directory = tempfile.mkdtemp(prefix="txgrace-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    def listeningSocket(self, family: int, address: Any) -> socket.socket:
        """
        A non-blocking listening socket, as a predecessor would pass it on.
        """
        skt = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(skt.close)
        if family != socket.AF_UNIX:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        skt.bind(address)
        skt.listen(50)
        skt.setblocking(False)
        return skt

    def inherited(self, skt: socket.socket, name: str) -> InheritedSocket:
        """
        C{skt} described as an inherited socket, on a descriptor of its own
        (which adopting it closes).
        """
        address = skt.getsockname()
        if skt.family == socket.AF_UNIX:
            address = os.path.abspath(address)
        return InheritedSocket(os.dup(skt.fileno()), name, skt.family, address)

    async def adopt(
        self, registry: SocketRegistry, key: str, family: int, address: Any
    ) -> Any:
        """
        A grace port for C{key}, stopped in cleanup after its connections are
        aborted.
        """
        port = adoptPort(
            reactor, registry, key, family, address, Factory.forProtocol(Protocol)
        )

        async def close() -> None:
            for connection in list(registry.connections):
                connection.abortConnection()
            if port.connected:
                await port.stopListening()
            await deferLater(reactor, 0)

        self.addCleanup(close)
        return port

    def connectClients(self, address: Any, family: int, count: int) -> list[socket.socket]:
        """
        C{count} clients connected to C{address}; the kernel completes each
        connection and queues it until the server accepts.
        """
        clients = []
        for _ in range(count):
            client = socket.socket(family, socket.SOCK_STREAM)
            self.addCleanup(client.close)
            client.settimeout(10)
            client.connect(address)
            clients.append(client)
        return clients


def _connectable(path: str) -> bool:
    """
    Whether a client can connect to the UNIX socket at C{path}.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        try:
            client.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False
    return True


class UNIXPathOwnershipTests(_SocketsMixin, TestCase):
    """
    Only the process that owns a UNIX socket path (C{boundHere}: it bound
    the path, or the lifecycle gave it the ownership its predecessor passed
    on in C{TXGRACE_OWNED_SOCKETS}) removes the path, and only on a final
    stop.
    """

    def setUp(self) -> None:
        self.path = os.path.join(self.directory(), "web.sock")

    async def test_boundHereRemovedOnFinalStop(self) -> None:
        """
        A port that bound its path itself removes it on a final stop.
        """
        registry = _registry()
        port = await self.adopt(registry, "web", socket.AF_UNIX, self.path)
        self.assertIsInstance(port, GraceUNIXPort)
        self.assertEqual((port.boundHere, port.path), (True, self.path))
        await port.stopListening()
        self.assertFalse(os.path.exists(self.path))

    async def test_inheritedKeptOnFinalStop(self) -> None:
        """
        A port on an inherited path (a successor whose readiness failed, or
        a worker stopped directly) leaves the path on its final stop, so
        that the process still serving on it goes on getting clients.
        """
        serving = self.listeningSocket(socket.AF_UNIX, self.path)
        registry = _registry([self.inherited(serving, "web")])
        port = await self.adopt(registry, "web", socket.AF_UNIX, self.path)
        self.assertEqual((port.boundHere, port.path), (False, self.path))
        self.assertFalse(registry.handingOver)
        await port.stopListening()
        self.assertTrue(os.path.exists(self.path))
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        self.assertTrue(_connectable(self.path))
        serving.setblocking(True)
        serving.settimeout(10)
        accepted, _ = serving.accept()
        accepted.close()

    async def test_inheritedRemovedWhenOwned(self) -> None:
        """
        Once the port owns the path it inherited (the lifecycle marks it
        C{boundHere} when the predecessor passed its ownership on and this
        process serves), the final stop removes the path.
        """
        serving = self.listeningSocket(socket.AF_UNIX, self.path)
        registry = _registry([self.inherited(serving, "web")])
        port = await self.adopt(registry, "web", socket.AF_UNIX, self.path)
        port.boundHere = True
        await port.stopListening()
        self.assertFalse(os.path.exists(self.path))

    async def test_handingOverKeepsOwnedPath(self) -> None:
        """
        A stop that is not the final one leaves the path, even one this
        process bound and owns.
        """
        registry = _registry()
        port = await self.adopt(registry, "web", socket.AF_UNIX, self.path)
        self.assertTrue(port.boundHere)
        registry.handingOver = True
        await port.stopListening()
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))

    async def test_replacedPathKept(self) -> None:
        """
        A path that now names another socket file (something else bound it
        after removing this one) is left alone.
        """
        registry = _registry()
        port = await self.adopt(registry, "web", socket.AF_UNIX, self.path)
        os.unlink(self.path)
        other = self.listeningSocket(socket.AF_UNIX, self.path)
        await port.stopListening()
        self.assertTrue(_connectable(self.path))
        other.close()

    async def test_fileDescriptorStoreKeepsPath(self) -> None:
        """
        While systemd's fd store keeps a copy of the socket ($FDSTORE), a
        final stop leaves the path even of a socket this process bound: the
        next start adopts the stored copy, which clients reach by its path.
        """
        self.patch(os, "environ", dict(os.environ, FDSTORE="16", NOTIFY_SOCKET="/run/x"))
        registry = _registry()
        port = await self.adopt(registry, "web", socket.AF_UNIX, self.path)
        self.assertTrue(port.boundHere)
        await port.stopListening()
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        held = holdSocket(registry, "held", socket.AF_UNIX, self.path + "2")
        held.close(final=True)
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path + "2").st_mode))

    def test_heldSocketOwnership(self) -> None:
        """
        A held socket (a master's) removes a path it bound on its final
        close, and leaves an inherited one it does not own.
        """
        registry = _registry()
        held = holdSocket(registry, "web", socket.AF_UNIX, self.path)
        self.assertTrue(held.boundHere)
        held.close(final=True)
        self.assertFalse(os.path.exists(self.path))

        serving = self.listeningSocket(socket.AF_UNIX, self.path)
        registry = _registry([self.inherited(serving, "web")])
        held = holdSocket(registry, "web", socket.AF_UNIX, self.path)
        self.assertFalse(held.boundHere)
        held.close(final=True)
        self.assertTrue(_connectable(self.path))

    def test_heldSocketClosedThenFinal(self) -> None:
        """
        A master closes its copies first and removes the paths once its
        workers are gone: the second, final close removes the path without
        touching the closed socket.
        """
        registry = _registry()
        held = holdSocket(registry, "web", socket.AF_UNIX, self.path)
        held.close(final=False)
        self.assertTrue(os.path.exists(self.path))
        held.close(final=True)
        self.assertFalse(os.path.exists(self.path))


class AcceptBacklogTests(_SocketsMixin, TestCase):
    """
    L{txgrace.adopt._GracePort.acceptBacklog} takes what is queued on the
    socket, within the registry's accept limit, before the port closes.
    """

    def countAccepts(self, port: Any, registry: SocketRegistry) -> list[int]:
        """
        Record how many connections each wakeup of C{port} accepts.
        """
        counts: list[int] = []
        doRead = port.doRead

        def counting() -> Any:
            before = len(registry.connections)
            try:
                return doRead()
            finally:
                counts.append(len(registry.connections) - before)

        port.doRead = counting
        return counts

    async def queued(
        self, count: int, limit: int | None
    ) -> tuple[SocketRegistry, GraceTCPPort, tuple[str, int]]:
        """
        A TCP port that is not accepting yet (its process is not ready),
        with C{count} connections queued on its socket.
        """
        registry = _registry()
        registry.acceptLimit = limit
        registry.pauseAccepting()
        port = await self.adopt(registry, "web", socket.AF_INET, ("127.0.0.1", 0))
        address = ("127.0.0.1", port.getHost().port)
        self.connectClients(address, socket.AF_INET, count)
        for _ in range(3):
            await deferLater(reactor, 0.01)
        self.assertEqual(registry.connections, set())
        return registry, port, address

    async def test_withinLimit(self) -> None:
        """
        With an accept limit of 1, the port takes every queued connection,
        one per wakeup, and then reports that nothing is queued.
        """
        registry, port, address = await self.queued(6, limit=1)
        counts = self.countAccepts(port, registry)
        registry.resumeAccepting()
        await port.acceptBacklog()
        self.assertEqual(len(registry.connections), 6)
        self.assertEqual(max(counts), 1)
        self.assertEqual(sum(counts), 6)

    async def test_stopListeningWaits(self) -> None:
        """
        C{stopListening} right after C{acceptBacklog} (without waiting for
        it) stops the port only once the queue is empty.
        """
        registry, port, address = await self.queued(5, limit=1)
        registry.resumeAccepting()
        port.acceptBacklog()
        await port.stopListening()
        self.assertFalse(port.connected)
        self.assertEqual(len(registry.connections), 5)

    async def test_nothingQueued(self) -> None:
        """
        With nothing queued, C{acceptBacklog} is done at once.
        """
        registry, port, address = await self.queued(0, limit=1)
        registry.resumeAccepting()
        d = port.acceptBacklog()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(registry.connections, set())

    async def test_notReadyTakesNothing(self) -> None:
        """
        A port whose process is not ready (accepting paused: a successor
        whose readiness failed) takes nothing from the queue, and leaves it
        to the process still serving on the socket.
        """
        registry, port, address = await self.queued(3, limit=1)
        serving = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(serving.close)
        d = port.acceptBacklog()
        self.assertIsNone(self.successResultOf(d))
        await port.stopListening()
        self.assertEqual(registry.connections, set())
        accepted = []
        while True:
            try:
                connection, _ = serving.accept()
            except BlockingIOError:
                break
            accepted.append(connection)
            connection.close()
        self.assertEqual(len(accepted), 3)

    async def test_retiringWithoutBacklogLeavesQueue(self) -> None:
        """
        A port that stops without C{acceptBacklog} (a predecessor that
        handed over) leaves what is queued to another holder of the socket.
        """
        registry, port, address = await self.queued(4, limit=1)
        other = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(other.close)
        await port.stopListening()
        accepted = []
        while True:
            try:
                connection, _ = other.accept()
            except BlockingIOError:
                break
            accepted.append(connection)
            connection.close()
        self.assertEqual(len(accepted), 4)
        self.assertEqual(registry.connections, set())

    async def test_sharedWithOtherWorker(self) -> None:
        """
        While one port takes the backlog within the limit, another port on
        the same socket (another worker) takes its share too.
        """
        registry, port, address = await self.queued(10, limit=1)
        otherRegistry = _registry(
            [InheritedSocket(os.dup(port.fileno()), "web", socket.AF_INET, address)]
        )
        otherRegistry.acceptLimit = 1
        otherRegistry.pauseAccepting()
        other = await self.adopt(otherRegistry, "web", socket.AF_INET, address)
        otherRegistry.resumeAccepting()
        registry.resumeAccepting()
        await port.acceptBacklog()
        for _ in range(100):
            if len(registry.connections) + len(otherRegistry.connections) == 10:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(len(registry.connections) + len(otherRegistry.connections), 10)
        self.assertGreaterEqual(len(registry.connections), 1)
        self.assertGreaterEqual(len(otherRegistry.connections), 1)

    async def test_giveUpUnderEndlessArrivals(self) -> None:
        """
        On a socket where connections never stop arriving (here: where
        something always looks queued), C{acceptBacklog} gives up after
        L{adopt.ACCEPT_BACKLOG_SECONDS}, so a final stop still ends.
        """
        registry, port, address = await self.queued(2, limit=1)
        self.patch(adopt, "ACCEPT_BACKLOG_SECONDS", 0.2)
        self.patch(adopt, "_hasQueued", lambda fd: True)
        started = reactor.seconds()
        registry.resumeAccepting()
        await port.acceptBacklog()
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(len(registry.connections), 2)
