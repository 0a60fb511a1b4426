"""
Tests for L{txgrace.drain}: L{Drain} run against a L{Clock} and a set of fake
connections, with real L{HTTPChannel}s (and, when h2 is installed, a real
L{twisted.web._http2.H2Connection}) on L{StringTransport}s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from txgrace import drain as drainModule
from txgrace._twisted import h2ConnectionClass, wrappedHTTPChannel
from txgrace.drain import (
    IN_FLIGHT_POLL_SECONDS,
    H2_GOAWAY_GRACE_SECONDS,
    IDLE_GRACE_SECONDS,
    Drain,
    DrainResult,
    applicationProtocol,
)
from txgrace.interfaces import IDrainable

H2Connection = h2ConnectionClass()
MAX_STREAM_ID = 2**31 - 1
REFUSED_STREAM = 7

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class FakeConnection:
    """
    Stands in for a tracked server transport (see L{txgrace.adopt}): it has
    the attributes a drain reads and, when it closes, leaves the shared set
    and tells the drain, as L{txgrace.adopt.SocketRegistry} would.
    """

    def __init__(
        self,
        connections: set[Any],
        clock: Clock,
        protocol: Any,
        transport: StringTransport | None = None,
    ) -> None:
        self.connections = connections
        self.clock = clock
        self.protocol = protocol
        self.transport = transport
        self.openedAt = self.lastActive = clock.seconds()
        self.drain: Drain | None = None
        self.aborted = False
        self.closed = False
        connections.add(self)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.1", 40000)

    def quietSeconds(self, now: float) -> float:
        return now - self.lastActive

    def abortConnection(self) -> None:
        self.aborted = True
        self.close(Failure(ConnectionAborted()))

    def close(self, reason: Failure | None = None) -> None:
        """
        The connection closed: leave the set, tell the protocol and the drain.
        """
        if self.closed:
            return
        self.closed = True
        self.connections.discard(self)
        if self.transport is not None:
            self.transport.disconnecting = True
            self.protocol.connectionLost(reason or Failure(ConnectionDone()))
        if self.drain is not None:
            self.drain.connectionLost(self)

    def closeIfDisconnecting(self) -> bool:
        """
        Finish the close the protocol asked for with C{loseConnection}.

        @return: Whether it had asked.
        """
        if self.transport is not None and self.transport.disconnecting:
            self.close()
            return True
        return False


class AsyncAbortConnection(FakeConnection):
    """
    A connection whose abort completes on the next turn of the clock, as
    with Twisted's TCP transports.
    """

    aborts = 0

    def abortConnection(self) -> None:
        self.aborts += 1
        self.aborted = True
        self.clock.callLater(0, self.close, Failure(ConnectionAborted()))


class SyncResource(Resource):
    """
    Answers every request at once with C{ok}.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-length", b"2")
        return b"ok"


class DeferredResource(Resource):
    """
    Keeps every request open (C{NOT_DONE_YET}) for the test to finish.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> object:
        self.requests.append(request)
        return NOT_DONE_YET


class PlainProtocol(Protocol):
    """
    A protocol the drain knows nothing about.
    """


class DrainBroke(Exception):
    """
    Raised by L{BrokenDrainable.drain}.
    """


@implementer(IDrainable)
class BrokenDrainable(Protocol):
    """
    An L{IDrainable} whose C{drain()} raises L{DrainBroke}.
    """

    def drain(self) -> None:
        raise DrainBroke("cannot drain")


@implementer(IDrainable)
class DrainableProtocol(Protocol):
    """
    Counts the calls of L{IDrainable.drain}; optionally closes on it.
    """

    def __init__(self, closeOnDrain: FakeConnection | None = None) -> None:
        self.drains = 0
        self.closeOnDrain = closeOnDrain

    def drain(self) -> None:
        self.drains += 1
        if self.closeOnDrain is not None:
            self.closeOnDrain.close()


def parseResponses(data: bytes) -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
    """
    Split the bytes an HTTP/1.1 server wrote into responses that carry a
    C{Content-Length}.

    @return: (status line, lower-cased headers, body) for each response.
    """
    responses = []
    while data:
        head, separator, rest = data.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"incomplete response head: {data!r}")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers[b"content-length"])
        if len(rest) < length:
            raise AssertionError(f"truncated body: {rest!r}")
        responses.append((lines[0], headers, rest[:length]))
        data = rest[length:]
    return responses


class DrainTestsMixin:
    """
    Builds connections in a shared set and drains them with a L{Clock}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.connections: set[Any] = set()

    def plainConnection(self, protocol: Any = None) -> FakeConnection:
        """
        A connection whose protocol the drain does not know.
        """
        return FakeConnection(
            self.connections, self.clock, protocol or PlainProtocol()
        )

    def httpConnection(
        self, resource: Resource | None = None
    ) -> tuple[FakeConnection, HTTPChannel, StringTransport]:
        """
        A connection carrying a real HTTP/1.1 channel (below Twisted's
        HTTP/1.1-or-HTTP/2 switch, as L{Site.buildProtocol} makes it).
        """
        site = Site(resource or SyncResource(), reactor=self.clock)
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        connection = FakeConnection(self.connections, self.clock, protocol, transport)
        channel = applicationProtocol(connection)
        self.assertIsInstance(channel, HTTPChannel)
        self.addCleanup(connection.close)
        return connection, channel, transport

    def drain(self, hammerTimeout: float | None = 60.0, **kwargs: Any) -> Drain:
        """
        A drain of every connection made so far.
        """
        drain = Drain(self.clock, self.connections, hammerTimeout, **kwargs)
        for connection in self.connections:
            connection.drain = drain
        return drain

    def captureLog(self) -> list[dict[str, Any]]:
        """
        The events that L{txgrace.drain} logs from now on (they go nowhere
        else).
        """
        events: list[dict[str, Any]] = []
        self.patch(drainModule, "log", Logger(observer=events.append))  # type: ignore[attr-defined]
        return events

    def failures(self, events: list[dict[str, Any]]) -> list[tuple[type, str, str]]:
        """
        The exception type, peer and protocol of each logged failure.
        """
        return [
            (e["log_failure"].type, e["peer"], e["protocol"])
            for e in events
            if "log_failure" in e
        ]

    def settle(self) -> None:
        """
        Close the connections whose protocol asked to close.
        """
        for connection in list(self.connections):
            connection.closeIfDisconnecting()


