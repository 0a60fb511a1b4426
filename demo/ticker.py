"""
A long-lived protocol that drains politely: it sends a line every second and,
when the server drains (a restart or a stop), says goodbye and closes, as a
websocket server would send close code 1001 "going away".

  twist txgrace --endpoint grace:tcp:28571 --app demo.ticker.factory
  nc localhost 28571
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from txgrace import IDrainable


@implementer(IDrainable)
class Ticker(Protocol):
    """
    Sends C{tick N from pid P} every second until the server drains.
    """

    def connectionMade(self) -> None:
        self._count = 0
        self._ticking = LoopingCall(self._tick)
        self._ticking.clock = reactor
        self._ticking.start(1.0)

    def _tick(self) -> None:
        self._count += 1
        self.transport.write(f"tick {self._count} from pid {os.getpid()}\n".encode())

    def drain(self) -> None:
        """
        The server is going away: say so, then close.
        """
        self._ticking.stop()
        self.transport.write(f"going away: pid {os.getpid()} is draining\n".encode())
        self.transport.loseConnection()

    def connectionLost(self, reason: object) -> None:
        if self._ticking.running:
            self._ticking.stop()


factory = Factory.forProtocol(Ticker)
