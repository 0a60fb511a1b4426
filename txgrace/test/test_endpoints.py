"""
Tests for L{txgrace.endpoints}: parsing C{grace:} strings through Twisted's
plugin system, and serving HTTP and TLS on the adopted ports they make.

Every socket here is a real one, bound only on 127.0.0.1, ::1 or a UNIX path
in a temporary directory.  Each serving test uses its own L{SocketRegistry}
that inherits nothing, so the tests never touch the process registry.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
from typing import Any, Callable

from hypothesis import assume, example, given, settings
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
    serverFromString,
)
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from txgrace import testing
from txgrace.adopt import GraceTCPPort, GraceUNIXPort, SocketRegistry
from txgrace.adopt import registry as processRegistry
from txgrace.endpoints import GraceServerEndpoint, splitEndpoint, unparseEndpoint
from txgrace.inherit import InheritedSocket
from txgrace.test._strategies import canonicalEndpointTexts, endpointTexts
from txgrace.testing import writeSelfSignedCertificate

BODY = b"hello from txgrace"


def _ipv6Loopback() -> bool:
    """
    Whether a socket can be bound on ::1 here.
    """
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = _ipv6Loopback()


class _Hello(Resource):
    """
    Answers every GET with L{BODY}.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return BODY


def _site() -> Site:
    return Site(_Hello())


def _isolated(description: str, name: str | None = None) -> GraceServerEndpoint:
    """
    A grace endpoint on C{description} (without the C{grace:} prefix) with a
    registry of its own that inherits no sockets.
    """
    return GraceServerEndpoint(
        reactor, description, name=name, registry=SocketRegistry(inherit=lambda: [])
    )


def _whenNoConnections(registry: SocketRegistry) -> Deferred[None]:
    """
    A Deferred that fires once C{registry} tracks no connection.
    """
    done: Deferred[None] = Deferred()
    if not registry.connections:
        done.callback(None)
        return done

    def observer(connection: object) -> None:
        if not registry.connections:
            registry.removeConnectionLostObserver(observer)
            done.callback(None)

    registry.addConnectionLostObserver(observer)
    return done


def _firstServerProtocol() -> tuple[Factory, Deferred[Protocol]]:
    """
    A server factory, and a Deferred that fires with its first protocol once
    that is connected.
    """
    connected: Deferred[Protocol] = Deferred()

    class Server(Protocol):
        def connectionMade(self) -> None:
            if not connected.called:
                connected.callback(self)

    return Factory.forProtocol(Server), connected


@implementer(IAgentEndpointFactory)
class _FixedEndpoint:
    """
    Sends every request of an L{Agent} to one client endpoint, whatever the
    URI says (this is how an Agent talks to a UNIX socket).
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        return self._endpoint


class _ServingMixin:
    """
    Listening on isolated grace endpoints and fetching from them over HTTP,
    with everything closed again in cleanup.
    """

    addCleanup: Any
    assertEqual: Any

    async def listen(self, endpoint: GraceServerEndpoint, factory: Any = None) -> Any:
        """
        Listen on C{endpoint} (a L{Site} unless C{factory} is given) and stop
        listening in cleanup, after closing every connection it accepted.
        """
        port = await endpoint.listen(_site() if factory is None else factory)
        registry = endpoint.registry

        async def close() -> None:
            for connection in list(registry.connections):
                connection.abortConnection()
            await _whenNoConnections(registry)
            await maybeDeferred(port.stopListening)

        self.addCleanup(close)
        return port

    def mkdtemp(self) -> str:
        """
        A short temporary directory (UNIX socket paths are limited to about
        100 bytes), removed in cleanup.
        """
        directory = tempfile.mkdtemp(prefix="txgrace-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        return directory

    async def fetch(self, client: IStreamClientEndpoint) -> tuple[int, bytes]:
        """
        GET / through C{client} with treq (L{txgrace.testing.get}).

        @return: The status code and the body.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent.usingEndpointFactory(reactor, _FixedEndpoint(client), pool=pool)
        response = await testing.get("http://localhost/", agent=agent)
        return response.status, response.body


