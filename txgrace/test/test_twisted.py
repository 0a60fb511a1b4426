"""
Tests for L{txgrace._twisted}: every private Twisted name that txgrace uses
still exists on the installed Twisted, each accessor works on real Twisted
objects, and no other txgrace module uses one of those names directly.
"""

from __future__ import annotations

import os
import re

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python import systemd
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

import txgrace
from txgrace import _twisted
from txgrace.adopt import GraceTCPPort, GraceUNIXPort
from txgrace.test.test_drain import SyncResource


class MissingNamesTests(SynchronousTestCase):
    """
    L{_twisted.missingNames} lists the private names the installed Twisted
    lacks.
    """

    def test_noneMissing(self) -> None:
        """
        The installed Twisted has every private name txgrace uses: an
        upgrade that drops one fails here first.
        """
        self.assertEqual(_twisted.missingNames(), [])

    def test_missingNameReported(self) -> None:
        """
        A name the installed Twisted lacks is reported by its label.
        """
        real = _twisted._privateNames

        def withBogus() -> list[tuple[str, object, str]]:
            return real() + [("http.HTTPChannel._gone", HTTPChannel, "_gone")]

        self.patch(_twisted, "_privateNames", withBogus)
        self.assertEqual(_twisted.missingNames(), ["http.HTTPChannel._gone"])

    def test_onlyHere(self) -> None:
        """
        No txgrace module other than L{txgrace._twisted} names one of those
        private names.
        """
        names = {name for _, _, name in _twisted._privateNames()}
        names |= set(_twisted.H2_STREAM_EVENTS.values())
        names |= {"_names", "_channel", "_bindPath", "_http2"}
        names |= {"_handlingRequest", "_dataBuffer", "_tempDataLen"}
        pattern = re.compile(
            r"\b(" + "|".join(re.escape(n) for n in sorted(names)) + r")\b"
        )
        package = os.path.dirname(txgrace.__file__)
        found = []
        for filename in sorted(os.listdir(package)):
            if not filename.endswith(".py") or filename == "_twisted.py":
                continue
            with open(os.path.join(package, filename)) as f:
                for number, line in enumerate(f, 1):
                    if pattern.search(line):
                        found.append(f"{filename}:{number}: {line.strip()}")
        self.assertEqual(found, [])


class AccessorTests(SynchronousTestCase):
    """
    Each accessor does what it says on real Twisted objects.
    """

    def test_withoutShutdown(self) -> None:
        """
        Grace ports never C{shutdown()} their socket; Twisted's UNIX ports
        do.
        """
        from twisted.internet import unix

        self.assertIs(GraceUNIXPort._shouldShutdown, False)
        self.assertIs(unix.Port._shouldShutdown, True)
        self.assertTrue(issubclass(GraceTCPPort, _twisted.tcp.Port))

    def test_unparsedBytes(self) -> None:
        """
        The part of a request line that has arrived is seen; none once the
        line is complete.
        """
        site = Site(SyncResource(), reactor=Clock())
        channel = _twisted.wrappedHTTPChannel(site.buildProtocol(None))
        self.assertIsInstance(channel, HTTPChannel)
        self.assertEqual(_twisted.unparsedBytes(channel), b"")
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HT")
        self.assertEqual(_twisted.unparsedBytes(channel), b"GET / HT")
        channel.dataReceived(b"TP/1.1\r\n")
        self.assertEqual(_twisted.unparsedBytes(channel), b"")
        channel.connectionLost(None)

    def test_wrappedHTTPChannelOfOther(self) -> None:
        """
        Anything but Twisted's switch has no wrapped channel.
        """
        self.assertIsNone(_twisted.wrappedHTTPChannel(HTTPChannel()))

    def test_h2StreamHandlers(self) -> None:
        """
        A stream handler set on an H2Connection is the one it calls.
        """
        cls = _twisted.h2ConnectionClass()
        if cls is None:
            raise self.skipTest("h2 is not installed")
        h2 = cls(Clock())
        for event in _twisted.H2_STREAM_EVENTS:
            original = _twisted.h2StreamHandler(h2, event)
            self.assertTrue(callable(original))

            def handler(event: object) -> None:
                pass

            _twisted.setH2StreamHandler(h2, event, handler)
            self.assertIs(_twisted.h2StreamHandler(h2, event), handler)

    def test_systemdParserDescriptors(self) -> None:
        """
        The C{systemd:} parser's copy of the descriptors is a L{ListenFDs}.
        """
        self.assertIsInstance(
            _twisted.systemdParserDescriptors(), systemd.ListenFDs
        )

    def test_listenFDNames(self) -> None:
        """
        The names of a L{ListenFDs}, in order and with repeats.
        """
        listenFDs = systemd.ListenFDs([3, 4, 5], ["web", "admin", "web"])
        self.assertEqual(_twisted.listenFDNames(listenFDs), ["web", "admin", "web"])
        self.assertEqual(_twisted.listenFDNames(systemd.ListenFDs([])), [])