class DrainBasicsTests(DrainTestsMixin, SynchronousTestCase):
    """
    L{Drain} with no connections, with connections that close on their own,
    and the hammer.
    """

    def test_noConnections(self) -> None:
        """
        With no connections open, the drain is done at once and leaves no
        timer behind.
        """
        d = self.drain().start()
        self.assertEqual(self.successResultOf(d), DrainResult(0, 0, 0.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closesOnItsOwn(self) -> None:
        """
        A connection that closes on its own ends the drain without an abort,
        the result counts how long it took, and the hammer is cancelled.
        """
        connection = self.plainConnection()
        d = self.drain(hammerTimeout=30).start()
        self.assertNoResult(d)
        self.clock.advance(2.5)
        connection.close()
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 2.5))
        self.assertFalse(connection.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hammerAtDeadline(self) -> None:
        """
        A connection still open at the hammer deadline is aborted, and not
        a moment before.
        """
        connection = self.plainConnection()
        d = self.drain(hammerTimeout=30).start()
        self.clock.advance(29.9)
        self.assertFalse(connection.aborted)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertTrue(connection.aborted)
        result = self.successResultOf(d)
        self.assertEqual((result.opened, result.aborted), (1, 1))
        self.assertEqual(result.seconds, 30)

    def test_hammerTimeoutZero(self) -> None:
        """
        A hammer timeout of 0 aborts as soon as the clock runs.
        """
        connections = [self.plainConnection() for _ in range(3)]
        d = self.drain(hammerTimeout=0).start()
        self.clock.advance(0)
        self.assertTrue(all(c.aborted for c in connections))
        self.assertEqual(self.successResultOf(d), DrainResult(3, 3, 0.0))

    def test_negativeHammerTimeoutNeverAborts(self) -> None:
        """
        A negative hammer timeout never aborts; nothing is even scheduled.
        """
        connection = self.plainConnection()
        d = self.drain(hammerTimeout=-1).start()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10**7)
        self.assertFalse(connection.aborted)
        self.assertNoResult(d)
        connection.close()
        self.assertEqual(self.successResultOf(d).aborted, 0)

    def test_noneHammerTimeoutNeverAborts(self) -> None:
        """
        A hammer timeout of L{None} never aborts.
        """
        connection = self.plainConnection()
        d = self.drain(hammerTimeout=None).start()
        self.clock.advance(10**7)
        self.assertFalse(connection.aborted)
        self.assertNoResult(d)
        connection.close()
        self.assertEqual(self.successResultOf(d).aborted, 0)

    def test_hammerEarly(self) -> None:
        """
        L{Drain.hammer} aborts every connection at once, and cancels the
        deadline.
        """
        first, second = self.plainConnection(), self.plainConnection()
        drain = self.drain(hammerTimeout=60)
        d = drain.start()
        self.clock.advance(5)
        drain.hammer()
        self.assertTrue(first.aborted and second.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(2, 2, 5.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hammerCountsOnlyTheRest(self) -> None:
        """
        Connections that closed before the hammer are not counted as aborted.
        """
        gone, stays = self.plainConnection(), self.plainConnection()
        d = self.drain(hammerTimeout=10).start()
        gone.close()
        self.clock.advance(10)
        self.assertFalse(gone.aborted)
        self.assertTrue(stays.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(2, 1, 10.0))

    def test_hammerAfterDoneDoesNothing(self) -> None:
        """
        L{Drain.hammer} after the drain is done aborts nothing.
        """
        connection = self.plainConnection()
        drain = self.drain()
        d = drain.start()
        connection.close()
        drain.hammer()
        self.assertEqual(self.successResultOf(d).aborted, 0)

    def test_drainableDrainedOnce(self) -> None:
        """
        A protocol providing L{IDrainable} has C{drain()} called exactly once,
        and is then left to close on its own.
        """
        protocol = DrainableProtocol()
        connection = self.plainConnection(protocol)
        d = self.drain(hammerTimeout=60).start()
        self.assertEqual(protocol.drains, 1)
        self.clock.advance(30)
        self.assertEqual(protocol.drains, 1)
        self.assertFalse(connection.aborted)
        connection.close()
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 30.0))
        self.assertEqual(protocol.drains, 1)

    def test_drainableBelowTLS(self) -> None:
        """
        An L{IDrainable} below a wrapping protocol (such as TLS) is found and
        drained.
        """
        protocol = DrainableProtocol()
        wrapper = PlainProtocol()
        wrapper.wrappedProtocol = protocol  # type: ignore[attr-defined]
        self.plainConnection(wrapper)
        self.drain().start()
        self.assertEqual(protocol.drains, 1)

    def test_unknownProtocolLeftAlone(self) -> None:
        """
        A protocol the drain does not know is neither closed nor aborted
        until the hammer.
        """
        transport = StringTransport()
        protocol = PlainProtocol()
        protocol.makeConnection(transport)
        connection = FakeConnection(
            self.connections, self.clock, protocol, transport
        )
        d = self.drain(hammerTimeout=60).start()
        self.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        self.assertFalse(connection.aborted)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(connection.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(1, 1, 60.0))

    def test_drainableClosingAtOnceLeavesNoTimer(self) -> None:
        """
        When every connection closes while the drain asks it to (here an
        L{IDrainable} that closes inside C{drain()}), the drain is done and
        leaves no hammer timer behind.
        """
        connection = FakeConnection(self.connections, self.clock, None)
        connection.protocol = DrainableProtocol(closeOnDrain=connection)
        d = self.drain(hammerTimeout=60).start()
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 0.0))
        self.assertEqual(self.clock.getDelayedCalls(), [])



    def test_drainableRaisingIsolated(self) -> None:
        """
        An L{IDrainable} whose C{drain()} raises is logged with its peer and
        protocol and counted as failed; every other connection is still
        drained, and the broken one is left open until the hammer.
        """
        events = self.captureLog()
        broken = self.plainConnection(BrokenDrainable())
        others = []
        for _ in range(3):
            connection = FakeConnection(self.connections, self.clock, None)
            connection.protocol = DrainableProtocol(closeOnDrain=connection)
            others.append(connection)
        d = self.drain(hammerTimeout=60).start()
        self.assertEqual([c.protocol.drains for c in others], [1, 1, 1])
        self.assertEqual(self.connections, {broken})
        self.assertEqual(
            self.failures(events),
            [(DrainBroke, "192.0.2.1:40000", "BrokenDrainable")],
        )
        self.assertFalse(broken.aborted)
        self.clock.advance(60)
        self.assertTrue(broken.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(4, 1, 60.0, 1))

    def test_hammerTwiceBeforeAbortsComplete(self) -> None:
        """
        A real TCP transport's C{abortConnection} closes the connection on the
        next reactor turn.  Hammering twice before that (a second stop
        signal, or the deadline in the same turn) aborts each connection
        once and counts it once.
        """
        connection = AsyncAbortConnection(self.connections, self.clock, PlainProtocol())
        drain = self.drain(hammerTimeout=60)
        d = drain.start()
        drain.hammer()
        drain.hammer()
        self.clock.advance(0)
        self.assertEqual(connection.aborts, 1)
        self.assertEqual(self.successResultOf(d), DrainResult(1, 1, 0.0))



