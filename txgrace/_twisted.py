# -*- test-case-name: txgrace.test.test_twisted -*-
"""
Every private Twisted name that txgrace uses, in one place.

Each name is a liability: Twisted may rename or drop it in any release.  So
every use goes through this module, each with a comment saying what it is
for and which Twisted releases have it (each was checked in 26.4.0, the
oldest that C{pyproject.toml} allows and C{.ci/oldest.txt} pins, and in
26.10.0), and L{missingNames} lists the ones the installed Twisted lacks;
C{txgrace.test.test_twisted} fails on any.

Names used by modules this one does not cover yet are listed in
L{OTHER_MODULES}.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet import tcp, unix
from twisted.python import systemd

# Neither twisted.internet.endpoints (importing it reads and deletes
# LISTEN_FDS) nor twisted.web is imported here at module level: each is
# imported where it is needed.

_PortClass = TypeVar("_PortClass", bound=type)

# -- Listening ports --------------------------------------------------------


def tcpPortFromDescriptor(
    portClass: type[tcp.Port], reactor: Any, fd: int, family: int, factory: Any
) -> Any:
    """
    Make an instance of C{portClass} (a L{tcp.Port} subclass) that listens on
    a dup of the listening socket C{fd}.
    """
    # tcp.Port._fromListeningDescriptor (classmethod): what the public
    # reactor.adoptStreamPort calls, but that makes a plain tcp.Port, and
    # txgrace needs its own subclass (tracked connections, accept limit).
    # Present with this signature in 26.4.0 and 26.10.0; believed since 10.1
    # (when adoptStreamPort came).
    return portClass._fromListeningDescriptor(  # type: ignore[attr-defined]
        reactor, fd, family, factory
    )


def unixPortFromDescriptor(
    portClass: type[unix.Port], reactor: Any, fd: int, factory: Any
) -> Any:
    """
    Make an instance of C{portClass} (a L{unix.Port} subclass) that listens
    on a dup of the listening UNIX socket C{fd}.
    """
    # unix.Port._fromListeningDescriptor (classmethod): as above, for UNIX
    # ports.  Present with this signature in 26.4.0 and 26.10.0.
    return portClass._fromListeningDescriptor(  # type: ignore[attr-defined]
        reactor, fd, factory
    )


def withoutShutdown(portClass: _PortClass) -> _PortClass:
    """
    Class decorator: ports of C{portClass} never C{shutdown()} their socket
    when they stop, which would stop it for every process holding a copy.
    """
    # tcp._SocketCloser._shouldShutdown (class attribute, read in
    # _closeSocket): adopted TCP ports already set it False; adopted UNIX
    # ports do not.  Present in 26.4.0 and 26.10.0; believed since 10.1.
    setattr(portClass, "_shouldShutdown", False)
    return portClass


# -- HTTP -------------------------------------------------------------------


def wrappedHTTPChannel(protocol: Any) -> Any:
    """
    The channel inside Twisted's HTTP/1.1-or-HTTP/2 switch (what
    L{http.HTTPFactory.buildProtocol} returns), or L{None} for any other
    protocol.
    """
    # http._GenericHTTPChannelProtocol._channel: the HTTPChannel, or the
    # H2Connection once ALPN chose h2.  No public accessor.  Present in
    # 26.4.0 and 26.10.0; believed since 16.3 (HTTP/2 support).
    if isinstance(protocol, _genericHTTPChannelClass()):
        return protocol._channel
    return None


def _genericHTTPChannelClass() -> Any:
    # Looked up once: twisted.web.http is a module proxy (for its
    # deprecations) that makes every attribute lookup slow, and the drain
    # asks for every connection.
    global _genericHTTPChannel
    if _genericHTTPChannel is None:
        from twisted.web import http

        _genericHTTPChannel = http._GenericHTTPChannelProtocol
    return _genericHTTPChannel


_genericHTTPChannel: Any = None


def unparsedBytes(channel: Any) -> bytes:
    """
    The bytes an HTTP/1.1 channel received but has not parsed into a line
    yet: a request line that is still arriving.
    """
    # basic.LineReceiver._buffer (HTTPChannel is a LineReceiver): there is
    # no public way to see a partial line.  Present in 26.4.0 and 26.10.0
    # (and long before): a class attribute, then an instance attribute once
    # data arrived.
    return bytes(getattr(channel, "_buffer", b""))


def h2ConnectionClass() -> type | None:
    """
    Twisted's server-side HTTP/2 protocol class, or L{None} when h2 is not
    installed.
    """
    # twisted.web._http2.H2Connection: a private module, imported only
    # when h2 is installed.  Its public-named attributes conn (the h2
    # connection), streams (open stream id -> H2Stream) and transport are
    # used too.  Present in 26.4.0 and 26.10.0; believed since 16.3.
    try:
        from twisted.web._http2 import H2Connection
    except ImportError:
        return None
    return H2Connection


H2_STREAM_EVENTS = {
    # H2Connection._requestReceived(event): a stream's headers arrived; it
    # makes the request.
    "received": "_requestReceived",
    # H2Connection._requestDataReceived(event): body data for a stream.
    "data": "_requestDataReceived",
    # H2Connection._requestEnded(event): the client ended its side.
    "ended": "_requestEnded",
}
"""
The H2Connection methods that its C{dataReceived} calls, looked up on the
instance, for each stream event a drain must filter.  All three present in
26.4.0 and 26.10.0; believed since 16.3.
"""


def h2StreamHandler(h2: Any, event: str) -> Callable[[Any], None]:
    """
    The handler C{h2} (an H2Connection) calls for the stream event C{event},
    a key of L{H2_STREAM_EVENTS}.
    """
    handler: Callable[[Any], None] = getattr(h2, H2_STREAM_EVENTS[event])
    return handler


def setH2StreamHandler(h2: Any, event: str, handler: Callable[[Any], None]) -> None:
    """
    Make C{h2} call C{handler} for the stream event C{event} from now on.
    """
    h2.__dict__[H2_STREAM_EVENTS[event]] = handler


# -- systemd ----------------------------------------------------------------


def systemdParserDescriptors() -> systemd.ListenFDs | None:
    """
    The L{systemd.ListenFDs} that Twisted's C{systemd:} endpoint parser read
    from the environment when L{twisted.internet.endpoints} was imported
    first (it deletes C{LISTEN_PID} and C{LISTEN_FDS} as it does).
    """
    # endpoints._SystemdParser._sddaemon (class attribute set at import):
    # the only copy of those descriptors once the variables are gone.
    # Present in 26.4.0 and 26.10.0.  An older _sddaemon that is not a
    # ListenFDs is treated as absent.
    from twisted.internet import endpoints

    parser = getattr(endpoints, "_SystemdParser", None)
    listenFDs = getattr(parser, "_sddaemon", None)
    if isinstance(listenFDs, systemd.ListenFDs):
        return listenFDs
    return None


def listenFDNames(listenFDs: systemd.ListenFDs) -> list[str]:
    """
    The names (C{LISTEN_FDNAMES}) of C{listenFDs}'s descriptors, in order;
    empty when it has none.
    """
    # ListenFDs._names (an attrs field): inheritedNamedDescriptors() is
    # public but loses the order and any repeated name.  Present in 26.4.0
    # and 26.10.0.
    return list(getattr(listenFDs, "_names", ()))


# -- Connections that move (txgrace.handoff) --------------------------------


def httpChannelAtRest(channel: Any) -> bool:
    """
    Whether an HTTP/1.1 channel is between requests: none in flight or
    being parsed, nothing buffered behind a paused one, and it will not
    close by itself after the last response.
    """
    # HTTPChannel._handlingRequest and ._dataBuffer: a request is being
    # handled, and the bytes received behind it (pipelined) while it was.
    # No public accessor.  Present in 26.4.0 and 26.10.0 (both came with
    # the pipelining rework of 16.x).  requests, persistent and line_mode
    # are public-named.
    return (
        not channel.requests
        and not getattr(channel, "_handlingRequest", False)
        and not getattr(channel, "_dataBuffer", None)
        and bool(channel.persistent)
        and bool(getattr(channel, "line_mode", 1))
    )


def receivedAhead(channel: Any) -> bool:
    """
    Whether an HTTP/1.1 channel holds bytes received after the request it
    is handling: a pipelined request, or the start of one.
    """
    # HTTPChannel._dataBuffer (see httpChannelAtRest) and the line buffer
    # (see unparsedBytes).
    return bool(unparsedBytes(channel)) or bool(getattr(channel, "_dataBuffer", None))


def pendingWriteBytes(transport: Any) -> int:
    """
    How many bytes C{transport} (an L{abstract.FileDescriptor}) holds that
    the kernel has not taken yet.
    """
    # FileDescriptor.dataBuffer and .offset (public-named) and ._tempDataLen
    # (private): the write buffer.  No public accessor.  Present in 26.4.0
    # and 26.10.0, and since Twisted 8.
    return (
        len(getattr(transport, "dataBuffer", b""))
        - getattr(transport, "offset", 0)
        + getattr(transport, "_tempDataLen", 0)
    )


def forgetConnection(transport: Any, reason: Any) -> None:
    """
    Let go of a connection that another process now owns: close this
    process's descriptor without C{shutdown()}, which would end the
    connection for every process holding it, and tell its protocol (with
    C{reason}).  The transport must be neither reading nor writing.
    """
    # tcp._SocketCloser._shouldShutdown, as for ports (see withoutShutdown);
    # set on the instance.  Then the transport's own connectionLost, which
    # is what the reactor calls once a connection is gone.  Present in
    # 26.4.0 and 26.10.0.
    transport._shouldShutdown = False
    transport.connectionLost(reason)


def acceptedTransport(port: Any, skt: Any, address: Any) -> tuple[Any, Any] | None:
    """
    Make the protocol and transport for C{skt}, a connected socket of
    C{port}'s kind, as if C{port} had just accepted it; connecting them
    (C{protocol.makeConnection(transport)}) is left to the caller.

    @return: The protocol and the transport, or L{None} if the factory
        refused the connection (C{skt} is then closed).
    """
    # Port._buildAddr (tcp and unix) and the steps of Port.doRead after
    # accept(): there is no public way to give a port a socket it did not
    # accept.  Present in 26.4.0 and 26.10.0; believed since 10.1.
    protocol = port.factory.buildProtocol(port._buildAddr(address))
    if protocol is None:
        skt.close()
        return None
    sessionno = port.sessionno
    port.sessionno = sessionno + 1
    return protocol, port.transport(skt, protocol, address, port, sessionno, port.reactor)


# -- Public-named internals -------------------------------------------------
#
# Not underscored, so not routed here, but undocumented, and txgrace.adopt
# builds on them (all present in 26.4.0 and 26.10.0): tcp.Port.doRead and
# its numberAccepts batch size, tcp.Port.connectionLost, the ports'
# transport class attribute with tcp.Server's constructor (skt, protocol,
# client, server, sessionno, reactor), unix.Port's mode and backlog
# attributes, and the port's connected and disconnecting flags.

# -- Services and websockets ------------------------------------------------


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

    C{twisted.web._websocket_impl._WebSocketWireProtocol}: in the Twisted
    releases that have C{twisted.web.websocket} (checked in 26.4.0 and
    26.10.0; the module needs C{wsproto}).
    """
    try:
        from twisted.web._websocket_impl import _WebSocketWireProtocol
    except ImportError:
        return None
    return _WebSocketWireProtocol


