# -*- test-case-name: txgrace.test.test_handoff -*-
"""
Where connections move: once a successor is ready, each connection that is
between two exchanges goes to it, over the private control channel, instead
of being closed by the drain.  The client sees nothing: no FIN, no reset, no
C{Connection: close}; its next request is read and answered by the
successor on the same TCP connection.

Why no byte is lost or read twice:

 1. The old process takes a connection only when its protocol is at rest
    (L{IHandoff.handoffState} answers): for HTTP/1.1, no request is being
    parsed or answered and nothing waits behind a paused one; and when its
    transport's write buffer is empty, so every byte of the last response
    is in the kernel already.
 2. It stops reading the connection before it sends anything.  From then
    on, whatever the client sends waits in the socket's receive queue in the
    kernel, which both processes' descriptors share.
 3. What the old process read but did not process (a request line that is
    still arriving) travels with the descriptor, and the successor's
    protocol gets it (L{IHandoff.resumeHandoff}) before its transport reads
    anything from the kernel: the order in which the bytes arrived.
 4. The old process closes its descriptor only after the successor says it
    took the connection, and without C{shutdown()}: the successor's
    descriptor keeps the connection open.  If the successor refuses it, or
    the channel closes first (the successor died), the old process reads
    again where it stopped; the kernel kept the bytes.  A connection the
    successor took just before it died was its own, as in any crash.
 5. So one process reads at a time: the old one stops before the send, the
    successor starts after the receive, and the old one starts again only
    when the successor refused or is gone.

Where a connection cannot move, the drain (L{txgrace.drain}) ends it: TLS
(the session's keys live in the old process), HTTP/2, a protocol that does
not provide L{IHandoff}, a final stop (no successor), or a successor that
does not speak the handoff (an older txgrace: it does not announce
C{HANDOFF} before C{READY}).

On the control channel (see L{txgrace.restart}), each connection is one
descriptor (C{SCM_RIGHTS}, which Twisted's UNIX transport sends with the
first byte of the line that follows it) and one line, C{CONN <id> <state>
<port>} with the state and the port's key in base64; the successor answers
C{TOOK <id>} or C{REFUSED <id> <why>}.  The old process sends without
waiting for answers, so connections go in batches as fast as the channel
takes them.
"""

from __future__ import annotations

import binascii
import fcntl
import itertools
import os
import socket
from base64 import b64decode, b64encode
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.components import registerAdapter
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from txgrace._twisted import (
    forgetConnection,
    httpChannelAtRest,
    pendingWriteBytes,
    serveAcceptedSocket,
    unparsedBytes,
)
from txgrace.drain import applicationProtocol
from txgrace.interfaces import IHandoff

log = Logger()

CONN = b"CONN"
TOOK = b"TOOK"
REFUSED = b"REFUSED"
HANDOFF = b"HANDOFF"
"""
The line a successor sends before C{READY} when it takes connections.
"""


class ConnectionHandedOff(ConnectionDone):
    """
    The connection moved to the successor: the reason the old process's
    protocol is given in C{connectionLost}.  The connection itself goes on.
    """


@implementer(IHandoff)
class HTTPChannelHandoff:
    """
    Moves Twisted's HTTP/1.1 channel between two requests, with the part of
    the next request line that has already arrived.
    """

    def __init__(self, channel: HTTPChannel) -> None:
        self._http = channel

    def handoffState(self) -> bytes | None:
        if not httpChannelAtRest(self._http):
            return None
        return unparsedBytes(self._http)

    def resumeHandoff(self, state: bytes) -> None:
        if state:
            # Through the transport's protocol: Twisted's HTTP/1.1-or-2
            # switch, when the factory is a Site.
            protocol = getattr(self._http.transport, "protocol", self._http)
            protocol.dataReceived(state)


registerAdapter(HTTPChannelHandoff, HTTPChannel, IHandoff)


def _encrypted(connection: Any) -> bool:
    protocol = getattr(connection, "protocol", None)
    for _ in range(8):
        if protocol is None:
            return False
        if isinstance(protocol, TLSMemoryBIOProtocol):
            return True
        protocol = getattr(protocol, "wrappedProtocol", None)
    return False


def handoffFor(connection: Any) -> IHandoff | None:
    """
    The L{IHandoff} of C{connection}'s protocol, or L{None} where the
    connection cannot move (TLS, or a protocol that does not opt in).
    """
    if _encrypted(connection) or getattr(connection.server, "key", None) is None:
        return None
    return IHandoff(applicationProtocol(connection), None)


def readyToMove(connection: Any, handoff: IHandoff) -> bytes | None:
    """
    The state to move C{connection} with now, or L{None} while it is busy:
    its protocol is not at rest, or its last response is not all in the
    kernel yet.
    """
    if not connection.connected or connection.disconnecting:
        return None
    if pendingWriteBytes(connection):
        return None
    return handoff.handoffState()


def _b64(data: bytes) -> bytes:
    return b64encode(data) or b"-"


def _unb64(data: bytes) -> bytes:
    return b"" if data == b"-" else b64decode(data, validate=True)


