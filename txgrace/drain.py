# -*- test-case-name: txgrace.test.test_drain -*-
"""
Where the drain happens: ask every open connection to finish in the way its
protocol knows, wait for all of them to close, and abort the rest at the
hammer deadline.

Policies:
  - Any connection that can move (L{txgrace.handoff}) when a successor
    takes them: it goes to the successor as soon as it is between two
    exchanges; a request in flight finishes here first, with no
    C{Connection: close}.  One that the successor does not take is drained
    as below.
  - HTTP/1.1: the last request already received ends with C{Connection:
    close} (those pipelined before it are answered first); a response
    already being written (a stream) ends as it began, and the connection
    is then idle.  An idle connection, never used or between requests, is
    kept until it has been quiet for the idle grace
    (L{IDLE_GRACE_SECONDS}), and a request it sends meanwhile is answered
    with C{Connection: close}.  Closing a connection the instant it went
    idle races with a client that is already sending its next request on
    it, or that connected just before the stop and has not sent yet.
  - HTTP/2: a GOAWAY frame (NO_ERROR) whose last stream id is the largest
    there is, which tells the client to open no more streams; for
    L{H2_GOAWAY_GRACE_SECONDS} the streams it sent before it read that are
    still served.  Then a second GOAWAY with the real last stream id: any
    later stream is refused (the client may retry it elsewhere), and the
    connection closes once its open streams are done.  This is the
    graceful shutdown of RFC 9113, section 6.8.
  - L{IDrainable} (a protocol that provides it, or one adapted to it, as
    websockets are in L{txgrace.websocket}, also behind an upgraded
    C{HTTPChannel}): its C{drain()} is called once, at most C{drainRate} of
    them a second so that their clients reconnect to the successor spread
    out.
  - anything else is left to finish on its own terms.

A connection whose drain raises is logged and counted
(L{DrainResult.failed}); it is left to close on its own or be hammered, and
the others are drained as if nothing happened.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from txgrace._twisted import (
    h2ConnectionClass,
    h2StreamHandler,
    receivedAhead,
    setH2StreamHandler,
    unparsedBytes,
    wrappedHTTPChannel,
)
from txgrace.interfaces import IDrainable
from txgrace.websocket import registerWebSocketAdapters, upgradedProtocol

log = Logger()

IDLE_GRACE_SECONDS = 5.0
"""
How long an idle HTTP/1.1 connection must have been quiet to be closed by a
drain (gunicorn and tableflip keep one 5 s).
"""

IN_FLIGHT_POLL_SECONDS = 0.25
"""
How often a drain looks again at an HTTP/1.1 connection whose response is
being written, to treat it as idle once it is done.
"""

MOVE_POLL_SECONDS = (0.01, 0.5)
"""
How soon, and at most how long after, a drain looks again at a busy
connection that is to move to the successor: the wait doubles each time.
"""

FLUSH_POLL_SECONDS = 0.002
"""
How often a drain looks whether the last response of a connection that is
to move is all in the kernel.
"""

PACE_INTERVAL_SECONDS = 0.05
"""
How often a paced drain releases its next batch of long-lived connections.
"""

H2_GOAWAY_GRACE_SECONDS = 1.0
"""
How long an HTTP/2 connection goes on serving new streams after the first
GOAWAY: a client may have sent some before it read the GOAWAY.
"""

_H2_POLL_SECONDS = 0.05
_H2_MAX_STREAM_ID = 2**31 - 1


@dataclass(frozen=True)
class DrainResult:
    """
    What a drain did.

    @ivar opened: Connections open when the drain began.
    @ivar aborted: Connections aborted by the hammer.
    @ivar seconds: How long the drain took.
    @ivar failed: Connections whose drain raised an exception (each is
        logged).
    @ivar handedOff: Connections that moved to the successor.
    """

    opened: int
    aborted: int
    seconds: float
    failed: int = 0
    handedOff: int = 0


def applicationProtocol(connection: Any) -> Any:
    """
    The protocol that speaks for C{connection}, below any TLS layer and
    Twisted's HTTP/1.1-or-HTTP/2 switch.
    """
    protocol = getattr(connection, "protocol", None)
    for _ in range(8):
        if IDrainable(protocol, None) is not None:
            return protocol
        if isinstance(protocol, HTTPChannel):
            # An HTTP/1.1 channel upgraded to a websocket speaks for it.
            upgraded = upgradedProtocol(protocol)
            if upgraded is not None and IDrainable(upgraded, None) is not None:
                return upgraded
            return protocol
        inner = getattr(protocol, "wrappedProtocol", None)
        if inner is None:
            inner = wrappedHTTPChannel(protocol)
        if inner is None:
            return protocol
        protocol = inner
    return protocol


def _closeAfterLastReceived(channel: HTTPChannel) -> Callable[[Any, bytes], bool]:
    """
    What stands in for C{channel.checkPersistence} once a drain has begun:
    the last request received is answered with C{Connection: close}; any
    received before it, pipelined, are answered first.
    """
    original = channel.checkPersistence

    def checkPersistence(request: Any, version: bytes) -> bool:
        if receivedAhead(channel):
            return bool(original(request, version))
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    return checkPersistence


def requestsInFlight(connections: Any) -> int:
    """
    How many HTTP requests (HTTP/1.1 requests received and not yet
    answered, HTTP/2 streams) C{connections} carry now.
    """
    count = 0
    for connection in connections:
        protocol = applicationProtocol(connection)
        if isinstance(protocol, HTTPChannel):
            count += len(protocol.requests)
        elif _isH2(protocol):
            count += len(protocol.streams)
    return count


def _isH2(protocol: Any) -> bool:
    h2 = h2ConnectionClass()
    return h2 is not None and isinstance(protocol, h2)


class Drain:
    """
    One drain of a set of connections.

    @param clock: The time source.
    @param connections: The live set of open connections; it shrinks as they
        close, and L{connectionLost} must be called for each one that does.
    @param hammerTimeout: Seconds until the rest are aborted; C{0} aborts at
        once, and a negative value or L{None} never does.
    """

    def __init__(
        self,
        clock: IReactorTime,
        connections: set[Any],
        hammerTimeout: float | None,
        idleGrace: float = IDLE_GRACE_SECONDS,
        drainRate: float = 0.0,
        handoff: Any = None,
    ) -> None:
        self._clock = clock
        self._handoff = handoff
        self._drainRate = drainRate
        self._paced: deque[tuple[Any, Any]] = deque()
        self._pacer: IDelayedCall | None = None
        self._connections = connections
        self._hammerTimeout = hammerTimeout
        self._idleGrace = idleGrace
        self._drainingHTTP: set[Any] = set()
        self._watched: set[Any] = set()
        self._toMove: list[tuple[Any, Any]] = []
        self._held: set[Any] = set()
        self._moved: set[Any] = set()
        self._done: Deferred[DrainResult] = Deferred()
        self._started = 0.0
        self._opened = 0
        self._aborted: set[Any] = set()
        self._failed: set[Any] = set()
        self._calls: list[IDelayedCall] = []
        self._pruneAt = 1024
        self._finished = False

    def start(self) -> Deferred[DrainResult]:
        """
        Ask every connection to finish.

        @return: A Deferred that fires with a L{DrainResult} once every
            connection has closed.
        """
        self._started = self._clock.seconds()
        self._opened = len(self._connections)
        registerWebSocketAdapters()
        log.info("Draining {count} connections", count=self._opened)
        if self._hammerTimeout is not None and self._hammerTimeout >= 0:
            self._calls.append(self._clock.callLater(self._hammerTimeout, self.hammer))
        for connection in list(self._connections):
            self._guarded(connection, self._ask, connection)
        if self._toMove:
            # From the next reactor turn on: the successor hears GO first.
            self._calls.append(self._clock.callLater(0, self._moveAll))
        if self._paced:
            self._releasePaced()
        self._finishIfEmpty()
        return self._done

    def connectionLost(self, connection: Any) -> None:
        """
        A connection closed.
        """
        self._finishIfEmpty()

    def hammer(self) -> None:
        """
        Abort every connection that is still open, logging each one.
        """
        # abortConnection() takes effect on the next reactor turn: a second
        # hammer before then must not abort (or count) them again.
        # A connection in transit to the successor is not aborted: the
        # successor may own it already.
        moving = self._handoff.moving if self._handoff is not None else None
        remaining = [
            c
            for c in self._connections
            if c not in self._aborted and not (moving is not None and moving(c))
        ]
        if not remaining or self._finished:
            return
        now = self._clock.seconds()
        for connection in remaining:
            log.warn(
                "Hammer: aborting {peer} ({protocol}), open {age:.1f}s",
                peer=describePeer(connection),
                protocol=type(applicationProtocol(connection)).__name__,
                age=now - getattr(connection, "openedAt", now),
            )
            self._aborted.add(connection)
            connection.abortConnection()
        log.warn("Hammer: aborted {count} connections", count=len(remaining))

    def abandon(self) -> None:
        """
        Give the drain up (the process serves again): no hammer, no result.
        The connections already asked to finish still finish.
        """
        self._finished = True
        for call in self._calls:
            if call.active():
                call.cancel()
        # Those held back to move, and not sent, are read again here.
        for connection in self._held:
            if connection in self._connections and not getattr(connection, "disconnected", False):
                connection.startReading()
        self._held.clear()

    def _later(
        self, delay: float, connection: Any, f: Callable[..., Any], *args: Any
    ) -> None:
        """
        Call C{f(*args)} for C{connection} after C{delay} seconds, unless the
        drain is done by then; a failure counts against C{connection}.
        """
        if len(self._calls) >= self._pruneAt:
            # Amortised: a drain of 10k connections schedules 10k calls.
            self._calls = [call for call in self._calls if call.active()]
            self._pruneAt = max(1024, 2 * len(self._calls))
        self._calls.append(
            self._clock.callLater(delay, self._guarded, connection, f, *args)
        )

    def _guarded(self, connection: Any, f: Callable[..., Any], *args: Any) -> None:
        """
        Call C{f(*args)}, one step of draining C{connection}: if it raises,
        log it and count the connection as failed, and go on with the rest.
        """
        try:
            f(*args)
        except Exception:
            self._failed.add(connection)
            log.failure(
                "Draining {peer} ({protocol}) failed; it is left to close on "
                "its own",
                peer=describePeer(connection),
                protocol=type(applicationProtocol(connection)).__name__,
            )

    def _ask(self, connection: Any) -> None:
        if self._handoff is not None:
            handoff = self._handoff.handoffFor(connection)
            if handoff is not None:
                self._toMove.append((connection, handoff))
                return
        self._askToFinish(connection)

    def _moveAll(self) -> None:
        toMove, self._toMove = self._toMove, []
        for connection, handoff in toMove:
            self._guarded(connection, self._move, connection, handoff, MOVE_POLL_SECONDS[0])

    def _move(self, connection: Any, handoff: Any, wait: float) -> None:
        """
        Pass C{connection} to the successor once it is between two
        exchanges; drain it here if the successor does not take it.
        """
        if connection not in self._connections or self._finished:
            return
        if connection in self._moved:
            return  # Told it came to rest, and looked again on a timer too.
        state = self._handoff.readyToMove(connection, handoff)
        if state is None:
            if connection not in self._watched:
                self._watched.add(connection)
                notifyAtRest = getattr(handoff, "notifyAtRest", None)
                if notifyAtRest is not None:
                    notifyAtRest(
                        lambda: self._guarded(
                            connection, self._move, connection, handoff, MOVE_POLL_SECONDS[0]
                        )
                    )
            self._later(
                wait, connection, self._move, connection, handoff,
                min(wait * 2, MOVE_POLL_SECONDS[1]),
            )
            return
        if not self._handoff.flushed(connection):
            # At rest, but its last response is not all in the kernel yet:
            # read nothing more (what the client sends next waits in the
            # kernel), and move it once the response is out.
            connection.stopReading()
            self._held.add(connection)
            self._later(FLUSH_POLL_SECONDS, connection, self._move, connection, handoff, wait)
            return
        self._moved.add(connection)
        self._held.discard(connection)

        def moved(took: bool) -> None:
            if not took and connection in self._connections:
                self._guarded(connection, self._askToFinish, connection)

        self._handoff.move(connection, state).addCallback(moved)

    def _askToFinish(self, connection: Any) -> None:
        protocol = applicationProtocol(connection)
        drainable = IDrainable(protocol, None)
        if drainable is not None:
            if self._drainRate > 0:
                self._paced.append((connection, drainable))  # See start().
            else:
                drainable.drain()
        elif isinstance(protocol, HTTPChannel):
            self._drainHTTP11(connection, protocol)
        elif _isH2(protocol):
            self._drainH2(connection, protocol)

    def _releasePaced(self) -> None:
        """
        Ask the next batch of long-lived connections to close: at most
        C{drainRate} a second, so that their clients do not all reconnect to
        the successor in the same instant.
        """
        self._pacer = None
        if self._finished:
            return
        batch = max(1, int(self._drainRate * PACE_INTERVAL_SECONDS))
        for _ in range(batch):
            if not self._paced:
                break
            connection, drainable = self._paced.popleft()
            if connection in self._connections:
                self._guarded(connection, drainable.drain)
        if self._paced:
            self._pacer = self._clock.callLater(
                batch / self._drainRate, self._releasePaced
            )
            self._calls.append(self._pacer)

    def _drainHTTP11(self, connection: Any, channel: HTTPChannel) -> None:
        if connection not in self._connections:
            return
        if connection not in self._drainingHTTP:
            self._drainingHTTP.add(connection)
            channel.checkPersistence = _closeAfterLastReceived(channel)  # type: ignore[method-assign]
        if channel.requests:
            head = channel.requests[0]
            if len(channel.requests) == 1 and not head.startedWriting and not receivedAhead(channel):
                # The last request: the client gets the whole response, then
                # EOF.  (Never on an idle channel: it would swallow the next
                # request.)
                channel.persistent = False
                head.responseHeaders.setRawHeaders(b"connection", [b"close"])
                return
            # A response already under way (the client was promised
            # keep-alive), or pipelined requests to answer first: look
            # again once they are done.
            self._later(
                IN_FLIGHT_POLL_SECONDS, connection, self._drainHTTP11, connection, channel
            )
            return
        if not channel.persistent:
            return  # It closes after its last response.
        quiet = connection.quietSeconds(self._clock.seconds())
        if quiet >= self._idleGrace and not unparsedBytes(channel):
            channel.loseConnection()
        else:
            self._later(
                max(self._idleGrace - quiet, 0.01),
                connection,
                self._drainHTTP11,
                connection,
                channel,
            )

    def _drainH2(self, connection: Any, h2: Any) -> None:
        # Announce the shutdown, but serve what the client sent before it
        # read this (RFC 9113, 6.8).
        _writeGoAway(h2, _H2_MAX_STREAM_ID)
        self._later(
            H2_GOAWAY_GRACE_SECONDS, connection, self._refuseNewH2Streams,
            connection, h2,
        )

    def _refuseNewH2Streams(self, connection: Any, h2: Any) -> None:
        from h2.errors import ErrorCodes

        if connection not in self._connections:
            return
        lastStreamID = h2.conn.highest_inbound_stream_id
        _writeGoAway(h2, lastStreamID)
        serveStream = h2StreamHandler(h2, "received")

        def refuseLaterStreams(event: Any) -> None:
            # A stream the client opened before it saw this GOAWAY is
            # refused, so the client knows it was not processed and may
            # retry it.
            if event.stream_id > lastStreamID:
                h2.conn.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
                h2.transport.write(h2.conn.data_to_send())
            else:
                serveStream(event)

        setH2StreamHandler(h2, "received", refuseLaterStreams)
        for event in ("data", "ended"):
            setH2StreamHandler(
                h2,
                event,
                _ignoringRefused(h2, h2StreamHandler(h2, event), lastStreamID),
            )
        self._closeH2WhenIdle(connection, h2)

    def _closeH2WhenIdle(self, connection: Any, h2: Any) -> None:
        if connection not in self._connections:
            return
        if h2.streams:
            self._later(
                _H2_POLL_SECONDS, connection, self._closeH2WhenIdle, connection, h2
            )
        else:
            # H2Connection registers itself as the transport's producer, and
            # TLS postpones its close until the producer is gone.
            try:
                h2.transport.unregisterProducer()
            except RuntimeError:
                pass  # Some transports refuse when none is registered.
            h2.transport.loseConnection()

    def _finishIfEmpty(self) -> None:
        if self._connections or self._finished:
            return
        self._finished = True
        for call in self._calls:
            if call.active():
                call.cancel()
        result = DrainResult(
            self._opened,
            len(self._aborted),
            self._clock.seconds() - self._started,
            len(self._failed),
            self._handoff.handedOff if self._handoff is not None else 0,
        )
        log.info(
            "Drained {opened} connections in {seconds}s: handed off "
            "{handedOff}, aborted {aborted}, failed {failed}",
            opened=result.opened,
            seconds=round(result.seconds, 3),
            handedOff=result.handedOff,
            aborted=result.aborted,
            failed=result.failed,
        )
        self._done.callback(result)


def _writeGoAway(h2: Any, lastStreamID: int) -> None:
    """
    Write a GOAWAY frame (NO_ERROR) with C{lastStreamID} on C{h2}'s
    transport.  h2's C{close_connection()} would forbid the frames of the
    streams that are still open, so the frame goes straight to the
    transport.
    """
    from hyperframe.frame import GoAwayFrame

    goAway = GoAwayFrame(0)
    goAway.last_stream_id = lastStreamID
    goAway.error_code = 0
    h2.transport.write(goAway.serialize())


def _ignoringRefused(
    h2: Any, handler: Callable[[Any], None], lastStreamID: int
) -> Callable[[Any], None]:
    """
    Wrap an H2Connection stream-event handler so that it skips the events of
    the streams refused after a GOAWAY (they arrive in the same batch).
    """

    def handle(event: Any) -> None:
        if event.stream_id <= lastStreamID or event.stream_id in h2.streams:
            handler(event)

    return handle


def describePeer(connection: Any) -> str:
    """
    C{connection}'s peer for a log line: C{host:port}, a UNIX socket's
    name, or C{?}.
    """
    try:
        peer = connection.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    if host is not None:
        return f"{host}:{peer.port}"
    return str(getattr(peer, "name", peer))


def drainConnections(
    clock: IReactorTime,
    registry: Any,
    hammerTimeout: float | None,
    drainRate: float = 0.0,
    idleGrace: float = IDLE_GRACE_SECONDS,
    handoff: Any = None,
) -> tuple[Drain, Deferred[DrainResult]]:
    """
    Drain every connection in C{registry}, following it as they close.

    @param drainRate: Long-lived connections asked to close per second
        (C{0}: all at once).
    @param idleGrace: Seconds an idle HTTP/1.1 connection is kept.
    @param handoff: A L{txgrace.handoff.HandoffSender} to move connections
        to the successor through, or L{None}.
    @return: The drain (to L{Drain.hammer} early) and its result.
    """
    drain = Drain(
        clock,
        registry.connections,
        hammerTimeout,
        idleGrace=idleGrace,
        drainRate=drainRate,
        handoff=handoff,
    )
    registry.addConnectionLostObserver(drain.connectionLost)

    def stopObserving(result: DrainResult) -> DrainResult:
        registry.removeConnectionLostObserver(drain.connectionLost)
        return result

    return drain, drain.start().addBoth(stopObserving)


