# -*- test-case-name: txgrace.test.test_endpoints -*-
"""
The C{grace:} endpoint: C{grace:<inner endpoint string>}.

The inner string is checked here, parameter by parameter, so that a bad
string gets one line that quotes it and says what is wrong; then it is
parsed by Twisted's own parsers for C{tcp:}, C{tcp6:}, C{ssl:} and
C{unix:}.  Only the port (or path) is given without C{key=}.  The parsers
are handed a reactor whose C{listenTCP}, C{listenSSL} and C{listenUNIX}
adopt a socket (see L{txgrace.adopt}) instead of binding one that cannot be
shared; a host name given as C{interface=} is resolved first, so that it
matches the numeric address of an inherited socket.
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
from txgrace.lifecycle import lifecycleFor
from txgrace.settings import SettingError

SUPPORTED_TYPES = ("tcp", "tcp6", "ssl", "unix")

# The parameters of each type, as Twisted's parsers take them.  Only the
# first is given without key=: a name with an unescaped ':' (name=a:b) would
# otherwise silently become another parameter.
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "interface", "backlog"),
    "ssl": (
        "port",
        "privateKey",
        "certKey",
        "sslmethod",
        "interface",
        "backlog",
        "extraCertChain",
        "dhParameters",
    ),
    "unix": ("address", "mode", "backlog", "lockfile"),
}

_MOST_BACKLOG = 2**31 - 1


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


def splitEndpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint string as L{serverFromString} does: into the values
    given without a key and the C{key=value} parameters, with backslash
    escapes undone.  L{unparseEndpoint} puts them together again.

    @raise ValueError: If the string ends with a lone backslash.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    key: str | None = None
    current = ""
    characters = iter(description)
    for character in characters:
        if character == "\\":
            escaped = next(characters, None)
            if escaped is None:
                raise ValueError("it ends with a lone '\\'")
            current += escaped
        elif character == ":":
            if key is None:
                args.append(current)
            else:
                kwargs[key] = current
            key, current = None, ""
        elif character == "=" and key is None:
            key, current = current, ""
        else:
            current += character
    if key is None:
        args.append(current)
    else:
        kwargs[key] = current
    return args, kwargs


def socketKey(kind: str, address: str) -> str:
    """
    The default name of a socket, as passed in C{LISTEN_FDNAMES}: C{kind}
    and the address asked for (not the one bound, so that C{grace:tcp:0}
    finds its socket again after a restart), such as C{tcp/127.0.0.1/8080}
    or C{unix//run/app.sock}.  C{%}, C{:} and NUL are escaped because
    C{LISTEN_FDNAMES} separates names with colons and an environment cannot
    carry NUL.
    """
    name = f"{kind}/{address}"
    return name.replace("%", "%25").replace(":", "%3A").replace("\0", "%00")


class _Invalid(Exception):
    """
    What is wrong with an endpoint string, in a few words.
    """


def _number(parameter: str, value: str, most: int, base: int = 10) -> int:
    try:
        number = int(value, base)
    except ValueError:
        kind = "an octal number" if base == 8 else "a number"
        raise _Invalid(f"{parameter} {value!r} is not {kind}") from None
    if not 0 <= number <= most:
        if base == 8:
            raise _Invalid(f"{parameter} must be 0-{most:o} (octal), not {value}")
        raise _Invalid(f"{parameter} must be 0-{most}, not {number}")
    return number


def _readFile(parameter: str, path: str, default: bool = False) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        which = f"{parameter} file {path!r}" + (" (the default)" if default else "")
        raise _Invalid(f"{which} cannot be read: {why}") from None


def _checkTLSFiles(parameters: dict[str, str]) -> None:
    """
    Check that the key and certificate files of an C{ssl:} string can be
    read and hold what they should, and say which one does not.
    """
    from OpenSSL import SSL, crypto

    method = parameters.get("sslmethod")
    if method is not None and not (
        method.endswith("_METHOD") and isinstance(getattr(SSL, method, None), int)
    ):
        raise _Invalid(
            f"sslmethod {method!r} is not an OpenSSL method such as TLS_METHOD"
        )
    keyPath = parameters.get("privateKey", "server.pem")
    keyPEM = _readFile("privateKey", keyPath, "privateKey" not in parameters)
    certPath = parameters.get("certKey")
    certPEM = keyPEM if certPath is None else _readFile("certKey", certPath)
    try:
        crypto.load_privatekey(crypto.FILETYPE_PEM, keyPEM)
    except crypto.Error:
        raise _Invalid(
            f"privateKey file {keyPath!r} holds no unencrypted PEM private key"
        ) from None
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, certPEM)
    except crypto.Error:
        if certPath is None:
            raise _Invalid(
                f"certKey is missing, and privateKey file {keyPath!r} holds no "
                "PEM certificate"
            ) from None
        raise _Invalid(f"certKey file {certPath!r} holds no PEM certificate") from None
    for parameter in ("extraCertChain", "dhParameters"):
        if parameter in parameters:
            _readFile(parameter, parameters[parameter])


def _checkParameters(
    kind: str, values: list[str], keyed: dict[str, str], name: str | None
) -> None:
    """
    Check the parameters of an inner C{kind} string: C{values} given without
    a key (after the type) and C{keyed} ones.

    @param name: The grace string's C{name=}, if any.
    @raise _Invalid: Saying what is wrong.
    """
    takes = _PARAMETERS[kind]
    first = takes[0]
    described = f"{kind} takes {', '.join(takes)}, name"
    for key in keyed:
        if key not in takes:
            raise _Invalid(f"unknown parameter {key!r} ({described})")
    if len(values) > 1:
        extra = values[1]
        if name is not None:
            # serverFromString reads name=a:b as name=a and a value 'b'.
            raise _Invalid(
                f"unexpected {extra!r}: is it part of name={name}? A name may "
                "not contain ':'"
            )
        raise _Invalid(
            f"unexpected {extra!r}: only the {first} is given without key= "
            f"({described})"
        )
    parameters = dict(keyed)
    if values:
        if first in parameters:
            raise _Invalid(f"{first} is given twice")
        parameters[first] = values[0]
    if first not in parameters:
        if first == "port":
            raise _Invalid(f"{kind} needs a port")
        raise _Invalid(f"{kind} needs the path of the socket")
    if first == "port":
        _number("port", parameters["port"], 65535)
    if "backlog" in parameters:
        _number("backlog", parameters["backlog"], _MOST_BACKLOG)
    if "mode" in parameters:
        _number("mode", parameters["mode"], 0o777, 8)
    if "lockfile" in parameters and parameters["lockfile"].strip() not in ("0", "1"):
        raise _Invalid(f"lockfile must be 0 or 1, not {parameters['lockfile']!r}")
    if kind == "ssl":
        _checkTLSFiles(parameters)


def _checkName(name: str) -> None:
    if not name:
        raise _Invalid("name= may not be empty")
    if ":" in name:
        raise _Invalid(
            "a name may not contain ':' (LISTEN_FDNAMES separates names with ':')"
        )
    if "\0" in name:
        raise _Invalid("a name may not contain NUL")


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
            description = "grace:" + inner + ("" if name is None else f":name={_quote(name)}")
        self.description = description
        self.name = name
        self._reactor = reactor
        self.registry = processRegistry if registry is None else registry
        try:
            inner = self._check(inner, name)
            self._inner = serverFromString(_AdoptingReactor(reactor, self), inner)
        except _Invalid as e:
            raise ValueError(f"Invalid endpoint '{self.description}': {e}") from None
        except Exception as e:
            raise ValueError(
                f"Invalid endpoint '{self.description}': {inner.split(':', 1)[0]}: {e}"
            ) from None

    @staticmethod
    def _check(inner: str, name: str | None) -> str:
        """
        Check C{inner} and C{name}.

        @return: C{inner} as Twisted's parsers should read it.
        @raise _Invalid: Saying what is wrong.
        """
        try:
            values, keyed = splitEndpoint(inner)
        except ValueError as e:
            raise _Invalid(str(e)) from None
        kind = values.pop(0) if values else ""
        if kind not in SUPPORTED_TYPES:
            if not kind and not values:
                raise _Invalid(f"expected grace:<{'|'.join(SUPPORTED_TYPES)}>:...")
            raise _Invalid(f"grace: supports {', '.join(SUPPORTED_TYPES)}, not {kind!r}")
        if name is not None:
            _checkName(name)
        _checkParameters(kind, values, keyed, name)
        return unparseEndpoint((kind, *values), dict(keyed))

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

        The first C{grace:} listen of a process installs its lifecycle (see
        L{txgrace.lifecycle}), whatever program runs it.

        @return: A Deferred that fires with the listening port, or fails with
            L{twisted.internet.error.CannotListenError} naming the address.
        @raise SystemExit: With one line, if a C{TXGRACE_*} variable has a
            bad value.
        """
        if self.registry is not processRegistry:
            # A registry of its own (as in tests) is not this process's.
            return self._inner.listen(protocolFactory)
        lifecycle = lifecycleFor(self.registry, self._reactor)
        try:
            lifecycle.install()  # Before the port accepts anything.
        except SettingError as e:
            raise SystemExit(f"txgrace: error: {e}") from None
        return lifecycle.listening(self._inner.listen(protocolFactory))

    def __repr__(self) -> str:
        return f"<GraceServerEndpoint {self.description!r}>"


def parseGraceEndpoint(
    reactor: Any, /, *args: object, **kwargs: object
) -> GraceServerEndpoint:
    """
    Make a L{GraceServerEndpoint} from the parts of a C{grace:} string, as
    L{twisted.internet.interfaces.IStreamServerEndpointStringParser} asks.

    @raise ValueError: If the string is malformed, names an unsupported
        type, or a parameter is unknown or bad; the message quotes the
        string and says what is wrong, in one line.
    """
    description = "grace:" + unparseEndpoint(args, kwargs)
    name = kwargs.pop("name", None)
    return GraceServerEndpoint(
        reactor,
        unparseEndpoint(args, kwargs),
        None if name is None else str(name),
        description=description,
    )
