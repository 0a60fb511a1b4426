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