class HandoffSender:
    """
    The old process's end: passes connections to the successor over the
    control channel C{transport} (a UNIX socket transport), and learns which
    ones it took.

    @ivar handedOff: How many connections the successor took.
    @ivar refused: How many it refused (or could not answer for).
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Any, Deferred[bool]]] = {}
        self._moving: set[Any] = set()
        self._open = True
        self.handedOff = 0
        self.refused = 0

    handoffFor = staticmethod(handoffFor)
    readyToMove = staticmethod(readyToMove)

    def moving(self, connection: Any) -> bool:
        """
        Whether C{connection} has been sent and not answered for yet.
        """
        return connection in self._moving

    def move(self, connection: Any, state: bytes) -> Deferred[bool]:
        """
        Stop reading C{connection} and pass it to the successor with
        C{state} (see L{readyToMove}).

        @return: A Deferred that fires with C{True} once the successor took
            it (this process has let go of it), or C{False} if it did not
            (this process reads it again and still owns it).
        """
        if not self._open:
            return succeed(False)
        ident = next(self._ids)
        done: Deferred[bool] = Deferred()
        connection.stopReading()
        self._pending[ident] = (connection, done)
        self._moving.add(connection)
        self._transport.sendFileDescriptor(connection.fileno())
        self._transport.write(
            b"%s %d %s %s\n"
            % (CONN, ident, _b64(state), _b64(connection.server.key.encode()))
        )
        return done

    def answerReceived(self, line: bytes) -> bool:
        """
        Handle a line from the successor if it answers for a connection.

        @return: Whether it did.
        """
        word, _, rest = line.partition(b" ")
        if word not in (TOOK, REFUSED):
            return False
        identText, _, why = rest.partition(b" ")
        try:
            entry = self._pending.pop(int(identText))
        except (ValueError, KeyError):
            log.error("Unexpected handoff answer {line!r}", line=line)
            return True
        connection, done = entry
        self._moving.discard(connection)
        if word == TOOK:
            self.handedOff += 1
            if not connection.disconnected:
                forgetConnection(connection, Failure(ConnectionHandedOff()))
            done.callback(True)
        else:
            self.refused += 1
            log.warn(
                "The successor refused the connection of {peer}: {why}",
                peer=_peer(connection),
                why=why.decode("utf-8", "replace"),
            )
            self._keep(connection, done)
        return True

    def lost(self) -> None:
        """
        The channel closed: every connection not answered for stays here.
        """
        self._open = False
        pending, self._pending = self._pending, {}
        self._moving.clear()
        if pending:
            log.warn(
                "The successor's channel closed with {count} connections in "
                "transit; this process keeps them",
                count=len(pending),
            )
        for connection, done in pending.values():
            self.refused += 1
            self._keep(connection, done)

    def _keep(self, connection: Any, done: Deferred[bool]) -> None:
        if not connection.disconnected:
            connection.startReading()
        done.callback(False)


def _peer(connection: Any) -> str:
    try:
        peer = connection.getPeer()
    except Exception:
        return "?"
    return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"


def _peerAddress(skt: socket.socket) -> Any:
    address = skt.getpeername()
    if skt.family == socket.AF_INET6 and len(address) == 4:
        # As tcp.Port.doRead does: the scope id in the host.
        host = socket.getnameinfo(
            address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        )
        address = (host[0],) + tuple(address[1:])
    return address


class HandoffReceiver:
    """
    The successor's end: serves the connections its predecessor passes,
    each with the factory of the port it came through.

    @param registry: This process's L{txgrace.adopt.SocketRegistry}.
    @ivar resumed: How many connections it took.
    """

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._descriptors: deque[int] = deque()
        self.resumed = 0

    def descriptorReceived(self, fd: int) -> None:
        """
        A descriptor arrived; the line that says what it is follows.
        """
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        self._descriptors.append(fd)

    def connectionReceived(self, line: bytes) -> bytes:
        """
        Serve the connection a C{CONN} line describes.

        @return: The answer line, C{TOOK <id>} or C{REFUSED <id> <why>}.
        """
        parts = line.split(b" ")
        ident = parts[1] if len(parts) > 1 else b"?"
        if not self._descriptors:
            return b"%s %s no descriptor came with it" % (REFUSED, ident)
        fd = self._descriptors.popleft()
        try:
            state, key = _unb64(parts[2]), _unb64(parts[3]).decode()
        except (IndexError, ValueError, binascii.Error):
            os.close(fd)
            return b"%s %s malformed" % (REFUSED, ident)
        why = self._serve(fd, key, state)
        if why is not None:
            return b"%s %s %s" % (REFUSED, ident, why.encode())
        self.resumed += 1
        return b"%s %s" % (TOOK, ident)

    def _serve(self, fd: int, key: str, state: bytes) -> str | None:
        port = self._registry.ports.get(key)
        if port is None or not getattr(port, "connected", False):
            os.close(fd)
            return f"no port {key!r} here"
        skt = socket.socket(fileno=fd)
        try:
            address = _peerAddress(skt)
        except OSError as e:
            # Closing a descriptor never ends the connection the old
            # process still holds.
            skt.close()
            return f"not connected ({e.strerror})"
        skt.setblocking(False)
        transport = serveAcceptedSocket(port, skt, address)
        if transport is None:
            return "the factory refused it"
        handoff = IHandoff(applicationProtocol(transport), None)
        if handoff is None:
            # The new build serves another protocol on this port.
            forgetConnection(transport, Failure(ConnectionHandedOff()))
            return "its protocol here does not take handoffs"
        handoff.resumeHandoff(state)
        return None
