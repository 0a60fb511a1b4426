# -*- test-case-name: txgrace.test.test_adopt,txgrace.test.test_endpoints -*-
"""
Where every grace socket is adopted.

A listening socket is either taken from the inherited ones or made fresh with
C{socket()}, C{bind()} and C{listen()}; either way the reactor adopts it.  A
port made by C{listenTCP} would C{shutdown()} the socket when it stops, which
stops it for every process holding a copy; an adopted port only closes its
own copy, so a successor can keep serving on the same socket.

The ports here also track every connection they accept, so that a drain can
find them, at no cost per read or write on TCP (the kernel knows when a
connection was last active) and one timestamp per read and write on UNIX
sockets.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
import sys
from typing import Any, Callable, Iterable

from twisted.internet import tcp, unix
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgrace import sdnotify
from txgrace._twisted import (
    tcpPortFromDescriptor,
    unixPortFromDescriptor,
    withoutShutdown,
)
from txgrace.inherit import InheritedSocket, inheritSockets, normalizeAddress

log = Logger()

ACCEPT_BACKLOG_SECONDS = 5.0
"""
The longest L{_GracePort.acceptBacklog} goes on accepting, for a socket that
new connections keep arriving on.
"""


class SocketRegistry:
    """
    The grace sockets of one process: the inherited sockets not yet claimed,
    the ports listening now, and the connections accepted through them.

    Sockets are process-wide state, and L{serverFromString} gives an endpoint
    nothing but the reactor, so endpoints and L{GraceService} meet here.

    @ivar ports: Listening grace ports by key, in the order they started.
    @ivar connections: Every open connection accepted through a grace port.
    @ivar handingOver: C{True} when this stop is not the final one: a
        successor or this worker's master keeps the sockets.  Stopping a
        port then leaves UNIX socket paths in place.  Who may remove a path
        on a final stop is each port's own C{boundHere}, not the registry's.
    @ivar acceptLimit: The most connections a port accepts per wakeup, or
        L{None} for Twisted's adaptive batch.  Workers sharing one socket
        use 1: with batches, the first worker to wake takes every queued
        connection and the others sit idle.
    @ivar accepting: Whether ports accept connections as soon as they
        listen.  A process that is not ready yet leaves them queued on the
        socket, where its predecessor (or, later, itself) accepts them: a
        successor that dies before it is ready then takes no client down
        with it.
    """

    def __init__(
        self, inherit: Callable[[], list[InheritedSocket]] = inheritSockets
    ) -> None:
        self._inherit = inherit
        self._inherited: list[InheritedSocket] | None = None
        self.ports: dict[str, Any] = {}
        self.connections: set[Any] = set()
        self.handingOver = False
        self.acceptLimit: int | None = None
        self.accepting = True
        self._connectionLostObservers: list[Callable[[Any], None]] = []
        self._readinessHolds: list[Deferred[Any]] = []
        self._factoriesToStop: list[Any] = []

    def inherited(self) -> list[InheritedSocket]:
        """
        The inherited sockets not claimed yet.  The environment is read on the
        first call.
        """
        if self._inherited is None:
            self._inherited = self._inherit()
        return self._inherited

    def claim(self, key: str, family: int, address: object) -> InheritedSocket | None:
        """
        Take the inherited socket for C{key}: the one of that name, else the
        one bound to C{address} in C{family}.  A socket found by name must
        be bound to C{address} too (any port, when port 0 is asked for):
        one bound elsewhere is logged and left alone, never adopted.
        """
        candidates = self.inherited()
        wanted = normalizeAddress(family, address)
        found = None
        for inherited in candidates:
            if inherited.name == key:
                if _sameAddress(inherited, family, wanted):
                    found = inherited
                    break
                log.error(
                    "Not adopting inherited fd {fd} ({name}): it is bound to "
                    "{bound}, not {wanted}",
                    fd=inherited.fd,
                    name=inherited.name,
                    bound=inherited.address,
                    wanted=wanted,
                )
        if found is None:
            for inherited in candidates:
                if (inherited.family, inherited.address) == (family, wanted):
                    found = inherited
                    break
        if found is None:
            return None
        candidates.remove(found)
        log.info(
            "Adopting inherited fd {fd} ({name}) for {key}",
            fd=found.fd,
            name=found.name,
            key=key,
        )
        return found

    def closeUnclaimed(self) -> None:
        """
        Close the inherited sockets that no endpoint claimed: the previous
        configuration had them and this one does not.
        """
        for inherited in self.inherited():
            log.info(
                "Closing inherited fd {fd} ({name}): no endpoint claimed it",
                fd=inherited.fd,
                name=inherited.name,
            )
            os.close(inherited.fd)
        del self.inherited()[:]

    def pauseAccepting(self) -> None:
        """
        Ports that start listening from now on leave connections queued
        until L{resumeAccepting}.
        """
        self.accepting = False

    def resumeAccepting(self) -> None:
        """
        Accept on every listening port.
        """
        self.accepting = True
        for port in list(self.ports.values()):
            if isinstance(port, _GracePort) and getattr(port, "connected", False):
                port.startReading()

    def holdReadiness(self, until: Deferred[Any]) -> None:
        """
        Do not report this process ready before C{until} fires.
        """
        self._readinessHolds.append(until)

    def readinessHolds(self) -> list[Deferred[Any]]:
        """
        The Deferreds that readiness waits for, taken once.
        """
        holds, self._readinessHolds = self._readinessHolds, []
        return holds

    def addConnectionLostObserver(self, observer: Callable[[Any], None]) -> None:
        """
        Call C{observer} with each tracked connection as it closes.
        """
        self._connectionLostObservers.append(observer)

    def removeConnectionLostObserver(self, observer: Callable[[Any], None]) -> None:
        """
        Undo L{addConnectionLostObserver}.
        """
        self._connectionLostObservers.remove(observer)

    def _connectionLost(self, connection: Any) -> None:
        self.connections.discard(connection)
        # Nothing is observed outside a drain: keep the common path short.
        if self._connectionLostObservers:
            for observer in list(self._connectionLostObservers):
                observer(connection)
        if self._factoriesToStop:
            self._stopFactoriesIfIdle()

    def _stopFactoryWhenIdle(self, factory: Any) -> None:
        # Site.stopFactory closes the access log: requests that finish
        # during the drain must still be logged.
        self._factoriesToStop.append(factory)
        self._stopFactoriesIfIdle()

    def _stopFactoriesIfIdle(self) -> None:
        if self.connections:
            return
        factories, self._factoriesToStop = self._factoriesToStop, []
        for factory in factories:
            factory.doStop()


def _sameAddress(inherited: InheritedSocket, family: int, wanted: object) -> bool:
    if inherited.family != family:
        return False
    if inherited.address == wanted:
        return True
    # grace:tcp:0 adopts its socket whatever port the kernel gave it.
    return (
        isinstance(wanted, tuple)
        and isinstance(inherited.address, tuple)
        and wanted[1] == 0
        and wanted[0] == inherited.address[0]
    )


registry = SocketRegistry()
"""
The registry of this process.
"""


class _TrackedConnection:
    """
    Mix-in for a server transport: registers the connection with its port's
    registry while it is open.  This runs once per connection; nothing here
    runs per read or write (see L{_KernelActivity}).

    @ivar openedAt: When the connection was accepted (reactor seconds).
    @ivar lastActive: The same, until L{_StampedActivity} moves it.
    """

    server: Any
    reactor: Any
    _transportClass: Any
    """
    The Twisted transport class this one extends.  Its methods are called
    directly rather than through C{super()}: this runs for every connection,
    and C{bench/tracking.py} measures what it costs.
    """

    def __init__(
        self,
        skt: socket.socket,
        protocol: Any,
        client: Any,
        server: Any,
        sessionno: int,
        reactor: Any,
    ) -> None:
        self._transportClass.__init__(
            self, skt, protocol, client, server, sessionno, reactor
        )
        self.openedAt = self.lastActive = reactor.seconds()
        server.registry.connections.add(self)

    def connectionLost(self, reason: Failure) -> None:
        try:
            self._transportClass.connectionLost(self, reason)
        finally:
            self.server.registry._connectionLost(self)


class _KernelActivity:
    """
    Mix-in for a TCP transport on Linux: how long the connection has been
    quiet comes from the kernel (C{TCP_INFO}), which keeps the time of the
    last data sent and received anyway, so serving costs nothing extra.
    """

    socket: socket.socket

    def quietSeconds(self, now: float) -> float:
        """
        Seconds since the connection last sent or received data.
        """
        try:
            info = self.socket.getsockopt(
                socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE
            )
        except OSError:
            return 0.0
        # struct tcp_info: tcpi_last_data_sent and tcpi_last_data_recv, in ms.
        sent, received = struct.unpack_from("=I4xI", info, _TCP_INFO_LAST_DATA)
        return min(sent, received) / 1000.0


_TCP_INFO_LAST_DATA = 44
_TCP_INFO_SIZE = 64


class _StampedActivity:
    """
    Mix-in for a transport whose kernel does not say when it was last
    active (UNIX sockets, TCP off Linux): note the time of every read and
    write.

    @ivar lastActive: When it last read or wrote (reactor seconds), or was
        accepted.
    """

    reactor: Any
    lastActive: float

    def doRead(self) -> Any:
        self.lastActive = self.reactor.seconds()
        return super().doRead()  # type: ignore[misc]

    def doWrite(self) -> Any:
        self.lastActive = self.reactor.seconds()
        return super().doWrite()  # type: ignore[misc]

    def quietSeconds(self, now: float) -> float:
        """
        Seconds since the connection last read or wrote.
        """
        return now - self.lastActive


_TCPActivity: type = (
    _KernelActivity
    if sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO")
    else _StampedActivity
)


class TrackedTCPServer(_TrackedConnection, _TCPActivity, tcp.Server):  # type: ignore[misc,valid-type]
    """
    A TCP (or TLS) connection accepted through a grace port.
    """

    _transportClass = tcp.Server


class TrackedUNIXServer(_TrackedConnection, _StampedActivity, unix.Server):
    """
    A UNIX socket connection accepted through a grace port.
    """

    _transportClass = unix.Server


class _GracePort:
    """
    Mix-in for an adopted port.

    @ivar registry: The registry that tracks this port and its connections.
    @ivar key: The name under which the socket is passed to a successor.
    """

    registry: SocketRegistry
    key: str
    factory: Any
    reactor: Any
    numberAccepts: int
    fileno: Callable[[], int]
    _backlog: Deferred[None] | None = None

    def startReading(self) -> None:
        if self.registry.accepting:
            super().startReading()  # type: ignore[misc]

    def doRead(self) -> Any:
        limit = self.registry.acceptLimit
        if limit is not None and self.numberAccepts > limit:
            self.numberAccepts = limit
        return super().doRead()  # type: ignore[misc]

    def acceptBacklog(self) -> Deferred[None]:
        """
        Accept the connections queued on the socket, before a final stop
        closes it and the kernel resets them.

        The port goes on accepting as usual, at most
        L{SocketRegistry.acceptLimit} connections per wakeup, until the
        socket has nothing queued (or L{ACCEPT_BACKLOG_SECONDS} have
        passed); L{stopListening} waits for that.  Other processes reading
        the same socket meanwhile take their share, as they always do.

        The lifecycle calls it on the final stop of a process, and on the
        stop of every worker that served: a worker cannot tell its master's
        final stop (after which the last worker's copy closes the socket)
        from a rolling restart, so a retiring worker takes part too.  It
        accepts within L{SocketRegistry.acceptLimit} (1 in a worker), one
        connection per wakeup like the workers that go on serving, so it
        takes its share of the queue and never the whole queue at once.
        While accepting is paused (the process is not ready) it takes
        nothing: a successor that failed before it was ready leaves the
        queue to its predecessor.

        @return: A Deferred that fires once nothing is queued.
        """
        if self._backlog is None:
            self._backlog = Deferred()
            if getattr(self, "connected", False) and self.registry.accepting:
                self.startReading()
                self._checkBacklog(self.reactor.seconds() + ACCEPT_BACKLOG_SECONDS)
            else:
                self._backlog.callback(None)
        done: Deferred[None] = Deferred()
        self._backlog.addBoth(lambda result: done.callback(None))
        return done

    def _checkBacklog(self, deadline: float) -> None:
        assert self._backlog is not None
        if getattr(self, "connected", False) and not getattr(
            self, "disconnecting", False
        ):
            if _hasQueued(self.fileno()):
                if self.reactor.seconds() < deadline:
                    # The reactor accepts (within the limit) before this runs
                    # again.
                    self.reactor.callLater(0, self._checkBacklog, deadline)
                    return
                log.warn(
                    "Still connections queued on {key} after {seconds}s: "
                    "closing it",
                    key=self.key,
                    seconds=ACCEPT_BACKLOG_SECONDS,
                )
        if not self._backlog.called:
            self._backlog.callback(None)

    def stopListening(self) -> Any:
        """
        Stop listening, once L{acceptBacklog} (if it was called) is done.
        """
        stopListening: Callable[[], Any] = super().stopListening  # type: ignore[misc]
        if self._backlog is not None and not self._backlog.called:
            stopped: Deferred[None] = Deferred()

            def stop(ignored: object) -> None:
                maybeDeferred(stopListening).chainDeferred(stopped)

            self._backlog.addCallback(stop)
            return stopped
        return stopListening()

    def _closed(self, reason: Failure, connectionLost: Callable[..., None]) -> None:
        """
        Run the base port's C{connectionLost}, except that its factory is
        stopped only once the last tracked connection has closed.
        """
        if self.registry.ports.get(self.key) is self:
            del self.registry.ports[self.key]
        factory = self.factory
        self.factory = _StopLater(factory, self.registry)
        try:
            connectionLost(self, reason)
        finally:
            self.factory = factory


def _hasQueued(fd: int) -> bool:
    """
    Whether the listening socket C{fd} has a connection waiting in its queue.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _StopLater:
    """
    Stands in for a port's factory while the port closes, to postpone its
    C{doStop}.
    """

    def __init__(self, factory: Any, registry: SocketRegistry) -> None:
        self._factory = factory
        self._registry = registry

    def doStop(self) -> None:
        self._registry._stopFactoryWhenIdle(self._factory)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._factory, name)