class ParseTests(TestCase):
    """
    C{grace:} strings parsed by L{serverFromString}, which finds the parser
    through the plugin in C{twisted/plugins/txgrace_plugin.py}.
    """

    def setUp(self) -> None:
        self.keyPath, self.certPath = writeSelfSignedCertificate(self.mktemp())

    def assertInvalid(self, description: str) -> ValueError:
        """
        Parsing C{description} raises L{ValueError} whose message quotes the
        whole string.
        """
        error = self.assertRaises(ValueError, serverFromString, reactor, description)
        self.assertIn(f"'{description}'", str(error))
        return error

    def test_tcp(self) -> None:
        """
        C{grace:tcp:...} gives a L{GraceServerEndpoint}: the plugin loads.
        """
        endpoint = serverFromString(reactor, "grace:tcp:0:interface=127.0.0.1")
        self.assertIsInstance(endpoint, GraceServerEndpoint)
        self.assertEqual(endpoint.description, "grace:tcp:0:interface=127.0.0.1")
        self.assertIsNone(endpoint.name)

    def test_tcp6(self) -> None:
        """
        C{grace:tcp6:...} with an escaped IPv6 interface is accepted.
        """
        endpoint = serverFromString(reactor, r"grace:tcp6:0:interface=\:\:1")
        self.assertIsInstance(endpoint, GraceServerEndpoint)

    def test_unix(self) -> None:
        """
        C{grace:unix:...} is accepted, with a mode.
        """
        endpoint = serverFromString(reactor, "grace:unix:/tmp/nothing.sock:mode=600")
        self.assertIsInstance(endpoint, GraceServerEndpoint)

    def test_ssl(self) -> None:
        """
        C{grace:ssl:...} with a readable key and certificate is accepted.
        """
        endpoint = serverFromString(
            reactor,
            f"grace:ssl:0:interface=127.0.0.1:privateKey={self.keyPath}"
            f":certKey={self.certPath}",
        )
        self.assertIsInstance(endpoint, GraceServerEndpoint)

    def test_name(self) -> None:
        """
        C{name=} sets the socket's name and is not passed to the inner
        parser.
        """
        endpoint = serverFromString(reactor, "grace:tcp:0:name=web")
        self.assertIsInstance(endpoint, GraceServerEndpoint)
        self.assertEqual(endpoint.name, "web")

    def test_registryIsTheProcessOne(self) -> None:
        """
        A parsed endpoint uses the process's registry.
        """
        endpoint = serverFromString(reactor, "grace:tcp:0")
        self.assertIs(endpoint.registry, processRegistry)

    def test_unsupportedType(self) -> None:
        """
        A type other than tcp, tcp6, ssl and unix is refused.
        """
        self.assertInvalid("grace:udp:53")

    def test_empty(self) -> None:
        """
        C{grace:} alone, or with only parameters, is refused.
        """
        self.assertMessage("grace:", "expected grace:<tcp|tcp6|ssl|unix>:...")
        self.assertMessage("grace:=", "expected grace:<tcp|tcp6|ssl|unix>:...")

    def assertMessage(self, description: str, problem: str) -> None:
        """
        Parsing C{description} raises L{ValueError} with exactly this message:
        the string quoted, then C{problem}.
        """
        error = self.assertRaises(ValueError, serverFromString, reactor, description)
        self.assertEqual(str(error), f"Invalid endpoint '{description}': {problem}")

    def test_badPort(self) -> None:
        """
        A port that is not a number is refused.
        """
        self.assertMessage("grace:tcp:notaport", "port 'notaport' is not a number")

    def test_portTooLarge(self) -> None:
        """
        A port above 65535 is refused when the string is parsed, not with an
        C{OverflowError} when it listens.
        """
        self.assertMessage("grace:tcp:99999", "port must be 0-65535, not 99999")

    def test_portNegative(self) -> None:
        """
        A negative port is refused.
        """
        self.assertMessage("grace:ssl:-1", "port must be 0-65535, not -1")

    def test_portMissing(self) -> None:
        """
        A TCP string needs a port, a UNIX string a path.
        """
        self.assertMessage("grace:tcp", "tcp needs a port")
        self.assertMessage("grace:unix:mode=600", "unix needs the path of the socket")

    def test_portKeyword(self) -> None:
        """
        The port may be given as C{port=}, but not twice.
        """
        endpoint = serverFromString(reactor, "grace:tcp:port=0")
        self.assertIsInstance(endpoint, GraceServerEndpoint)
        self.assertMessage("grace:tcp:0:port=1", "port is given twice")

    def test_unknownParameter(self) -> None:
        """
        A parameter that the type does not take is named, with the ones it
        does take.
        """
        self.assertMessage(
            "grace:tcp:8080:bogus=1",
            "unknown parameter 'bogus' (tcp takes port, interface, backlog, name)",
        )
        self.assertMessage(
            "grace:unix:/tmp/x.sock:interface=x",
            "unknown parameter 'interface' "
            "(unix takes address, mode, backlog, lockfile, name)",
        )

    def test_reactorParameter(self) -> None:
        """
        C{reactor=} (or C{self=}) is an unknown parameter like any other,
        not a C{TypeError} from the plugin's own signature.
        """
        for key in ("reactor", "self"):
            self.assertMessage(
                f"grace:tcp:0:{key}=1",
                f"unknown parameter '{key}' (tcp takes port, interface, backlog, name)",
            )

    def test_secondValue(self) -> None:
        """
        Only the port is given without C{key=}.
        """
        self.assertMessage(
            "grace:tcp:0:127.0.0.1",
            "unexpected '127.0.0.1': only the port is given without key= "
            "(tcp takes port, interface, backlog, name)",
        )

    def test_badBacklog(self) -> None:
        """
        A backlog must be a number that C{listen()} takes.
        """
        self.assertMessage("grace:tcp:0:backlog=x", "backlog 'x' is not a number")
        self.assertMessage(
            "grace:tcp:0:backlog=99999999999",
            "backlog must be 0-2147483647, not 99999999999",
        )

    def test_badMode(self) -> None:
        """
        A UNIX socket's mode is octal, at most 777.
        """
        self.assertMessage(
            "grace:unix:/tmp/x.sock:mode=9", "mode '9' is not an octal number"
        )
        self.assertMessage(
            "grace:unix:/tmp/x.sock:mode=4777", "mode must be 0-777 (octal), not 4777"
        )

    def test_badLockfile(self) -> None:
        """
        C{lockfile=} is 0 or 1.
        """
        self.assertMessage(
            "grace:unix:/tmp/x.sock:lockfile=yes", "lockfile must be 0 or 1, not 'yes'"
        )

    def test_missingCertificate(self) -> None:
        """
        Key and certificate files that do not exist are refused, naming the
        first one.
        """
        self.assertMessage(
            "grace:ssl:0:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem",
            "privateKey file '/nonexistent/k.pem' cannot be read: "
            "No such file or directory",
        )
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.keyPath}:certKey=/nonexistent/c.pem",
            "certKey file '/nonexistent/c.pem' cannot be read: "
            "No such file or directory",
        )

    def test_defaultKeyMissing(self) -> None:
        """
        Without C{privateKey=}, Twisted's default C{server.pem} is named.
        """
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(os.path.dirname(self.keyPath))
        self.assertMessage(
            "grace:ssl:0",
            "privateKey file 'server.pem' (the default) cannot be read: "
            "No such file or directory",
        )

    def test_certificateMissing(self) -> None:
        """
        Without C{certKey=}, the key file must hold the certificate too; a
        file with only a key is refused with a message that says so (not
        OpenSSL's C{PEM routines ... no start line}).
        """
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.keyPath}",
            f"certKey is missing, and privateKey file '{self.keyPath}' holds no "
            "PEM certificate",
        )

    def test_keyIsNoKey(self) -> None:
        """
        A C{privateKey} file without a private key is refused.
        """
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.certPath}:certKey={self.certPath}",
            f"privateKey file '{self.certPath}' holds no unencrypted PEM private key",
        )

    def test_keyAndCertificateInOneFile(self) -> None:
        """
        A C{privateKey} file that holds the certificate too needs no
        C{certKey=}.
        """
        both = os.path.join(os.path.dirname(self.keyPath), "both.pem")
        with open(both, "wb") as out:
            for path in (self.keyPath, self.certPath):
                with open(path, "rb") as f:
                    out.write(f.read())
        endpoint = serverFromString(reactor, f"grace:ssl:0:privateKey={both}")
        self.assertIsInstance(endpoint, GraceServerEndpoint)

    def test_garbageCertificate(self) -> None:
        """
        A certificate file that holds no certificate is refused.
        """
        garbage = os.path.join(os.path.dirname(self.certPath), "garbage.pem")
        with open(garbage, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.keyPath}:certKey={garbage}",
            f"certKey file '{garbage}' holds no PEM certificate",
        )

    def test_unreadableCertificate(self) -> None:
        """
        A certificate path that cannot be read as a file (a directory; file
        permissions would not stop root) is refused.
        """
        directory = os.path.dirname(self.certPath)
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.keyPath}:certKey={directory}",
            f"certKey file '{directory}' cannot be read: Is a directory",
        )

    def test_mismatchedCertificate(self) -> None:
        """
        A certificate for another key is refused with Twisted's words.
        """
        _, otherCert = writeSelfSignedCertificate(self.mktemp())
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.keyPath}:certKey={otherCert}",
            "ssl: Certificate public and private keys do not match.",
        )

    def test_badSSLMethod(self) -> None:
        """
        C{sslmethod=} must name an OpenSSL method.
        """
        self.assertMessage(
            f"grace:ssl:0:privateKey={self.keyPath}:certKey={self.certPath}"
            ":sslmethod=Context",
            "sslmethod 'Context' is not an OpenSSL method such as TLS_METHOD",
        )

    def test_nameWithColon(self) -> None:
        """
        A name with C{:} cannot be passed in C{LISTEN_FDNAMES}.
        """
        self.assertMessage(
            r"grace:tcp:0:name=a\:b",
            "a name may not contain ':' (LISTEN_FDNAMES separates names with ':')",
        )
        error = self.assertRaises(
            ValueError, GraceServerEndpoint, reactor, "tcp:0", name="a:b"
        )
        self.assertIn("'grace:tcp:0:name=", str(error))

    def test_nameWithUnescapedColon(self) -> None:
        """
        L{serverFromString} reads C{name=a:b} as C{name=a} followed by a value
        C{b}; the message says what that value probably is.
        """
        error = self.assertRaises(
            ValueError, serverFromString, reactor, "grace:tcp:0:name=a:b"
        )
        self.assertEqual(
            str(error),
            "Invalid endpoint 'grace:tcp:0:b:name=a': unexpected 'b': is it part "
            "of name=a? A name may not contain ':'",
        )

    def test_emptyName(self) -> None:
        """
        An empty name is refused.
        """
        self.assertMessage("grace:tcp:0:name=", "name= may not be empty")
        error = self.assertRaises(
            ValueError, GraceServerEndpoint, reactor, "tcp:0", name=""
        )
        self.assertIn("'grace:tcp:0:name=", str(error))

    def test_loneBackslash(self) -> None:
        """
        An inner string that ends with a lone backslash is refused.
        (L{serverFromString} itself raises C{RuntimeError} on such a
        C{grace:} string before the grace parser is called.)
        """
        error = self.assertRaises(ValueError, GraceServerEndpoint, reactor, "tcp:0\\")
        self.assertEqual(
            str(error), "Invalid endpoint 'grace:tcp:0\\': it ends with a lone '\\'"
        )

    def test_badStringWithNameQuotesAll(self) -> None:
        """
        The message for a bad string that has C{name=} quotes the whole
        string, C{name=} included.
        """
        self.assertInvalid("grace:tcp:notaport:name=web")
        self.assertInvalid("grace:tcp:0:name=")