class ApplicationProtocolTests(SynchronousTestCase):
    """
    L{applicationProtocol} finds the protocol that speaks for a connection.
    """

    def connection(self, protocol: Any) -> Any:
        """
        An object whose C{protocol} is C{protocol}.
        """
        holder = FakeConnection(set(), Clock(), protocol)
        return holder

    def test_plain(self) -> None:
        """
        A protocol that wraps nothing is its own application protocol.
        """
        protocol = PlainProtocol()
        self.assertIs(applicationProtocol(self.connection(protocol)), protocol)

    def test_noProtocol(self) -> None:
        """
        A connection without a protocol yields L{None}.
        """

        class Bare:
            pass

        self.assertIsNone(applicationProtocol(Bare()))

    def test_wrappedProtocol(self) -> None:
        """
        A wrapper (like TLS) is unwrapped through C{wrappedProtocol}.
        """
        inner = PlainProtocol()
        tls = PlainProtocol()
        tls.wrappedProtocol = inner  # type: ignore[attr-defined]
        self.assertIs(applicationProtocol(self.connection(tls)), inner)

    def test_channel(self) -> None:
        """
        Twisted's HTTP/1.1-or-HTTP/2 switch is unwrapped, down to its
        L{HTTPChannel}.
        """
        switch = Site(SyncResource(), reactor=Clock()).buildProtocol(None)
        found = applicationProtocol(self.connection(switch))
        self.assertIsInstance(found, HTTPChannel)
        self.assertIs(found, wrappedHTTPChannel(switch))

    def test_otherChannelAttributeIgnored(self) -> None:
        """
        A protocol that is not Twisted's switch is not unwrapped, whatever
        attributes it has.
        """
        protocol = PlainProtocol()
        protocol._channel = PlainProtocol()  # type: ignore[attr-defined]
        self.assertIs(applicationProtocol(self.connection(protocol)), protocol)

    def test_tlsThenChannel(self) -> None:
        """
        Both layers are unwrapped: TLS, then the switch, down to a real
        L{HTTPChannel} made by L{Site.buildProtocol}.
        """
        switch = Site(SyncResource(), reactor=Clock()).buildProtocol(None)
        tls = PlainProtocol()
        tls.wrappedProtocol = switch  # type: ignore[attr-defined]
        found = applicationProtocol(self.connection(tls))
        self.assertIsInstance(found, HTTPChannel)
        self.assertIs(found, wrappedHTTPChannel(switch))

    def test_stopsAtDrainable(self) -> None:
        """
        Unwrapping stops at an L{IDrainable}, even if it wraps something.
        """
        drainable = DrainableProtocol()
        drainable.wrappedProtocol = PlainProtocol()  # type: ignore[attr-defined]
        tls = PlainProtocol()
        tls.wrappedProtocol = drainable  # type: ignore[attr-defined]
        self.assertIs(applicationProtocol(self.connection(tls)), drainable)