class GraceTCPPort(_GracePort, tcp.Port):  # type: ignore[misc]
    """
    An adopted TCP port.  Adopted TCP ports never C{shutdown()} the socket.
    """

    transport = TrackedTCPServer  # type: ignore[assignment]

    def connectionLost(self, reason: Failure) -> None:
        self._closed(reason, tcp.Port.connectionLost)


@withoutShutdown
class GraceUNIXPort(_GracePort, unix.Port):  # type: ignore[misc]
    """
    An adopted UNIX port that shares its socket safely: it never
    C{shutdown()}s the socket, keeps the socket file's mode, and removes the
    path only if this process owns it (C{boundHere}) and only on a final
    stop, never while handing over.

    @ivar path: The socket file's path, or L{None} for an abstract or
        unnamed socket.
    @ivar boundHere: Whether this process owns the path: it bound the path
        itself, or it serves now on a path its predecessor owned (the
        lifecycle sets this for the keys named in C{TXGRACE_OWNED_SOCKETS}
        once the process is ready; never in a worker, whose master owns the
        path, nor in a successor that never became ready).  An inherited
        path is otherwise left to whoever serves on it.
    """

    transport = TrackedUNIXServer
    path: str | None = None
    boundHere = False
    _identity: tuple[int, int] | None = None

    def connectionLost(self, reason: Failure) -> None:
        if self.path is not None and _mayUnlink(
            self.boundHere, final=not self.registry.handingOver
        ):
            _unlinkSocketFile(self.path, self._identity)
        self._closed(reason, tcp.Port.connectionLost)