def _twistedReads(text: str) -> bool:
    """
    Whether L{serverFromString} hands C{"grace:" + text} to the grace parser
    at all.  Its own tokenizer raises C{RuntimeError} on a trailing lone
    backslash, and C{UnicodeEncodeError} (a L{ValueError} that does not
    quote the string) on a key that is not ASCII, before the grace parser
    is called.
    """
    if (len(text) - len(text.rstrip("\\"))) % 2 == 1:
        return False
    return all(key.isascii() for key in splitEndpoint(text)[1])


class ParsePropertyTests(TestCase):
    """
    Any text after C{grace:} either parses or raises L{ValueError} that
    quotes the string, in one line.
    """

    def setUp(self) -> None:
        # Relative file names in ssl: strings are looked up here.
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)

    def parse(self, description: str) -> GraceServerEndpoint | ValueError:
        """
        Parse C{description} as C{twist txgrace --endpoint} does, with no
        reactor; any exception but L{ValueError} fails the test.
        """
        try:
            endpoint = serverFromString(None, description)
        except ValueError as e:
            return e
        self.assertIsInstance(endpoint, GraceServerEndpoint)
        return endpoint

    def assertQuotes(self, result: GraceServerEndpoint | ValueError, quoted: str) -> None:
        """
        C{result} is an endpoint described by C{quoted}, or an error whose
        one-line message quotes it.
        """
        if isinstance(result, GraceServerEndpoint):
            self.assertEqual(result.description, quoted)
            return
        prefix = f"Invalid endpoint '{quoted}': "
        message = str(result)
        self.assertEqual(message[: len(prefix)], prefix)
        problem = message[len(prefix) :]
        self.assertNotEqual(problem, "")
        self.assertNotIn("\n", problem)

    @settings(max_examples=200, deadline=None)
    @given(endpointTexts)
    @example("=")
    @example("tcp:0:reactor=1:self=2")
    @example("unix:\0:name=\0")
    def test_anyText(self, text: str) -> None:
        """
        Any text parses or raises L{ValueError}, quoting the string as
        Twisted's parser split it (values without a key first, escapes
        only where needed).
        """
        assume(_twistedReads(text))
        args, kwargs = splitEndpoint(text)
        self.assertQuotes(
            self.parse("grace:" + text),
            "grace:" + unparseEndpoint(tuple(args), dict(kwargs)),
        )

    @settings(max_examples=200, deadline=None)
    @given(canonicalEndpointTexts())
    def test_canonicalText(self, text: str) -> None:
        """
        A string written the usual way is quoted exactly as written.
        """
        assume(_twistedReads(text))
        description = "grace:" + text
        self.assertQuotes(self.parse(description), description)