class HTTP11DrainTests(DrainTestsMixin, SynchronousTestCase):
    """
    Draining real HTTP/1.1 channels.
    """

    def test_idleQuietClosedAtOnce(self) -> None:
        """
        An idle connection quiet for L{IDLE_GRACE_SECONDS} is closed at once,
        without a byte written.
        """
        connection, channel, transport = self.httpConnection()
        connection.lastActive = self.clock.seconds() - IDLE_GRACE_SECONDS
        d = self.drain().start()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.settle()
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 0.0))

    def test_idleAfterARequestClosedAtOnce(self) -> None:
        """
        A keep-alive connection that answered a request long ago is closed at
        once.
        """
        connection, channel, transport = self.httpConnection()
        channel.dataReceived(REQUEST)
        self.assertEqual(len(parseResponses(transport.value())), 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(5)
        connection.lastActive = self.clock.seconds() - 5
        self.drain().start()
        self.assertTrue(transport.disconnecting)

    def test_idleRecentlyActiveClosedLater(self) -> None:
        """
        An idle connection active a moment ago is left open for
        L{IDLE_GRACE_SECONDS}, then closed.
        """
        connection, channel, transport = self.httpConnection()
        connection.lastActive = self.clock.seconds()
        d = self.drain().start()
        self.assertFalse(transport.disconnecting)
        self.clock.advance(IDLE_GRACE_SECONDS / 2)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(IDLE_GRACE_SECONDS / 2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.settle()
        result = self.successResultOf(d)
        self.assertEqual((result.opened, result.aborted), (1, 0))

    def test_idleQuietSecondsParameter(self) -> None:
        """
        C{idleGrace} replaces L{IDLE_GRACE_SECONDS}.
        """
        connection, channel, transport = self.httpConnection()
        connection.lastActive = self.clock.seconds()
        self.drain(idleGrace=5).start()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_requestDuringGracePeriod(self) -> None:
        """
        A request that arrives on a recently active idle connection during
        the drain is answered in full with C{Connection: close}, and the
        connection closes after the response: the request is not swallowed.
        """
        connection, channel, transport = self.httpConnection()
        connection.lastActive = self.clock.seconds()
        d = self.drain().start()
        self.clock.advance(IDLE_GRACE_SECONDS / 2)
        channel.dataReceived(REQUEST)
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body, b"ok")
        self.assertTrue(transport.disconnecting)
        self.settle()
        self.assertEqual(self.successResultOf(d).aborted, 0)
        self.clock.advance(IDLE_GRACE_SECONDS)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requestInPiecesDuringGracePeriod(self) -> None:
        """
        A request line that has only partly arrived when the grace period
        ends keeps the connection open; the request is then answered with
        C{Connection: close}.
        """
        connection, channel, transport = self.httpConnection()
        connection.lastActive = self.clock.seconds()
        self.drain().start()
        channel.dataReceived(REQUEST[:5])
        self.clock.advance(IDLE_GRACE_SECONDS)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(REQUEST[5:])
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body, b"ok")
        self.assertTrue(transport.disconnecting)

    def test_slowRequestDuringGracePeriod(self) -> None:
        """
        A request that arrives during the grace period and is still in flight
        when the period ends is not cut off: it is answered in full with
        C{Connection: close}, then the connection closes.
        """
        resource = DeferredResource()
        connection, channel, transport = self.httpConnection(resource)
        connection.lastActive = self.clock.seconds()
        self.drain().start()
        channel.dataReceived(REQUEST)
        [request] = resource.requests
        self.clock.advance(IDLE_GRACE_SECONDS * 5)
        self.assertFalse(transport.disconnecting)
        request.setHeader(b"content-length", b"4")
        request.write(b"slow")
        request.finish()
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body, b"slow")
        self.assertTrue(transport.disconnecting)

    def test_headersInPiecesWhenDrainStarts(self) -> None:
        """
        A request whose headers are still arriving when the drain starts is
        answered with C{Connection: close}.
        """
        connection, channel, transport = self.httpConnection()
        connection.lastActive = self.clock.seconds() - 10
        channel.dataReceived(REQUEST[:20])
        self.drain().start()
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(REQUEST[20:])
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body, b"ok")
        self.assertTrue(transport.disconnecting)

    def test_inFlightRequest(self) -> None:
        """
        A request in flight when the drain starts gets its whole response,
        with C{Connection: close}, and then the connection closes.
        """
        resource = DeferredResource()
        connection, channel, transport = self.httpConnection(resource)
        channel.dataReceived(REQUEST)
        [request] = resource.requests
        d = self.drain().start()
        self.clock.advance(IDLE_GRACE_SECONDS * 3)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        request.setHeader(b"content-length", b"11")
        request.write(b"hello ")
        self.assertFalse(transport.disconnecting)
        request.write(b"world")
        request.finish()
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(body, b"hello world")
        self.assertTrue(transport.disconnecting)
        self.settle()
        self.assertEqual(
            self.successResultOf(d), DrainResult(1, 0, IDLE_GRACE_SECONDS * 3)
        )

    def test_inFlightRequestChunked(self) -> None:
        """
        A chunked response in flight ends with its last chunk, as it began
        (the client was promised keep-alive); the connection is then idle,
        not closed at once: a request sent right after is answered with
        C{Connection: close}.
        """
        resource = DeferredResource()
        connection, channel, transport = self.httpConnection(resource)
        channel.dataReceived(REQUEST)
        [request] = resource.requests
        request.write(b"hello")
        self.drain().start()
        request.finish()
        self.assertTrue(transport.value().endswith(b"5\r\nhello\r\n0\r\n\r\n"))
        self.assertFalse(transport.disconnecting)
        transport.clear()
        self.clock.advance(IN_FLIGHT_POLL_SECONDS)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(REQUEST)
        [next] = resource.requests[1:]
        next.setHeader(b"content-length", b"2")
        next.write(b"ok")
        next.finish()
        [(status, headers, body)] = parseResponses(transport.value())
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(transport.disconnecting)

    def test_inFlightStreamThenQuiet(self) -> None:
        """
        A connection whose streamed response ended during the drain, and
        that then stays quiet, closes once the idle grace has passed since
        it was last active.
        """
        resource = DeferredResource()
        connection, channel, transport = self.httpConnection(resource)
        channel.dataReceived(REQUEST)
        [request] = resource.requests
        request.write(b"hello")
        d = self.drain().start()
        request.finish()
        connection.lastActive = self.clock.seconds()
        self.clock.advance(IDLE_GRACE_SECONDS - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1.5)
        self.assertTrue(transport.disconnecting)
        self.settle()
        self.assertEqual(self.successResultOf(d).aborted, 0)

    def test_inFlightRequestHammered(self) -> None:
        """
        A request that is still in flight at the deadline is aborted.
        """
        resource = DeferredResource()
        connection, channel, transport = self.httpConnection(resource)
        channel.dataReceived(REQUEST)
        d = self.drain(hammerTimeout=10).start()
        self.clock.advance(10)
        self.assertTrue(connection.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(1, 1, 10.0))

    def test_failureIsolated(self) -> None:
        """
        An HTTP/1.1 connection whose drain raises, at once or when its quiet
        time is up, is logged and counted; the others close as usual.
        """
        events = self.captureLog()
        atOnce, _, _ = self.httpConnection()

        def noKernel(now: float) -> float:
            raise OSError("no TCP_INFO")

        atOnce.quietSeconds = noKernel  # type: ignore[method-assign]
        later, laterChannel, _ = self.httpConnection()
        later.lastActive = self.clock.seconds()

        def cannotClose() -> None:
            raise RuntimeError("cannot close")

        laterChannel.loseConnection = cannotClose  # type: ignore[method-assign]
        idle, _, idleTransport = self.httpConnection()
        idle.lastActive -= 60
        d = self.drain(hammerTimeout=30).start()
        self.assertTrue(idleTransport.disconnecting)
        self.settle()
        self.clock.advance(IDLE_GRACE_SECONDS)
        self.assertEqual(
            sorted(self.failures(events), key=lambda f: f[0].__name__),
            [
                (OSError, "192.0.2.1:40000", "HTTPChannel"),
                (RuntimeError, "192.0.2.1:40000", "HTTPChannel"),
            ],
        )
        self.assertEqual(self.connections, {atOnce, later})
        self.clock.advance(30 - IDLE_GRACE_SECONDS)
        self.assertEqual(self.successResultOf(d), DrainResult(3, 2, 30.0, 2))

    def test_mixed(self) -> None:
        """
        Idle, recently active, in flight and unknown connections each get
        their treatment in one drain.
        """
        idle, _, idleTransport = self.httpConnection()
        idle.lastActive -= 60
        recent, _, recentTransport = self.httpConnection()
        resource = DeferredResource()
        busy, busyChannel, busyTransport = self.httpConnection(resource)
        busyChannel.dataReceived(REQUEST)
        unknown = self.plainConnection()
        d = self.drain(hammerTimeout=30).start()
        self.assertTrue(idleTransport.disconnecting)
        self.assertFalse(recentTransport.disconnecting)
        self.settle()
        self.clock.advance(IDLE_GRACE_SECONDS)
        self.assertTrue(recentTransport.disconnecting)
        self.settle()
        resource.requests[0].finish()
        self.assertTrue(busyTransport.disconnecting)
        self.settle()
        self.assertEqual(self.connections, {unknown})
        self.clock.advance(30 - IDLE_GRACE_SECONDS)
        self.assertTrue(unknown.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(4, 1, 30.0))