# -- Checking ---------------------------------------------------------------

OTHER_MODULES = {
    "txgrace/master.py": [
        # twisted.internet.process.reapProcessHandlers: the pids Twisted
        # reaps itself (not underscored, but not documented either).
        "twisted.internet.process.reapProcessHandlers",
    ],
}
"""
Private or undocumented Twisted names used outside this module, by modules
that do not route them here yet.
"""


def _privateNames() -> list[tuple[str, object, str]]:
    from twisted.application.internet import StreamServerEndpointService
    from twisted.internet import endpoints
    from twisted.web import http

    names: list[tuple[str, object, str]] = [
        ("tcp.Port._fromListeningDescriptor", tcp.Port, "_fromListeningDescriptor"),
        ("unix.Port._fromListeningDescriptor", unix.Port, "_fromListeningDescriptor"),
        ("tcp.Port._shouldShutdown", tcp.Port, "_shouldShutdown"),
        ("unix.Port._shouldShutdown", unix.Port, "_shouldShutdown"),
        ("http._GenericHTTPChannelProtocol", http, "_GenericHTTPChannelProtocol"),
        ("http.HTTPChannel._buffer", http.HTTPChannel, "_buffer"),
        ("tcp.Port._buildAddr", tcp.Port, "_buildAddr"),
        ("unix.Port._buildAddr", unix.Port, "_buildAddr"),
        ("tcp.Server._shouldShutdown", tcp.Server, "_shouldShutdown"),
        ("endpoints._SystemdParser", endpoints, "_SystemdParser"),
        (
            "StreamServerEndpointService._raiseSynchronously",
            StreamServerEndpointService,
            "_raiseSynchronously",
        ),
        (
            "endpoints._SystemdParser._sddaemon",
            getattr(endpoints, "_SystemdParser", None),
            "_sddaemon",
        ),
    ]
    h2 = h2ConnectionClass()
    if h2 is not None:
        for name in H2_STREAM_EVENTS.values():
            names.append((f"_http2.H2Connection.{name}", h2, name))
    return names