class CommandLineTests(TestCase):
    """
    A bad endpoint string on C{twist txgrace}'s command line.
    """

    def test_portTooLarge(self) -> None:
        """
        C{--endpoint grace:tcp:99999} exits with a usage error: one line
        that quotes the string and says what is wrong, and no traceback.
        """
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "twisted",
                "txgrace",
                "--endpoint",
                "grace:tcp:99999",
                "--app",
                "x.y",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        output = (result.stdout + result.stderr).decode()
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", output)
        mentions = [line for line in output.splitlines() if "grace:tcp:99999" in line]
        self.assertEqual(
            mentions,
            [
                "twist txgrace: error: Invalid endpoint 'grace:tcp:99999': "
                "port must be 0-65535, not 99999"
            ],
        )


class ServeTests(_ServingMixin, TestCase):
    """
    HTTP served on adopted TCP and UNIX ports.
    """

    async def test_tcp(self) -> None:
        """
        A Site on C{grace:tcp} on 127.0.0.1 answers 200 with its body.
        """
        port = await self.listen(_isolated("tcp:0:interface=127.0.0.1"))
        self.assertIsInstance(port, GraceTCPPort)
        self.assertEqual(port.getHost().host, "127.0.0.1")
        client = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        self.assertEqual(await self.fetch(client), (200, BODY))

    async def test_tcp6(self) -> None:
        """
        A Site on C{grace:tcp6} on ::1 answers 200 with its body.
        """
        if not HAVE_IPV6:
            self.skipTest("::1 is not available")
        port = await self.listen(_isolated(r"tcp6:0:interface=\:\:1"))
        self.assertIsInstance(port, GraceTCPPort)
        self.assertEqual(port.getHost().host, "::1")
        client = TCP6ClientEndpoint(reactor, "::1", port.getHost().port)
        self.assertEqual(await self.fetch(client), (200, BODY))

    async def test_unix(self) -> None:
        """
        A Site on C{grace:unix} answers 200 with its body.
        """
        path = os.path.join(self.mkdtemp(), "web.sock")
        port = await self.listen(_isolated(f"unix:{path}"))
        self.assertIsInstance(port, GraceUNIXPort)
        client = UNIXClientEndpoint(reactor, path)
        self.assertEqual(await self.fetch(client), (200, BODY))

    async def test_portRegisteredUnderKey(self) -> None:
        """
        A listening port is in its registry under its name, and leaves it
        when it stops.
        """
        endpoint = _isolated("tcp:0:interface=127.0.0.1", name="web")
        port = await self.listen(endpoint)
        self.assertEqual(endpoint.registry.ports, {"web": port})
        await port.stopListening()
        self.assertEqual(endpoint.registry.ports, {})


