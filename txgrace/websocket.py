# -*- test-case-name: txgrace.test.test_websocket -*-
"""
Websockets drain with no application code: a connection served by Twisted's
own L{twisted.web.websocket.WebSocketResource}, or by autobahn's
C{WebSocketServerProtocol} (over C{twisted.web} or as a plain factory), gets
a close frame with code 1001 ("going away") when the drain reaches it.

Each is an L{IDrainable} adapter, registered when the drain begins if the
application imported that library (so nothing is imported for an
application that does not use it).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.python.components import registerAdapter
from zope.interface import implementer

from txgrace.interfaces import IDrainable

GOING_AWAY = 1001
"""
The websocket close code for a server that is going away (RFC 6455, 7.4.1).
"""

_registered: set[str] = set()


@implementer(IDrainable)
class TwistedWebSocketDrain:
    """
    Drains a connection of L{twisted.web.websocket}: a close frame 1001,
    then the connection closes.
    """

    def __init__(self, wire: Any) -> None:
        self._wire = wire

    def drain(self) -> None:
        self._wire.loseConnection(GOING_AWAY, "going away")


@implementer(IDrainable)
class AutobahnDrain:
    """
    Drains an autobahn server connection: a close frame 1001, then the
    closing handshake ends the connection.
    """

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def drain(self) -> None:
        # sendClose() refuses 1001 (a server's code, not an application's);
        # sendCloseFrame() starts the same closing handshake with it.
        self._protocol.sendCloseFrame(code=GOING_AWAY, reasonUtf8=b"going away")


def registerWebSocketAdapters() -> None:
    """
    Register the adapters of the websocket libraries this process uses.
    """
    twisted = sys.modules.get("twisted.web._websocket_impl")
    if twisted is not None and "twisted" not in _registered:
        # The wire protocol's class is private to Twisted (26.4 and later);
        # see txgrace._twisted.
        from txgrace._twisted import websocketWireProtocolClass

        wire = websocketWireProtocolClass()
        if wire is not None:
            registerAdapter(TwistedWebSocketDrain, wire, IDrainable)
            _registered.add("twisted")
    autobahn = sys.modules.get("autobahn.twisted.websocket")
    if autobahn is not None and "autobahn" not in _registered:
        registerAdapter(AutobahnDrain, autobahn.WebSocketServerProtocol, IDrainable)
        _registered.add("autobahn")


def upgradedProtocol(channel: Any) -> Any:
    """
    The protocol an C{HTTPChannel} was upgraded to (Twisted's websockets
    take over the channel's C{dataReceived}), or L{None}.
    """
    received = getattr(channel, "dataReceived", None)
    owner = getattr(received, "__self__", None)
    if owner is None or owner is channel:
        return None
    return owner