def _mayUnlink(boundHere: bool, final: bool) -> bool:
    """
    Whether a process may remove a UNIX socket path as its copy closes: only
    on a final stop, only if it owns the path (C{boundHere}), and never
    while systemd's fd store keeps a copy of the socket (the next start
    adopts that copy, which clients can reach only by its path).
    """
    return final and boundHere and not sdnotify.fileDescriptorStore()


def _filesystemPath(address: object) -> str | None:
    """
    The path of a UNIX socket address from C{getsockname()}, or L{None} if it
    has none in the filesystem (abstract or unnamed).
    """
    if isinstance(address, bytes):
        if not address or address.startswith(b"\0"):
            return None
        return os.fsdecode(address)
    if isinstance(address, str) and address and not address.startswith("\0"):
        return address
    return None


def _fileIdentity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_dev, status.st_ino)


def _unlinkSocketFile(path: str, identity: tuple[int, int] | None) -> None:
    """
    Remove the socket file at C{path}, unless it is no longer the file that
    this socket is bound to (C{identity}: its device and inode when the
    socket was taken), or no longer a socket.
    """
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode) or (
        identity is not None and (status.st_dev, status.st_ino) != identity
    ):
        log.info("Not removing {path}: another file is there now", path=path)
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _removeStaleUNIXSocket(path: str) -> None:
    """
    Remove a socket file that nobody listens on any more, left behind by a
    process that was killed.  A live socket or any other file is left alone
    and makes the bind fail.
    """
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Non-blocking: connecting to a live socket whose backlog is full would
    # otherwise block until its server accepts, perhaps forever.
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def bindListeningSocket(
    family: int, address: Any, backlog: int, mode: int | None = None
) -> socket.socket:
    """
    Make a fresh non-blocking listening stream socket.

    @param mode: For a UNIX socket, the permissions of its file, set before
        it listens so that it is never more permissive than asked.

    @raise CannotListenError: If the address is taken or forbidden.
    """
    skt = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            if isinstance(address, str) and not address.startswith("\0"):
                _removeStaleUNIXSocket(address)
            skt.bind(address)
            if mode is not None and not str(address).startswith("\0"):
                os.chmod(address, mode)
        else:
            skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            skt.bind(address)
        skt.listen(backlog)
    except OSError as e:
        skt.close()
        if family == socket.AF_UNIX:
            raise CannotListenError("unix", address, e) from None
        raise CannotListenError(address[0], address[1], e) from None
    skt.setblocking(False)
    return skt