class AdoptionTests(_ServingMixin, TestCase):
    """
    Grace ports are adopted, so stopping one leaves other copies of the
    socket working; and their connections are tracked.
    """

    def assertCopyAccepts(self, copy: socket.socket, address: Any) -> None:
        """
        A client can connect to C{address} and C{copy} accepts it.
        """
        copy.settimeout(10)
        with socket.socket(copy.family, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(address)
            accepted, _ = copy.accept()
            accepted.close()

    async def test_stopKeepsSharedSocket(self) -> None:
        """
        After a grace port stops, a copy of its socket held elsewhere still
        accepts connections: the port never called C{shutdown()}.
        """
        port = await self.listen(_isolated("tcp:0:interface=127.0.0.1"))
        self.assertIsInstance(port, GraceTCPPort)
        copy = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(copy.close)
        address = ("127.0.0.1", port.getHost().port)
        await port.stopListening()
        self.assertCopyAccepts(copy, address)

    async def test_listenTCPShutsDownSharedSocket(self) -> None:
        """
        Control for L{test_stopKeepsSharedSocket}: a plain C{listenTCP} port
        does shut the shared socket down, so the check above can fail.
        """
        port = reactor.listenTCP(0, _site(), interface="127.0.0.1")
        copy = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(copy.close)
        address = ("127.0.0.1", port.getHost().port)
        await port.stopListening()
        self.assertRaises(ConnectionRefusedError, self.assertCopyAccepts, copy, address)

    async def test_unixStopWhileHandingOverKeepsSharedSocket(self) -> None:
        """
        After a UNIX grace port stops during a handover, a copy of its socket
        still accepts connections on the same path.
        """
        directory = tempfile.mkdtemp(prefix="txgrace-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = os.path.join(directory, "web.sock")
        endpoint = _isolated(f"unix:{path}")
        port = await self.listen(endpoint)
        copy = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(copy.close)
        endpoint.registry.handingOver = True
        await port.stopListening()
        self.assertCopyAccepts(copy, path)

    async def test_nameUsedTwice(self) -> None:
        """
        Two grace ports in one registry cannot share a socket name.
        """
        first = _isolated("tcp:0:interface=127.0.0.1", name="web")
        await self.listen(first)
        second = GraceServerEndpoint(
            reactor, "tcp:0:interface=127.0.0.1", name="web", registry=first.registry
        )
        error = await self.assertFailure(second.listen(_site()), ValueError)
        self.assertIn("'web'", str(error))
        self.assertEqual(list(first.registry.ports), ["web"])

    async def test_connectionsTracked(self) -> None:
        """
        The registry tracks a connection while it is open, and forgets it
        when it closes.
        """
        endpoint = _isolated("tcp:0:interface=127.0.0.1")
        registry = endpoint.registry
        factory, serverConnected = _firstServerProtocol()
        port = await self.listen(endpoint, factory)
        self.assertEqual(registry.connections, set())
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        server = await serverConnected
        self.assertEqual(len(registry.connections), 1)
        (connection,) = registry.connections
        self.assertIs(connection, server.transport)
        closed = _whenNoConnections(registry)
        client.transport.loseConnection()
        await closed
        self.assertEqual(registry.connections, set())

    async def test_pausedAcceptingQueues(self) -> None:
        """
        While the registry's accepting is paused, a port listens but leaves
        connections queued on its socket; they are accepted once it resumes.
        """
        endpoint = _isolated("tcp:0:interface=127.0.0.1")
        registry = endpoint.registry
        registry.pauseAccepting()
        factory, serverConnected = _firstServerProtocol()
        port = await self.listen(endpoint, factory)
        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), Protocol()
        )
        self.addCleanup(client.transport.abortConnection)
        # Give the reactor turns in which an accepting port would accept.
        for _ in range(5):
            await deferLater(reactor, 0.01)
        self.assertEqual(registry.connections, set())
        registry.resumeAccepting()
        await serverConnected
        self.assertEqual(len(registry.connections), 1)

    async def assertQuietSecondsFollowsTraffic(
        self, endpoint: Any, client: Callable[[Any], IStreamClientEndpoint]
    ) -> None:
        """
        C{quietSeconds} of the connection accepted through C{endpoint} (from
        the client endpoint C{client(port)}) grows while nothing is sent,
        and starts again from zero on traffic.
        """
        registry = endpoint.registry
        factory, serverConnected = _firstServerProtocol()
        port = await self.listen(endpoint, factory)
        clientProtocol = await connectProtocol(client(port), Protocol())
        self.addCleanup(clientProtocol.transport.abortConnection)
        server = await serverConnected
        (connection,) = registry.connections

        def quiet() -> float:
            return connection.quietSeconds(reactor.seconds())

        await deferLater(reactor, 0.3)
        before = quiet()
        self.assertGreaterEqual(before, 0.25)
        server.transport.write(b"x")
        await deferLater(reactor, 0.01)
        self.assertLess(quiet(), before)

    async def test_quietSecondsTCP(self) -> None:
        """
        A TCP connection knows how long it has been quiet (from the kernel).
        """
        await self.assertQuietSecondsFollowsTraffic(
            _isolated("tcp:0:interface=127.0.0.1"),
            lambda port: TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )

    async def test_quietSecondsUNIX(self) -> None:
        """
        A UNIX socket connection knows how long it has been quiet.
        """
        path = os.path.join(self.mkdtemp(), "s")
        await self.assertQuietSecondsFollowsTraffic(
            _isolated(f"unix:{path}"), lambda port: UNIXClientEndpoint(reactor, path)
        )


