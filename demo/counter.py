# -*- test-case-name: txgrace.test.test_demo_counter -*-
"""
A line protocol whose connections move to the successor at a restart,
instead of being closed: it opts in by providing L{txgrace.IHandoff}.

Each line a client sends is answered with C{N: <line> from pid P}, where
C{N} counts the lines of this connection.  At a restart, the count, and the
part of a line that has arrived without its newline, move with the
connection: the client goes on counting with the successor's pid, on the
same TCP connection.  Try it:

  twist txgrace --endpoint grace:tcp:28572 --app demo.counter.factory
  nc localhost 28572              # or: telnet localhost 28572
  one
  1: one from pid 4242
  two
  2: two from pid 4242
                                  # in another terminal: kill -HUP 4242
  three
  3: three from pid 4251

With a line still arriving across the restart:

  (printf 'one\\ntw'; sleep 3; printf 'o\\n'; sleep 1) | nc localhost 28572
                                  # kill -HUP <pid> within those 3 s
  1: one from pid 4251
  2: two from pid 4262

A line that starts with C{slow} is answered after a second; a connection
waiting for that answer is busy (L{Counter.handoffState} answers L{None}),
so it moves once the answer is written.  Where a connection cannot move (a
final stop, C{--no-handoff}, TLS), the drain calls L{Counter.drain}, which
says goodbye and closes.
"""

from __future__ import annotations

import os

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from txgrace import IDrainable, IHandoff

MAX_LINE = 16384
"""
The longest line a client may send, in bytes; a longer one ends the
connection.
"""

SLOW_SECONDS = 1.0
"""
How long a line that starts with C{slow} waits for its answer.
"""


@implementer(IHandoff, IDrainable)
class Counter(Protocol):
    """
    Answers each line with its number on this connection and this pid.

    It keeps its own buffer (not L{twisted.protocols.basic.LineReceiver}'s
    private one), so that L{handoffState} can hand on the part of a line
    that has arrived.  C{connectionMade} sends nothing: it also runs in the
    successor, for a connection that the client has been using all along.

    @param clock: What times the slow answers.
    @ivar count: The lines answered or being answered.
    """

    transport: ITransport

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.count = 0
        self._buffer = b""
        self._answering: IDelayedCall | None = None
        self._draining = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._answerLines()

    def _answerLines(self) -> None:
        """
        Answer every complete line received, in order; stop at a slow one,
        which answers the rest when it is done.
        """
        while self._answering is None and b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.rstrip(b"\r")
            self.count += 1
            answer = b"%d: %s from pid %d\n" % (self.count, line, os.getpid())
            if line.startswith(b"slow"):
                self._answering = self._clock.callLater(
                    SLOW_SECONDS, self._answerSlowly, answer
                )
                return
            self.transport.write(answer)
        if self._answering is None:
            if self._draining:
                self._goodbye()
            elif len(self._buffer) > MAX_LINE:
                self.transport.write(b"line too long\n")
                self.transport.loseConnection()

    def _answerSlowly(self, answer: bytes) -> None:
        self._answering = None
        self.transport.write(answer)
        self._answerLines()

    def handoffState(self) -> bytes | None:
        """
        The count and the part of a line that has arrived, as
        C{b"<count> <partial line>"}; or L{None} while a slow answer is
        pending, so that the connection moves only after it is written.
        """
        if self._answering is not None:
            return None
        return b"%d %s" % (self.count, self._buffer)

    def resumeHandoff(self, state: bytes) -> None:
        """
        In the successor: go on from the state L{handoffState} gave.
        """
        count, _, self._buffer = state.partition(b" ")
        self.count = int(count)
        self._answerLines()

    def drain(self) -> None:
        """
        The connection cannot move (a final stop, no handoff, TLS): say
        goodbye and close, once a pending slow answer is written.
        """
        self._draining = True
        if self._answering is None:
            self._goodbye()

    def _goodbye(self) -> None:
        self.transport.write(b"going away: pid %d is stopping\n" % (os.getpid(),))
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._answering is not None and self._answering.active():
            self._answering.cancel()
        self._answering = None


class CounterFactory(Factory):
    """
    Builds L{Counter}s.

    @ivar clock: What times the slow answers; the global reactor by default.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = reactor  # type: ignore[assignment]
        self.clock: IReactorTime = clock

    def buildProtocol(self, addr: IAddress | None) -> Counter:
        counter = Counter(self.clock)
        counter.factory = self
        return counter


factory = CounterFactory()