def _takeSocket(
    registry: SocketRegistry,
    key: str,
    family: int,
    address: Any,
    backlog: int,
    mode: int | None,
    named: bool,
) -> tuple[str, int, bool]:
    """
    The inherited socket for C{key} or C{address}, or a fresh one.

    @return: The key it is registered under (a derived key that is already
        taken, as by two C{grace:tcp:0} endpoints, gets a number in listen
        order), its descriptor, which the caller must close, and whether it
        is fresh (bound here) rather than inherited.
    """
    if key in registry.ports:
        if named:
            raise ValueError(f"two grace endpoints use the socket name {key!r}")
        key += "#" + str(
            next(
                n
                for n in range(2, len(registry.ports) + 3)
                if f"{key}#{n}" not in registry.ports
            )
        )
    inherited = registry.claim(key, family, address)
    if inherited is not None:
        return key, inherited.fd, False
    return key, bindListeningSocket(family, address, backlog, mode).detach(), True


def adoptPort(
    reactor: Any,
    registry: SocketRegistry,
    key: str,
    family: int,
    address: Any,
    factory: IProtocolFactory,
    backlog: int = 50,
    mode: int | None = None,
    named: bool = False,
) -> GraceTCPPort | GraceUNIXPort:
    """
    Listen with C{factory} on the inherited socket for C{key} or C{address},
    or on a fresh one.

    @param named: Whether C{key} was given by the user (C{name=}).
    @return: The listening port, registered under its key.
    @raise CannotListenError: If a fresh socket cannot be bound.
    @raise ValueError: If another grace port already uses the name C{key}.
    """
    key, fd, fresh = _takeSocket(
        registry, key, family, address, backlog, mode, named
    )
    port: GraceTCPPort | GraceUNIXPort
    try:
        if family == socket.AF_UNIX:
            unixPort = unixPortFromDescriptor(GraceUNIXPort, reactor, fd, factory)
            unixPort.backlog = backlog
            unixPort.boundHere = fresh
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, os.dup(fd)) as s:
                unixPort.path = _filesystemPath(s.getsockname())
            if unixPort.path is not None:
                # Keep the mode the socket file has, which a handover never
                # changes.
                unixPort.mode = stat.S_IMODE(os.stat(unixPort.path).st_mode)
                unixPort._identity = _fileIdentity(unixPort.path)
            port = unixPort
        else:
            port = tcpPortFromDescriptor(GraceTCPPort, reactor, fd, family, factory)
    finally:
        # The port listens on its own dup of the descriptor.
        os.close(fd)
    port.registry = registry
    port.key = key
    port.startListening()
    registry.ports[key] = port
    return port