def framesFromBytes(data: bytes) -> list[Any]:
    """
    Parse the HTTP/2 frames in C{data}.
    """
    from hyperframe.frame import Frame

    frames = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(frame)
        data = data[9 + length :]
    return frames


class HTTP2DrainTests(DrainTestsMixin, SynchronousTestCase):
    """
    Draining a real L{twisted.web._http2.H2Connection}.
    """

    if H2Connection is None:
        skip = "HTTP/2 support (h2) is not installed"

    def h2Connection(
        self, resource: Resource
    ) -> tuple[FakeConnection, Any, StringTransport, Any]:
        """
        A connection carrying a server-side H2Connection, and an h2 client to
        talk to it.
        """
        import h2.config
        import h2.connection

        site = Site(resource, reactor=self.clock)
        server = H2Connection(self.clock)  # type: ignore[misc]
        server.site = site
        server.factory = site
        server.requestFactory = site.requestFactory
        server.callLater = self.clock.callLater
        transport = StringTransport()
        server.makeConnection(transport)
        client = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True)
        )
        client.initiate_connection()
        server.dataReceived(client.data_to_send())
        connection = FakeConnection(self.connections, self.clock, server, transport)
        self.addCleanup(connection.close)
        return connection, server, transport, client

    def request(self, client: Any, server: Any, streamID: int) -> None:
        """
        Send a GET on C{streamID}.
        """
        client.send_headers(
            streamID,
            [(":method", "GET"), (":path", "/"), (":scheme", "https"),
             (":authority", "x")],
            end_stream=True,
        )
        server.dataReceived(client.data_to_send())

    def goAways(self, transport: StringTransport) -> list[tuple[int, int]]:
        """
        The (error code, last stream id) of each GOAWAY written so far.
        """
        from hyperframe.frame import GoAwayFrame

        return [
            (f.error_code, f.last_stream_id)
            for f in framesFromBytes(transport.value())
            if isinstance(f, GoAwayFrame)
        ]

    def answered(self, transport: StringTransport, streamID: int) -> bytes:
        """
        The body of the complete response on C{streamID}, or fail.
        """
        from hyperframe.frame import DataFrame, HeadersFrame

        frames = [
            f for f in framesFromBytes(transport.value()) if f.stream_id == streamID
        ]
        self.assertIsInstance(frames[0], HeadersFrame)
        self.assertIn("END_STREAM", frames[-1].flags)
        return b"".join(f.data for f in frames if isinstance(f, DataFrame))

    def test_goAwayThenCloseWhenStreamsDone(self) -> None:
        """
        The drain sends GOAWAY (NO_ERROR, largest stream id) at once, then,
        after the grace window, GOAWAY with the last stream id; it lets the
        open stream finish, then closes the connection.
        """
        resource = DeferredResource()
        connection, server, transport, client = self.h2Connection(resource)
        self.request(client, server, 1)
        [request] = resource.requests
        transport.clear()
        d = self.drain().start()
        self.assertEqual(self.goAways(transport), [(0, MAX_STREAM_ID)])
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS)
        self.assertEqual(self.goAways(transport), [(0, MAX_STREAM_ID), (0, 1)])
        self.clock.advance(1)
        self.assertFalse(transport.disconnecting)

        request.setHeader(b"content-length", b"5")
        request.write(b"hello")
        request.finish()
        self.clock.advance(0)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.answered(transport, 1), b"hello")
        self.settle()
        self.assertEqual(self.successResultOf(d).aborted, 0)

    def test_streamDuringGraceServed(self) -> None:
        """
        A stream the client sent before it read the first GOAWAY (here on a
        connection that was idle) is served; the second GOAWAY then names
        it as the last stream, and the connection closes once it is done.
        """
        resource = SyncResource()
        connection, server, transport, client = self.h2Connection(resource)
        self.request(client, server, 1)
        self.clock.advance(0)
        self.assertEqual(server.streams, {})
        transport.clear()
        d = self.drain().start()
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS / 2)
        self.assertFalse(transport.disconnecting)
        self.request(client, server, 3)
        self.clock.advance(0)
        self.assertEqual(self.answered(transport, 3), b"ok")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS / 2)
        self.assertEqual(self.goAways(transport), [(0, MAX_STREAM_ID), (0, 3)])
        self.assertTrue(transport.disconnecting)
        self.settle()
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 1.0))

    def test_streamAfterGraceRefused(self) -> None:
        """
        A stream above the second GOAWAY's last stream id is refused with
        C{REFUSED_STREAM} (which tells the client it is safe to retry)
        rather than served.
        """
        from hyperframe.frame import RstStreamFrame

        resource = DeferredResource()
        connection, server, transport, client = self.h2Connection(resource)
        self.request(client, server, 1)
        self.drain().start()
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS)
        self.request(client, server, 3)
        self.assertEqual(len(resource.requests), 1)
        resets = [
            f for f in framesFromBytes(transport.value())
            if isinstance(f, RstStreamFrame)
        ]
        self.assertEqual(
            [(f.stream_id, f.error_code) for f in resets], [(3, REFUSED_STREAM)]
        )

    def test_idleClosedAfterGrace(self) -> None:
        """
        An HTTP/2 connection with no open stream gets the first GOAWAY at
        once, and is closed after the grace window, not before.
        """
        resource = SyncResource()
        connection, server, transport, client = self.h2Connection(resource)
        self.request(client, server, 1)
        self.clock.advance(0)
        self.assertEqual(server.streams, {})
        transport.clear()
        d = self.drain().start()
        self.assertEqual(self.goAways(transport), [(0, MAX_STREAM_ID)])
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS * 0.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS * 0.1)
        self.assertEqual(self.goAways(transport), [(0, MAX_STREAM_ID), (0, 1)])
        self.assertTrue(transport.disconnecting)
        self.settle()
        self.assertEqual(self.successResultOf(d), DrainResult(1, 0, 1.0))

    def test_failureIsolated(self) -> None:
        """
        An HTTP/2 connection whose GOAWAY cannot be written is counted as
        failed; another HTTP/2 connection is drained all the same.
        """
        resource = SyncResource()
        broken, brokenServer, brokenTransport, _ = self.h2Connection(resource)
        good, goodServer, goodTransport, _ = self.h2Connection(resource)

        def refuse(data: bytes) -> None:
            raise OSError("write failed")

        brokenTransport.write = refuse  # type: ignore[method-assign]
        events: list[dict[str, Any]] = []
        self.patch(drainModule, "log", Logger(observer=events.append))
        d = self.drain(hammerTimeout=10).start()
        self.clock.advance(H2_GOAWAY_GRACE_SECONDS)
        self.assertTrue(goodTransport.disconnecting)
        self.settle()
        [failure] = [e for e in events if "log_failure" in e]
        self.assertIs(failure["log_failure"].type, OSError)
        self.assertEqual(
            (failure["peer"], failure["protocol"]), ("192.0.2.1:40000", "H2Connection")
        )
        self.clock.advance(10 - H2_GOAWAY_GRACE_SECONDS)
        self.assertTrue(broken.aborted)
        self.assertEqual(self.successResultOf(d), DrainResult(2, 1, 10.0, 1))


