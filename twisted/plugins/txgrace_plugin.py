"""
Twisted plugins for txgrace: the C{grace:} endpoint prefix and the
C{twist txgrace} subcommand.

This module is imported by every plugin scan, so it stays light: neither the
reactor nor L{twisted.internet.endpoints} is imported until a plugin is used.
"""

from typing import Any

from twisted.application.service import ServiceMaker
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _GraceEndpointParser:
    """
    Parses C{grace:<inner endpoint string>}; see L{txgrace.endpoints}.
    """

    prefix = "grace"

    # Positional-only, so that reactor= or self= in a string is reported as an
    # unknown parameter instead of raising TypeError here.
    def parseStreamServer(  # type: ignore[override]
        self, reactor: Any, /, *args: object, **kwargs: object
    ) -> Any:
        from txgrace.endpoints import parseGraceEndpoint

        return parseGraceEndpoint(reactor, *args, **kwargs)


graceEndpointParser = _GraceEndpointParser()

txgrace = ServiceMaker(
    "txgrace",
    "txgrace.tap",
    "Serve an application on grace: endpoints, with graceful stop and "
    "zero-downtime restart.",
    "txgrace",
)
