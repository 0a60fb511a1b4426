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
from typing import Any, Callable

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
    acceptedTransport,
    unparsedBytes,
)
from txgrace.drain import applicationProtocol, describePeer
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

    def notifyAtRest(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} each time the channel comes to rest after a
        request, so that a client that sends its next request the moment a
        response arrives is not missed between two looks.
        """
        channel = self._http
        requestDone = channel.requestDone

        def requestDoneThenTell(request: Any) -> None:
            requestDone(request)
            if httpChannelAtRest(channel):
                callback()

        channel.requestDone = requestDoneThenTell  # type: ignore[method-assign]

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
    The state to move C{connection} with, or L{None} while it is busy (its
    protocol is not at rest).  It moves once L{flushed} too.
    """
    if not connection.connected or connection.disconnecting:
        return None
    return handoff.handoffState()


def flushed(connection: Any) -> bool:
    """
    Whether everything written to C{connection} is in the kernel.
    """
    return not pendingWriteBytes(connection)


def _b64(data: bytes) -> bytes:
    return b64encode(data) or b"-"


def _unb64(data: bytes) -> bytes:
    return b"" if data == b"-" else b64decode(data, validate=True)


class HandoffSender:
    """
    The passing end of a control channel C{transport} (a UNIX socket
    transport): passes connections to the process at the other end, which
    answers for each.  The old process passes its own connections
    (L{move}); a master passes on those of a retiring worker (L{forward}).

    @ivar handedOff: How many connections the other end took.
    @ivar refused: How many it refused (or could not answer for).
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[bytes | None]] = {}
        self._moving: set[Any] = set()
        self._open = True
        self.handedOff = 0
        self.refused = 0

    handoffFor = staticmethod(handoffFor)
    readyToMove = staticmethod(readyToMove)
    flushed = staticmethod(flushed)

    def moving(self, connection: Any) -> bool:
        """
        Whether C{connection} has been sent and not answered for yet.
        """
        return connection in self._moving

    def forward(self, fd: int, state: bytes, key: str) -> Deferred[bytes | None]:
        """
        Pass the connection on descriptor C{fd}, with C{state}, for the port
        C{key}.  C{fd} must stay open until the answer.

        @return: A Deferred that fires with L{None} once the other end took
            it, or with its reason (bytes) if it did not.
        """
        if not self._open:
            return succeed(b"the channel is closed")
        ident = next(self._ids)
        answer: Deferred[bytes | None] = Deferred()
        self._pending[ident] = answer
        self._transport.sendFileDescriptor(fd)
        self._transport.write(
            b"%s %d %s %s\n" % (CONN, ident, _b64(state), _b64(key.encode()))
        )
        return answer

    def move(self, connection: Any, state: bytes) -> Deferred[bool]:
        """
        Stop reading C{connection} and pass it with C{state} (see
        L{readyToMove}).

        @return: A Deferred that fires with C{True} once the other end took
            it (this process has let go of it), or C{False} if it did not
            (this process reads it again and still owns it).
        """
        connection.stopReading()
        self._moving.add(connection)

        def answered(why: bytes | None) -> bool:
            self._moving.discard(connection)
            if why is None:
                self.handedOff += 1
                if not connection.disconnected:
                    forgetConnection(connection, Failure(ConnectionHandedOff()))
                return True
            self.refused += 1
            log.warn(
                "The connection of {peer} stays here: {why}",
                peer=describePeer(connection),
                why=why.decode("utf-8", "replace"),
            )
            if not connection.disconnected:
                connection.startReading()
            return False

        return self.forward(connection.fileno(), state, connection.server.key).addCallback(
            answered
        )

    def answerReceived(self, line: bytes) -> bool:
        """
        Handle a line from the other end if it answers for a connection.

        @return: Whether it did.
        """
        word, _, rest = line.partition(b" ")
        if word not in (TOOK, REFUSED):
            return False
        identText, _, why = rest.partition(b" ")
        try:
            answer = self._pending.pop(int(identText))
        except (ValueError, KeyError):
            log.error("Unexpected handoff answer {line!r}", line=line)
            return True
        answer.callback(None if word == TOOK else (why or b"refused"))
        return True

    def lost(self) -> None:
        """
        The channel closed: every connection not answered for stays here.
        """
        self._open = False
        pending, self._pending = self._pending, {}
        if pending:
            log.warn(
                "The channel closed with {count} connections in transit; "
                "they stay here",
                count=len(pending),
            )
        for answer in pending.values():
            answer.callback(b"the channel closed")


class _ConnectionsArriving:
    """
    The receiving end of connections on a control channel: each descriptor
    arrives first, then the C{CONN} line that names it.
    """

    def __init__(self) -> None:
        self._descriptors: deque[int] = deque()

    def descriptorReceived(self, fd: int) -> None:
        """
        A descriptor arrived; the line that says what it is follows.
        """
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        self._descriptors.append(fd)

    def _take(self, line: bytes) -> tuple[bytes, int, bytes, str] | bytes:
        """
        The connection a C{CONN} line names: its id, descriptor, state and
        port key; or, when the line is not usable, the C{REFUSED} answer
        (its descriptor, if any, closed).
        """
        parts = line.split(b" ")
        ident = parts[1] if len(parts) > 1 else b"?"
        if not self._descriptors:
            return b"%s %s no descriptor came with it" % (REFUSED, ident)
        fd = self._descriptors.popleft()
        try:
            return ident, fd, _unb64(parts[2]), _unb64(parts[3]).decode()
        except (IndexError, ValueError, binascii.Error):
            os.close(fd)
            return b"%s %s malformed" % (REFUSED, ident)


class HandoffRelay(_ConnectionsArriving):
    """
    A master's part: the connections a retiring worker passes up (on its
    control channel) are passed on to a worker that stays, and the answer
    goes back.  The master never serves them; its copy of each descriptor
    is closed once the answer is in.

    @param upstream: The retiring worker's channel transport, to answer on.
    @param target: Returns the sender of the worker to pass them to, or
        L{None} if none takes them.
    @param took: Called for each connection a worker took.
    """

    def __init__(
        self, upstream: Any, target: Any, took: Callable[[], None] | None = None
    ) -> None:
        _ConnectionsArriving.__init__(self)
        self._upstream = upstream
        self._target = target
        self._took = took

    def connectionReceived(self, line: bytes) -> None:
        """
        Pass on the connection a C{CONN} line describes.
        """
        taken = self._take(line)
        if isinstance(taken, bytes):
            self._answer(taken)
            return
        ident, fd, state, key = taken
        sender = self._target()
        if sender is None:
            os.close(fd)
            self._answer(b"%s %s no worker takes it" % (REFUSED, ident))
            return

        def answered(why: bytes | None) -> None:
            os.close(fd)
            if why is None:
                if self._took is not None:
                    self._took()
                self._answer(b"%s %s" % (TOOK, ident))
            else:
                self._answer(b"%s %s %s" % (REFUSED, ident, why))

        sender.forward(fd, state, key).addCallback(answered)

    def lost(self) -> None:
        """
        The retiring worker is gone: close what it passed and no line named.
        """
        while self._descriptors:
            os.close(self._descriptors.popleft())

    def _answer(self, line: bytes) -> None:
        if self._upstream.connected and not self._upstream.disconnecting:
            self._upstream.write(line + b"\n")


def _peerAddress(skt: socket.socket) -> Any:
    address = skt.getpeername()
    if skt.family == socket.AF_INET6 and len(address) == 4:
        # As tcp.Port.doRead does: the scope id in the host.
        host = socket.getnameinfo(
            address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        )
        address = (host[0],) + tuple(address[1:])
    return address


class HandoffReceiver(_ConnectionsArriving):
    """
    The successor's end: serves the connections its predecessor passes,
    each with the factory of the port it came through.

    @param registry: This process's L{txgrace.adopt.SocketRegistry}.
    @ivar resumed: How many connections it took.
    """

    def __init__(self, registry: Any) -> None:
        _ConnectionsArriving.__init__(self)
        self._registry = registry
        self.resumed = 0

    def connectionReceived(self, line: bytes) -> bytes:
        """
        Serve the connection a C{CONN} line describes.

        @return: The answer line, C{TOOK <id>} or C{REFUSED <id> <why>}.
        """
        taken = self._take(line)
        if isinstance(taken, bytes):
            return taken
        ident, fd, state, key = taken
        why = self._serve(fd, key, state)
        if why is not None:
            return b"%s %s %s" % (REFUSED, ident, why.encode())
        self.resumed += 1
        return b"%s %s" % (TOOK, ident)

    def _serve(self, fd: int, key: str, state: bytes) -> str | None:
        if not self._registry.accepting:
            # Handed over or stopping itself: its own drain has begun.
            os.close(fd)
            return "this process no longer serves"
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
        try:
            made = acceptedTransport(port, skt, address)
        except Exception as e:
            log.failure("Building a protocol for a connection on {key!r} failed", key=key)
            skt.close()
            return f"building its protocol raised {type(e).__name__}"
        if made is None:
            return "the factory refused it"
        protocol, transport = made
        try:
            protocol.makeConnection(transport)
            handoff = IHandoff(applicationProtocol(transport), None)
            if handoff is None:
                # The new build serves another protocol on this port.
                forgetConnection(transport, Failure(ConnectionHandedOff()))
                return "its protocol here does not take handoffs"
            handoff.resumeHandoff(state)
        except Exception as e:
            # Nothing was read here yet (no reactor turn since the transport
            # was made): the old process keeps the connection.
            log.failure("Resuming a connection on {key!r} failed", key=key)
            if not transport.disconnected:
                forgetConnection(transport, Failure(ConnectionHandedOff()))
            return f"resuming it raised {type(e).__name__}"
        return None