class HeldSocket:
    """
    A listening socket held, never accepted on: a master holds its
    workers' sockets this way, so that they outlive every worker.

    @ivar key: Its name in C{LISTEN_FDNAMES}.
    @ivar socket: The socket.
    @ivar boundHere: Whether this process bound it, rather than inheriting
        it.
    """

    def __init__(
        self,
        registry: SocketRegistry,
        key: str,
        skt: socket.socket,
        boundHere: bool = False,
    ) -> None:
        self.registry = registry
        self.key = key
        self.socket = skt
        self.boundHere = boundHere
        self._path: str | None = None
        self._identity: tuple[int, int] | None = None
        if skt.family == socket.AF_UNIX:
            self._path = _filesystemPath(skt.getsockname())
            if self._path is not None:
                self._identity = _fileIdentity(self._path)
        self._closed = False

    def fileno(self) -> int:
        """
        The descriptor to pass to a worker.
        """
        return self.socket.fileno()

    def describe(self) -> str:
        """
        Its address, as C{tcp:127.0.0.1:8080} or C{unix:/run/app.sock}.
        """
        address = self.socket.getsockname()
        if self.socket.family == socket.AF_UNIX:
            return "unix:" + (os.fsdecode(address) if isinstance(address, bytes) else address)
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        return f"tcp:{host}:{address[1]}"

    def close(self, final: bool) -> None:
        """
        Close this copy (once; later calls only remove the path); on a
        C{final} close, remove a UNIX socket's path if this process owns it
        (C{boundHere}).
        """
        if self.registry.ports.get(self.key) is self:
            del self.registry.ports[self.key]
        if self._path is not None and _mayUnlink(self.boundHere, final):
            _unlinkSocketFile(self._path, self._identity)
            self._path = None
        if not self._closed:
            self._closed = True
            self.socket.close()


def holdSocket(
    registry: SocketRegistry,
    key: str,
    family: int,
    address: Any,
    backlog: int = 50,
    mode: int | None = None,
    named: bool = False,
) -> HeldSocket:
    """
    Take the socket for C{key} or C{address} as L{adoptPort} would, and
    hold it without accepting.
    """
    key, fd, fresh = _takeSocket(
        registry, key, family, address, backlog, mode, named
    )
    held = HeldSocket(registry, key, socket.socket(fileno=fd), boundHere=fresh)
    registry.ports[key] = held
    return held


def stopListening(ports: Iterable[Any]) -> Deferred[Any]:
    """
    Stop every port in C{ports} from listening; fires when all are closed.
    """
    from twisted.internet.defer import gatherResults

    waits = []
    for port in ports:
        result = port.stopListening()
        waits.append(result if isinstance(result, Deferred) else succeed(None))
    return gatherResults(waits, consumeErrors=True)