def _localhostIsLoopback() -> bool:
    """
    Whether C{localhost} resolves to 127.0.0.1 first, as it does on almost
    every host (from C{/etc/hosts}, without a query on the network).
    """
    info = socket.getaddrinfo(
        "localhost", 0, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )
    return bool(info) and info[0][4][0] == "127.0.0.1"


class HostNameTests(_ServingMixin, TestCase):
    """
    C{interface=} with a host name is resolved before it is matched with the
    addresses of inherited sockets, which are numeric.
    """

    def setUp(self) -> None:
        if not _localhostIsLoopback():
            self.skipTest("localhost does not resolve to 127.0.0.1 here")

    def inherited(self, name: str) -> tuple[SocketRegistry, int, int]:
        """
        A registry that inherited, under C{name}, a copy of a socket
        listening on 127.0.0.1.

        @return: The registry, the port, and the socket's inode.
        """
        skt = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(skt.close)
        skt.bind(("127.0.0.1", 0))
        skt.listen()
        port = skt.getsockname()[1]
        fd = os.dup(skt.fileno())
        os.set_blocking(fd, False)
        inherited = InheritedSocket(fd, name, socket.AF_INET, ("127.0.0.1", port))
        registry = SocketRegistry(inherit=lambda: [inherited])
        # Closes the copy if the endpoint did not adopt it.
        self.addCleanup(registry.closeUnclaimed)
        return registry, port, os.fstat(fd).st_ino

    async def assertAdopts(
        self, description: str, registry: SocketRegistry, port: int, inode: int
    ) -> None:
        """
        Listening on C{description} adopts the inherited socket.
        """
        endpoint = GraceServerEndpoint(reactor, description, registry=registry)
        listening = await self.listen(endpoint)
        host = listening.getHost()
        self.assertEqual((host.host, host.port), ("127.0.0.1", port))
        self.assertEqual(os.fstat(listening.fileno()).st_ino, inode)
        self.assertEqual(registry.inherited(), [])

    async def test_portZeroByName(self) -> None:
        """
        C{tcp:0:interface=localhost} adopts the socket named after it (as a
        predecessor passes it), bound to 127.0.0.1 on some port.
        """
        registry, port, inode = self.inherited("tcp/localhost/0")
        await self.assertAdopts("tcp:0:interface=localhost", registry, port, inode)

    async def test_portByAddress(self) -> None:
        """
        C{tcp:PORT:interface=localhost} adopts an unnamed inherited socket
        bound to 127.0.0.1:PORT (as systemd passes it), instead of binding
        again and failing with EADDRINUSE.
        """
        registry, port, inode = self.inherited("unknown")
        await self.assertAdopts(
            f"tcp:{port}:interface=localhost", registry, port, inode
        )

    async def test_freshSocket(self) -> None:
        """
        With nothing inherited, C{interface=localhost} binds 127.0.0.1.
        """
        port = await self.listen(_isolated("tcp:0:interface=localhost"))
        self.assertEqual(port.getHost().host, "127.0.0.1")

    async def test_unresolvable(self) -> None:
        """
        A host name that cannot be resolved fails the listen with
        L{CannotListenError} naming it.  (C{a..b} fails before any query is
        sent.)
        """
        endpoint = _isolated("tcp:0:interface=a..b")
        error = await self.assertFailure(endpoint.listen(_site()), CannotListenError)
        self.assertIn("a..b", str(error))
        self.assertEqual(endpoint.registry.ports, {})