def _fileDescriptorInit() -> str:
    # FileDescriptor sets _tempDataLen in __init__, which needs a reactor:
    # read its source instead of making one.
    import inspect

    from twisted.internet import abstract

    return inspect.getsource(abstract.FileDescriptor.__init__)


def missingNames() -> list[str]:
    """
    The private Twisted names used here that the installed Twisted lacks.
    """
    from twisted.web import http

    missing = [
        label for label, owner, name in _privateNames() if not hasattr(owner, name)
    ]
    # Instance attributes: look at an instance made the public way.
    if not hasattr(systemd.ListenFDs([]), "_names"):
        missing.append("systemd.ListenFDs._names")
    if not hasattr(http.HTTPFactory().buildProtocol(None), "_channel"):
        missing.append("http._GenericHTTPChannelProtocol._channel")
    channel = http.HTTPChannel()
    for name in ("_handlingRequest", "_dataBuffer"):
        if not hasattr(channel, name):
            missing.append(f"http.HTTPChannel.{name}")
    if "_tempDataLen" not in _fileDescriptorInit():
        missing.append("abstract.FileDescriptor._tempDataLen")
    if h2ConnectionClass() is None:
        try:
            import h2  # noqa: F401
        except ImportError:
            pass
        else:
            missing.append("twisted.web._http2.H2Connection")
    if websocketWireProtocolClass() is None:
        try:
            import wsproto  # noqa: F401
        except ImportError:
            pass
        else:
            missing.append("twisted.web._websocket_impl._WebSocketWireProtocol")
    return missing