class PacedDrainTests(DrainTestsMixin, SynchronousTestCase):
    """
    A drain with C{drainRate}: the long-lived (L{IDrainable}) connections
    are asked at that rate, and HTTP/1.1 connections in the same drain are
    not held back by it.
    """

    def drainable(self) -> FakeConnection:
        """
        A connection whose L{IDrainable} protocol closes it when asked.
        """
        protocol = DrainableProtocol()
        connection = FakeConnection(self.connections, self.clock, protocol)
        protocol.closeOnDrain = connection
        return connection

    def advanceTo(self, seconds: float) -> None:
        """
        Run the clock until C{seconds} after the drain began, stopping at
        each timer's time (L{Clock.advance} runs a timer that reschedules
        itself only once a call).
        """
        target = self.started + seconds
        while self.clock.seconds() < target:
            due = [c.getTime() for c in self.clock.getDelayedCalls()]
            step = min([t for t in due if t <= target] + [target])
            self.clock.advance(max(step - self.clock.seconds(), 0.0))

    def test_httpNotSlowedByPace(self) -> None:
        """
        At 10 a second, 50 drainable connections are asked over 5 s.  In the
        same drain an idle HTTP/1.1 connection closes at once, a request in
        flight ends with C{Connection: close} and its connection closes the
        moment the response is done, and a recently active keep-alive
        connection closes once it has been quiet for its idle grace (1 s here),
        exactly as in a drain with nothing to pace.
        """
        drainables = [self.drainable() for _ in range(50)]
        idle, _, idleTransport = self.httpConnection()
        idle.lastActive -= 60
        recent, _, recentTransport = self.httpConnection()
        resource = DeferredResource()
        busy, busyChannel, busyTransport = self.httpConnection(resource)
        busyChannel.dataReceived(REQUEST)
        [request] = resource.requests

        def asked() -> int:
            return sum(c.protocol.drains for c in drainables)

        self.started = self.clock.seconds()
        d = self.drain(drainRate=10, idleGrace=1.0).start()
        self.assertTrue(idleTransport.disconnecting)
        self.settle()
        self.assertEqual(asked(), 1)

        self.advanceTo(0.25)
        self.assertEqual(asked(), 3)
        request.setHeader(b"content-length", b"2")
        request.write(b"ok")
        request.finish()
        [(_, headers, body)] = parseResponses(busyTransport.value())
        self.assertEqual((headers[b"connection"], body), (b"close", b"ok"))
        self.assertTrue(busyTransport.disconnecting)
        self.settle()

        self.advanceTo(1.0 - 0.01)
        self.assertFalse(recentTransport.disconnecting)
        self.advanceTo(1.0 + 0.01)
        self.assertTrue(recentTransport.disconnecting)
        self.settle()
        self.assertEqual(self.connections & {idle, recent, busy}, set())
        # The pace went on meanwhile: at 0.0, 0.1, ..., 1.0 s.
        self.assertEqual(asked(), 11)
        self.assertEqual(len(self.connections), 50 - asked())

        self.advanceTo(4.45)
        self.assertNoResult(d)
        self.assertEqual(asked(), 45)
        self.advanceTo(5.5)
        self.assertEqual(asked(), 50)
        self.assertEqual(self.connections, set())
        result = self.successResultOf(d)
        self.assertEqual((result.opened, result.aborted, result.failed), (53, 0, 0))
        # 50 at 10 a second: the last is asked 4.9 s in.
        self.assertAlmostEqual(result.seconds, 4.9, places=6)

    def test_httpAloneNotPaced(self) -> None:
        """
        A drain with a rate but nothing long-lived to pace closes its idle
        HTTP/1.1 connections at once and finishes.
        """
        transports = []
        for _ in range(20):
            connection, _, transport = self.httpConnection()
            connection.lastActive -= 60
            transports.append(transport)
        d = self.drain(drainRate=1).start()
        self.assertTrue(all(t.disconnecting for t in transports))
        self.settle()
        self.assertEqual(self.successResultOf(d), DrainResult(20, 0, 0.0))
