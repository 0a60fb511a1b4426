# -*- test-case-name: txgrace.test.test_endpoints -*-
"""
The C{grace:} endpoint: C{grace:<inner endpoint string>}.

The inner string is parsed by Twisted's own parsers for C{tcp:}, C{tcp6:},
C{ssl:} and C{unix:}, so every parameter they accept works.  They are handed
a reactor whose C{listenTCP}, C{listenSSL} and C{listenUNIX} adopt a socket
(see L{txgrace.adopt}) instead of binding one that cannot be shared.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from txgrace.adopt import (
    HeldSocket,
    SocketRegistry,
    adoptPort,
    holdSocket,
    registry as processRegistry,
)

SUPPORTED_TYPES = ("tcp", "tcp6", "ssl", "unix")


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def unparseEndpoint(args: tuple[object, ...], kwargs: dict[str, object]) -> str:
    """
    Rebuild an endpoint string from the parts that L{serverFromString} split
    it into, escaping C{:}, C{=} and C{\\} again.
    """
    parts = [_quote(str(arg)) for arg in args]
    parts += [f"{_quote(str(k))}={_quote(str(v))}" for k, v in kwargs.items()]
    return ":".join(parts)


def socketKey(kind: str, address: str) -> str:
    """
    The default name of a socket, as passed in C{LISTEN_FDNAMES}: C{kind}
    and the address asked for (not the one bound, so that C{grace:tcp:0}
    finds its socket again after a restart), such as C{tcp/127.0.0.1/8080}
    or C{unix//run/app.sock}.  C{%} and C{:} are escaped because
    C{LISTEN_FDNAMES} separates names with colons.
    """
    return f"{kind}/{address}".replace("%", "%25").replace(":", "%3A")


class _AdoptingReactor:
    """
    A reactor for Twisted's endpoint parsers: listening adopts a socket
    through L{adoptPort}.  Everything else goes to the real reactor.
    """

    def __init__(self, reactor: Any, endpoint: GraceServerEndpoint) -> None:
        self._reactor = reactor
        self._endpoint = endpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def _inetAddress(self, interface: str, port: int) -> tuple[int, tuple[Any, ...]]:
        """
        The family and address that C{listenTCP(port, interface=interface)}
        binds: an IPv6 literal gives IPv6, anything else IPv4, and a host
        name is resolved here (the first address), so that it matches the
        numeric address of an inherited socket.

        @raise CannotListenError: If C{interface} does not resolve.
        """
        if abstract.isIPv6Address(interface):
            family, flags = socket.AF_INET6, socket.AI_NUMERICHOST | socket.AI_PASSIVE
        else:
            family, flags = socket.AF_INET, socket.AI_PASSIVE
        host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
        try:
            info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, flags)
        except (OSError, UnicodeError, ValueError) as e:
            raise CannotListenError(interface, port, e) from None
        return family, info[0][4]

    def _adoptInet(
        self, kind: str, port: int, factory: Any, backlog: int, interface: str
    ) -> Any:
        family, address = self._inetAddress(interface, port)
        key = self._endpoint.name or socketKey(kind, f"{interface or '*'}/{port}")
        return self._endpoint._take(key, family, address, factory, backlog, None)

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        return self._adoptInet("tcp", port, factory, backlog, interface)

    def listenSSL(
        self,
        port: int,
        factory: Any,
        contextFactory: Any,
        backlog: int = 50,
        interface: str = "",
    ) -> Any:
        # As IReactorSSL.listenSSL does.  The application's factory stays
        # directly under TLS, so ALPN (h2 or http/1.1) is negotiated with it.
        tlsFactory = TLSMemoryBIOFactory(contextFactory, False, factory) if factory else None
        return self._adoptInet("ssl", port, tlsFactory, backlog, interface)

    def listenUNIX(
        self,
        address: str,
        factory: Any,
        backlog: int = 50,
        mode: int = 0o666,
        wantPID: int = 0,
    ) -> Any:
        # wantPID (lockfile=1) is not used: two generations share the path on
        # purpose, and a stale socket file is found by connecting to it.
        path = address if isinstance(address, str) else address.decode()
        key = self._endpoint.name or socketKey("unix", path)
        return self._endpoint._take(key, socket.AF_UNIX, path, factory, backlog, mode)


@implementer(IStreamServerEndpoint)
class GraceServerEndpoint:
    """
    A server endpoint that listens on an inherited or freshly made socket,
    shared safely with a successor.

    @ivar description: The full C{grace:} string.
    @ivar name: The socket's name in C{LISTEN_FDNAMES}, or L{None} to derive
        one from the address.
    @ivar registry: The process's L{SocketRegistry}.
    """

    def __init__(
        self,
        reactor: Any,
        inner: str,
        name: str | None = None,
        registry: SocketRegistry | None = None,
        description: str | None = None,
    ) -> None:
        if description is None:
            description = "grace:" + inner + ("" if name is None else f":name={name}")
        self.description = description
        self.name = name
        self._reactor = reactor
        self.registry = processRegistry if registry is None else registry
        kind = inner.split(":", 1)[0]
        if kind not in SUPPORTED_TYPES:
            raise ValueError(
                f"Invalid endpoint '{self.description}': grace: supports "
                f"{', '.join(SUPPORTED_TYPES)}, not {kind!r}"
            )
        if name is not None and (not name or ":" in name):
            raise ValueError(
                f"Invalid endpoint '{self.description}': name= must be "
                "non-empty and cannot contain ':'"
            )
        try:
            self._inner = serverFromString(_AdoptingReactor(reactor, self), inner)
        except Exception as e:
            raise ValueError(f"Invalid endpoint '{self.description}': {e}") from None

    def _take(
        self,
        key: str,
        family: int,
        address: Any,
        factory: Any,
        backlog: int,
        mode: int | None,
    ) -> Any:
        named = self.name is not None
        if factory is None:
            return holdSocket(self.registry, key, family, address, backlog, mode, named)
        return adoptPort(
            self._reactor, self.registry, key, family, address, factory, backlog, mode, named
        )

    def hold(self) -> HeldSocket:
        """
        Take this endpoint's socket, inherited or fresh, without accepting
        on it: for a master that passes it to its workers.

        @raise twisted.internet.error.CannotListenError: If it cannot be had.
        """
        failures: list[Any] = []
        held: list[HeldSocket] = []
        self._inner.listen(None).addCallbacks(held.append, failures.append)
        if failures:
            failures[0].raiseException()
        return held[0]

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """
        Listen with C{protocolFactory}.

        @return: A Deferred that fires with the listening port, or fails with
            L{twisted.internet.error.CannotListenError} naming the address.
        """
        return self._inner.listen(protocolFactory)

    def __repr__(self) -> str:
        return f"<GraceServerEndpoint {self.description!r}>"


def parseGraceEndpoint(
    reactor: Any, *args: object, **kwargs: object
) -> GraceServerEndpoint:
    """
    Make a L{GraceServerEndpoint} from the parts of a C{grace:} string, as
    L{twisted.internet.interfaces.IStreamServerEndpointStringParser} asks.

    @raise ValueError: If the string is malformed or names an unsupported
        type; the message quotes the string.
    """
    description = "grace:" + unparseEndpoint(args, kwargs)
    name = kwargs.pop("name", None)
    if not args:
        raise ValueError(
            f"Invalid endpoint '{description}': "
            f"expected grace:<{'|'.join(SUPPORTED_TYPES)}>:..."
        )
    return GraceServerEndpoint(
        reactor,
        unparseEndpoint(args, kwargs),
        None if name is None else str(name),
        description=description,
    )