class HostNameRestartTests(TestCase):
    """
    A restart of C{twist txgrace} on C{interface=localhost}.
    """

    def test_restartKeepsServing(self) -> None:
        """
        The successor adopts the socket on 127.0.0.1 and serves on the same
        port, instead of binding a new one.
        """
        if not _localhostIsLoopback():
            self.skipTest("localhost does not resolve to 127.0.0.1 here")
        from txgrace.test.test_process import startServer
        from txgrace.test.test_restart import get, restart

        server, serving = startServer(
            self, "--endpoint", "grace:tcp:0:interface=localhost"
        )
        self.assertEqual(serving.addresses[0][1], "127.0.0.1")
        successor = restart(server, serving)
        self.assertEqual(successor.addresses, serving.addresses)
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))


class ListenFailureTests(TestCase):
    """
    A socket that cannot be bound fails the listen with
    L{CannotListenError} naming the address.
    """

    async def test_portTaken(self) -> None:
        """
        A port that another socket listens on cannot be listened on.
        """
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        portNumber = blocker.getsockname()[1]
        endpoint = _isolated(f"tcp:{portNumber}:interface=127.0.0.1")
        error = await self.assertFailure(endpoint.listen(_site()), CannotListenError)
        self.assertIn("127.0.0.1", str(error))
        self.assertIn(str(portNumber), str(error))
        self.assertEqual(endpoint.registry.ports, {})

    async def test_addressUnavailable(self) -> None:
        """
        An address that no interface has cannot be listened on.
        """
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            if f.read().strip() != "0":
                self.skipTest("non-local bind is allowed on this host")
        endpoint = _isolated("tcp:0:interface=192.0.2.1")
        error = await self.assertFailure(endpoint.listen(_site()), CannotListenError)
        self.assertIn("192.0.2.1", str(error))


