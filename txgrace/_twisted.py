# -*- test-case-name: txgrace.test.test_twisted -*-
"""
Every private Twisted name txgrace uses, in one place, each with what it is
for and which Twisted versions have it.  A Twisted upgrade that drops one
fails C{txgrace.test.test_twisted}.
"""

from __future__ import annotations

from typing import Any


def raiseListenFailuresSynchronously(service: Any) -> None:
    """
    Make a L{twisted.application.internet.StreamServerEndpointService} raise
    from C{privilegedStartService} when its listen fails at once, instead of
    logging the failure and going on without the port.

    C{_raiseSynchronously}: documented on the class (an C{@ivar}), set by
    C{twisted.application.strports.service}; present since Twisted 10.2.
    """
    service._raiseSynchronously = True


def websocketWireProtocolClass() -> Any:
    """
    The class of the protocol that Twisted's C{WebSocketResource} upgrades
    an HTTP channel to, so that the drain can close it with code 1001.

    C{twisted.web._websocket_impl._WebSocketWireProtocol}: Twisted 24.10
    and later (the module needs C{wsproto}).
    """
    try:
        from twisted.web._websocket_impl import _WebSocketWireProtocol
    except ImportError:
        return None
    return _WebSocketWireProtocol