class UNIXTests(_ServingMixin, TestCase):
    """
    The socket file of a UNIX grace port: its mode, when it is removed, and
    what happens to a file already at its path.
    """

    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="txgrace-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.path = os.path.join(directory, "web.sock")

    def mode(self) -> int:
        return stat.S_IMODE(os.stat(self.path).st_mode)

    async def test_mode(self) -> None:
        """
        C{mode=600} gives the socket file mode 0600.
        """
        await self.listen(_isolated(f"unix:{self.path}:mode=600"))
        self.assertEqual(self.mode(), 0o600)

    async def test_defaultMode(self) -> None:
        """
        Without C{mode=} the socket file has Twisted's default mode, 0666.
        """
        await self.listen(_isolated(f"unix:{self.path}"))
        self.assertEqual(self.mode(), 0o666)

    async def test_stopRemovesPath(self) -> None:
        """
        A final stop removes the socket file.
        """
        port = await self.listen(_isolated(f"unix:{self.path}"))
        self.assertTrue(os.path.exists(self.path))
        await port.stopListening()
        self.assertFalse(os.path.exists(self.path))

    async def test_stopWhileHandingOverKeepsPath(self) -> None:
        """
        A stop during a handover leaves the socket file for the successor.
        """
        endpoint = _isolated(f"unix:{self.path}")
        port = await self.listen(endpoint)
        endpoint.registry.handingOver = True
        await port.stopListening()
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))

    async def test_staleSocketReplaced(self) -> None:
        """
        A socket file left by a listener that died is replaced.
        """
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.path)
        stale.close()
        self.assertTrue(os.path.exists(self.path))
        await self.listen(_isolated(f"unix:{self.path}"))
        client = UNIXClientEndpoint(reactor, self.path)
        self.assertEqual(await self.fetch(client), (200, BODY))

    async def test_liveSocketKept(self) -> None:
        """
        A socket file that something still listens on makes the listen fail
        and is left alone.
        """
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen()
        endpoint = _isolated(f"unix:{self.path}")
        error = await self.assertFailure(endpoint.listen(_site()), CannotListenError)
        self.assertIn(self.path, str(error))
        self.assertTrue(stat.S_ISSOCK(os.stat(self.path).st_mode))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(self.path)

    async def test_otherFileKept(self) -> None:
        """
        A file at the path that is not a socket makes the listen fail and is
        left alone.
        """
        with open(self.path, "w") as f:
            f.write("precious")
        endpoint = _isolated(f"unix:{self.path}")
        await self.assertFailure(endpoint.listen(_site()), CannotListenError)
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")


def _tlsRequest(
    port: int, alpn: list[str] | None, request: bytes | None
) -> tuple[str | None, bytes, bytes]:
    """
    Blocking TLS client (run it in a thread): connect to 127.0.0.1:C{port},
    offer C{alpn}, and send C{request} if given, reading until EOF.

    @return: The negotiated protocol, the server certificate (DER) and the
        response.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            selected = tls.selected_alpn_protocol()
            certificate = tls.getpeercert(binary_form=True) or b""
            response = b""
            if request is not None:
                tls.sendall(request)
                while True:
                    try:
                        chunk = tls.recv(65536)
                    except ssl.SSLEOFError:
                        break
                    if not chunk:
                        break
                    response += chunk
    return selected, certificate, response


class TLSTests(_ServingMixin, TestCase):
    """
    A Site on C{grace:ssl}, reached by a standard-library TLS client.
    """

    REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def setUp(self) -> None:
        keyPath, certPath = writeSelfSignedCertificate(self.mktemp())
        with open(certPath, "rb") as f:
            self.certificate = ssl.PEM_cert_to_DER_cert(f.read().decode("ascii"))
        self.endpoint = _isolated(
            f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        )
        self.port = await self.listen(self.endpoint)
        self.portNumber = self.port.getHost().port

    async def request(
        self, alpn: list[str] | None, request: bytes | None
    ) -> tuple[str | None, bytes]:
        """
        Run L{_tlsRequest} in a thread, check the server's certificate, and
        wait until the server has closed the connection too.
        """
        selected, certificate, response = await deferToThread(
            _tlsRequest, self.portNumber, alpn, request
        )
        self.assertEqual(certificate, self.certificate)
        await _whenNoConnections(self.endpoint.registry)
        return selected, response

    def assertOK(self, response: bytes) -> None:
        """
        C{response} is HTTP/1.1 200 with L{BODY}.
        """
        head, _, body = response.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(body, BODY)

    def test_adopted(self) -> None:
        """
        The TLS port is an adopted TCP port under a TLS factory.
        """
        self.assertIsInstance(self.port, GraceTCPPort)
        self.assertIsInstance(self.port.factory, TLSMemoryBIOFactory)

    async def test_alpnH2(self) -> None:
        """
        A client offering h2 and http/1.1 gets h2.
        """
        selected, _ = await self.request(["h2", "http/1.1"], None)
        self.assertEqual(selected, "h2")

    async def test_alpnHTTP11(self) -> None:
        """
        A client offering only http/1.1 gets it, and a 200.
        """
        selected, response = await self.request(["http/1.1"], self.REQUEST)
        self.assertEqual(selected, "http/1.1")
        self.assertOK(response)

    async def test_noALPN(self) -> None:
        """
        A client that offers no ALPN gets a 200.
        """
        selected, response = await self.request(None, self.REQUEST)
        self.assertIsNone(selected)
        self.assertOK(response)
