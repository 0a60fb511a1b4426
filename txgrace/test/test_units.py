"""
Unit tests for the small modules of txgrace: L{txgrace.pidfile},
L{txgrace.sdnotify}, L{txgrace.tap} (L{loadApp} and L{Options}) and one
refusal of L{txgrace.service.GraceService}.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import socket
import sys
import textwrap
import time
import uuid
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from txgrace import sdnotify
from txgrace.adopt import SocketRegistry
from txgrace.pidfile import checkPidFileLocation, removePidFile, writePidFile
from txgrace.master import MasterService
from txgrace.service import GraceService, RestartRefused
from txgrace.settings import SettingError, Settings, resolve
from txgrace.tap import AppError, Options, loadApp
from txgrace.test.test_process import shortTemporaryDirectory


class PidFileTests(SynchronousTestCase):
    """
    L{writePidFile}, L{removePidFile} and L{checkPidFileLocation}.
    """

    def setUp(self) -> None:
        self.directory = shortTemporaryDirectory(self)
        self.path = os.path.join(self.directory, "app.pid")

    def read(self, path: str) -> str:
        """
        The text of C{path}.
        """
        with open(path) as f:
            return f.read()

    def test_writes(self) -> None:
        """
        The pidfile holds the pid and a newline, and no temporary file is
        left behind.
        """
        writePidFile(self.path, 1234)
        self.assertEqual(self.read(self.path), "1234\n")
        self.assertEqual(os.listdir(self.directory), ["app.pid"])

    def test_replacesAtomically(self) -> None:
        """
        Writing again puts a new file in place (a new inode, renamed over the
        old one) rather than rewriting the old one in place.
        """
        writePidFile(self.path, 1)
        old = os.stat(self.path)
        with open(self.path) as oldFile:
            writePidFile(self.path, 22)
            self.assertEqual(oldFile.read(), "1\n")
        new = os.stat(self.path)
        self.assertNotEqual(old.st_ino, new.st_ino)
        self.assertEqual(self.read(self.path), "22\n")
        self.assertEqual(os.listdir(self.directory), ["app.pid"])

    def test_symlinkReplacedNotFollowed(self) -> None:
        """
        A symlink planted at the path is replaced by a regular file; the file
        it pointed to is untouched.
        """
        target = os.path.join(self.directory, "precious")
        with open(target, "w") as f:
            f.write("do not touch\n")
        os.symlink(target, self.path)
        writePidFile(self.path, 77)
        self.assertFalse(os.path.islink(self.path))
        self.assertTrue(os.path.isfile(self.path))
        self.assertEqual(self.read(self.path), "77\n")
        self.assertEqual(self.read(target), "do not touch\n")

    def test_missingDirectory(self) -> None:
        """
        Writing into a missing directory raises L{FileNotFoundError}.
        """
        path = os.path.join(self.directory, "missing", "app.pid")
        self.assertRaises(FileNotFoundError, writePidFile, path, 1)

    def test_removeOwnPid(self) -> None:
        """
        L{removePidFile} removes the file when it names the given pid.
        """
        writePidFile(self.path, 5)
        removePidFile(self.path, 5)
        self.assertFalse(os.path.exists(self.path))

    def test_removeKeepsOtherPid(self) -> None:
        """
        L{removePidFile} keeps a file naming another pid (a successor's).
        """
        writePidFile(self.path, 6)
        removePidFile(self.path, 5)
        self.assertEqual(self.read(self.path), "6\n")

    def test_removeMissing(self) -> None:
        """
        L{removePidFile} of a missing file does nothing.
        """
        removePidFile(self.path, 5)
        self.assertFalse(os.path.exists(self.path))

    def test_checkLocationGood(self) -> None:
        """
        L{checkPidFileLocation} accepts a path in a writable directory.
        """
        checkPidFileLocation(self.path)

    def test_checkLocationMissingDirectory(self) -> None:
        """
        L{checkPidFileLocation} raises L{ValueError} naming the path when its
        directory is missing.
        """
        path = os.path.join(self.directory, "missing", "app.pid")
        e = self.assertRaises(ValueError, checkPidFileLocation, path)
        self.assertIn(path, str(e))


class NotifyTests(SynchronousTestCase):
    """
    L{sdnotify.notify} and L{sdnotify.reloading}.
    """

    def listen(self, address: str) -> socket.socket:
        """
        A non-blocking datagram socket bound to C{address}, closed after the
        test.
        """
        skt = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(skt.close)
        skt.bind(address)
        skt.setblocking(False)
        return skt

    def test_path(self) -> None:
        """
        The assignments go, joined by newlines, in one datagram to the path
        in C{NOTIFY_SOCKET}.
        """
        path = os.path.join(shortTemporaryDirectory(self), "notify")
        skt = self.listen(path)
        self.assertTrue(sdnotify.notify("A=1", "B=2", environ={"NOTIFY_SOCKET": path}))
        self.assertEqual(skt.recv(4096), b"A=1\nB=2")
        self.assertRaises(BlockingIOError, skt.recv, 4096)

    def test_abstract(self) -> None:
        """
        A C{NOTIFY_SOCKET} starting with C{@} names a socket in the abstract
        namespace.
        """
        name = f"txgrace-test-{uuid.uuid4().hex}"
        skt = self.listen("\0" + name)
        self.assertTrue(
            sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        )
        self.assertEqual(skt.recv(4096), b"READY=1")

    def test_notSet(self) -> None:
        """
        Without C{NOTIFY_SOCKET}, nothing is sent and C{notify} returns
        C{False}.
        """
        path = os.path.join(shortTemporaryDirectory(self), "notify")
        skt = self.listen(path)
        self.assertFalse(sdnotify.notify("READY=1", environ={}))
        self.assertFalse(sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": ""}))
        self.assertRaises(BlockingIOError, skt.recv, 4096)

    def test_nobodyListening(self) -> None:
        """
        A socket path where nobody listens (missing, or bound by a socket
        since closed) makes C{notify} return C{False}, without raising.
        """
        directory = shortTemporaryDirectory(self)
        missing = os.path.join(directory, "missing")
        self.assertFalse(sdnotify.notify("A=1", environ={"NOTIFY_SOCKET": missing}))
        stale = os.path.join(directory, "stale")
        skt = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        skt.bind(stale)
        skt.close()
        self.assertFalse(sdnotify.notify("A=1", environ={"NOTIFY_SOCKET": stale}))
        abstract = "@txgrace-test-nobody-" + uuid.uuid4().hex
        self.assertFalse(sdnotify.notify("A=1", environ={"NOTIFY_SOCKET": abstract}))

    def test_reloading(self) -> None:
        """
        L{sdnotify.reloading} is C{RELOADING=1} and the monotonic clock in
        microseconds.
        """
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading, monotonic = sdnotify.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.assertEqual(reloading, "RELOADING=1")
        match = re.fullmatch(r"MONOTONIC_USEC=([0-9]+)", monotonic)
        self.assertIsNotNone(match)
        assert match is not None
        self.assertTrue(before <= int(match.group(1)) <= after)


APP_MODULE = """
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import Site

resource = Resource()
site = Site(Resource())
factory = Factory.forProtocol(Protocol)
number = 42

def makeResource():
    return made

made = Resource()

class Holder:
    site = site

class App:
    resource = Resource()

app = App()

def broken():
    raise KeyError("inner")
"""


class LoadAppTests(SynchronousTestCase):
    """
    L{loadApp} imports what C{--app} names from a package on C{sys.path}.
    """

    def setUp(self) -> None:
        directory = shortTemporaryDirectory(self)
        self.package = "txgrace_testapp_" + uuid.uuid4().hex
        packageDir = self.packageDir = os.path.join(directory, self.package)
        os.mkdir(packageDir)
        files = {
            "__init__.py": "",
            "app.py": APP_MODULE,
        }
        for name, text in files.items():
            with open(os.path.join(packageDir, name), "w") as f:
                f.write(textwrap.dedent(text))
        savedPath = list(sys.path)

        def restore() -> None:
            sys.path[:] = savedPath
            for name in list(sys.modules):
                if name == self.package or name.startswith(self.package + "."):
                    del sys.modules[name]

        self.addCleanup(restore)
        sys.path.insert(0, directory)
        importlib.invalidate_caches()

    def spec(self, rest: str) -> str:
        """
        C{rest} below the test package.
        """
        return f"{self.package}.{rest}"

    def appError(self, spec: str) -> str:
        """
        The message of the L{AppError} that loading C{spec} raises; it is
        one line and names C{spec}.
        """
        e = self.assertRaises(AppError, loadApp, spec)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertIn(spec, message)
        return message

    def test_siteDotted(self) -> None:
        """
        C{pkg.mod.attr} naming a L{Site} loads that Site.
        """
        module = importlib.import_module(self.spec("app"))
        self.assertIs(loadApp(self.spec("app.site")), module.site)

    def test_siteColon(self) -> None:
        """
        C{pkg.mod:attr} works too.
        """
        module = importlib.import_module(self.spec("app"))
        self.assertIs(loadApp(self.spec("app:site")), module.site)

    def test_colonNestedAttribute(self) -> None:
        """
        After a colon, the attribute may be dotted.
        """
        module = importlib.import_module(self.spec("app"))
        self.assertIs(loadApp(self.spec("app:Holder.site")), module.site)

    def test_dottedNestedAttribute(self) -> None:
        """
        Without a colon, the longest importable prefix is the module and the
        rest an attribute path: C{pkg.mod.app.resource} is
        C{pkg.mod:app.resource}.
        """
        module = importlib.import_module(self.spec("app"))
        for spec in (self.spec("app.app.resource"), self.spec("app:app.resource")):
            site = loadApp(spec)
            self.assertIsInstance(site, Site)
            self.assertIs(site.resource, module.app.resource)

    def test_klein(self) -> None:
        """
        A Klein app is served through its C{resource()}, named as the app or
        as its C{resource} method.
        """
        try:
            import klein  # noqa: F401
        except ImportError:
            raise SkipTest("klein is not installed")
        from klein.resource import KleinResource

        with open(os.path.join(self.packageDir, "kleinapp.py"), "w") as f:
            f.write(
                "from klein import Klein\n"
                "app = Klein()\n"
                "\n"
                "@app.route('/')\n"
                "def home(request):\n"
                "    return 'home'\n"
            )
        importlib.invalidate_caches()
        for spec in (self.spec("kleinapp.app"), self.spec("kleinapp.app.resource")):
            self.assertIsInstance(loadApp(spec).resource, KleinResource)

    def test_resourceWrappedInSite(self) -> None:
        """
        An L{IResource} is served by a new L{Site}.
        """
        module = importlib.import_module(self.spec("app"))
        for spec in (self.spec("app.resource"), self.spec("app:resource")):
            site = loadApp(spec)
            self.assertIsInstance(site, Site)
            self.assertIs(site.resource, module.resource)

    def test_protocolFactory(self) -> None:
        """
        An L{IProtocolFactory} is served as it is.
        """
        module = importlib.import_module(self.spec("app"))
        factory = loadApp(self.spec("app.factory"))
        self.assertIs(factory, module.factory)
        self.assertTrue(IProtocolFactory.providedBy(factory))
        self.assertIsInstance(factory, Factory)

    def test_callable(self) -> None:
        """
        A callable with no arguments is called; the L{Resource} it returns is
        served by a L{Site}.
        """
        module = importlib.import_module(self.spec("app"))
        site = loadApp(self.spec("app:makeResource"))
        self.assertIsInstance(site, Site)
        self.assertIs(site.resource, module.made)
        self.assertIsInstance(site.resource, Resource)

    def test_callableRaises(self) -> None:
        """
        A callable that raises gives an L{AppError} with the exception.
        """
        message = self.appError(self.spec("app.broken"))
        self.assertIn("KeyError", message)
        self.assertIn("inner", message)

    def test_missingModule(self) -> None:
        """
        A missing module: C{no module named}.
        """
        for spec in (self.spec("nosuch.attr"), self.spec("nosuch:attr")):
            self.assertIn("no module named", self.appError(spec))

    def test_missingPackage(self) -> None:
        """
        A missing top-level package: C{no module named}.
        """
        spec = "txgrace_no_such_package_" + uuid.uuid4().hex + ".mod.attr"
        self.assertIn("no module named", self.appError(spec))

    def test_missingAttribute(self) -> None:
        """
        A missing attribute: C{has no attribute}.
        """
        for spec in (self.spec("app.nosuch"), self.spec("app:nosuch")):
            self.assertIn("has no attribute", self.appError(spec))

    def test_wrongType(self) -> None:
        """
        Something that cannot be served: C{is not a Site}.
        """
        for spec in (self.spec("app.number"), self.spec("app:number")):
            self.assertIn("is not a Site", self.appError(spec))

    def test_malformed(self) -> None:
        """
        A spec with no module or no attribute is refused.
        """
        for spec in ("nodots", ":attr", "mod:"):
            self.assertIn("expected", self.appError(spec))


class OptionsTests(SynchronousTestCase):
    """
    L{Options}, the command line of C{twist txgrace}.
    """

    def parse(self, *args: str) -> Options:
        """
        Parse C{args}.
        """
        options = Options()
        options.parseOptions(list(args))
        return options

    def usageError(self, *args: str) -> str:
        """
        The message of the L{usage.UsageError} that parsing C{args} raises.
        """
        e = self.assertRaises(usage.UsageError, self.parse, *args)
        return str(e)

    def test_good(self) -> None:
        """
        A full command line parses, with the restart signals defaulting to
        HUP and USR2.
        """
        options = self.parse(
            "--endpoint", "grace:tcp:0", "--app", "x.y", "--hammer-timeout", "0"
        )
        self.assertEqual(options["endpoints"], ["grace:tcp:0"])
        self.assertEqual(options["app"], "x.y")
        self.assertEqual(options["hammer-timeout"], 0.0)
        self.assertIsInstance(options["hammer-timeout"], float)
        # Options not given are left to the environment and the defaults.
        self.assertIsNone(options["ready-timeout"])
        self.assertEqual(options["restart-signals"], [])
        self.assertIsNone(options["pidfile"])
        self.assertEqual(options.settings(), {"hammerTimeout": 0.0})

    def test_repeatedEndpoints(self) -> None:
        """
        C{--endpoint} and C{-e} repeat.
        """
        options = self.parse(
            "--endpoint", "grace:tcp:0", "-e", "grace:unix:/tmp/x.sock", "--app", "x.y"
        )
        self.assertEqual(
            options["endpoints"], ["grace:tcp:0", "grace:unix:/tmp/x.sock"]
        )

    def test_negativeHammerTimeout(self) -> None:
        """
        A negative hammer timeout (never abort) is allowed.
        """
        options = self.parse(
            "--endpoint", "grace:tcp:0", "--app", "x.y", "--hammer-timeout", "-1"
        )
        self.assertEqual(options["hammer-timeout"], -1.0)

    def test_endpointUnsupportedType(self) -> None:
        """
        A C{grace:} endpoint of an unsupported type is refused, quoting it.
        """
        message = self.usageError("--endpoint", "grace:udp:53", "--app", "x.y")
        self.assertIn("grace:udp:53", message)

    def test_badHammerTimeout(self) -> None:
        """
        A hammer timeout that is not a number is refused, naming the option.
        """
        message = self.usageError(
            "--endpoint", "grace:tcp:0", "--app", "x.y", "--hammer-timeout", "abc"
        )
        self.assertIn("--hammer-timeout", message)
        self.assertIn("abc", message)

    def test_restartSignals(self) -> None:
        """
        Restart signals are named with or without C{SIG}, in any case, and
        replace the default.
        """
        options = self.parse(
            "--endpoint", "grace:tcp:0", "--app", "x.y",
            "--restart-signal", "HUP", "--restart-signal", "SIGUSR2",
            "--restart-signal", "usr1",
        )
        self.assertEqual(
            options["restart-signals"], [signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1]
        )
        options = self.parse(
            "--endpoint", "grace:tcp:0", "--app", "x.y", "--restart-signal", "SIGUSR2"
        )
        self.assertEqual(options["restart-signals"], [signal.SIGUSR2])

    def test_missingApp(self) -> None:
        """
        C{--app} is required.
        """
        self.assertIn("--app", self.usageError("--endpoint", "grace:tcp:0"))

    def test_missingEndpoint(self) -> None:
        """
        At least one C{--endpoint} is required.
        """
        self.assertIn("--endpoint", self.usageError("--app", "x.y"))

    def test_pidFileMissingDirectory(self) -> None:
        """
        A pidfile in a missing directory is refused, naming the path.
        """
        path = "/nonexistent/dir/x.pid"
        message = self.usageError(
            "--endpoint", "grace:tcp:0", "--app", "x.y", "--pidfile", path
        )
        self.assertIn(path, message)

    def test_pidFile(self) -> None:
        """
        A pidfile in an existing directory is accepted.
        """
        path = os.path.join(shortTemporaryDirectory(self), "x.pid")
        options = self.parse(
            "--endpoint", "grace:tcp:0", "--app", "x.y", "--pidfile", path
        )
        self.assertEqual(options["pidfile"], path)


class GraceServiceRefusalTests(SynchronousTestCase):
    """
    L{GraceService.restart} refuses while the service cannot restart.
    """

    def test_restartWhileStarting(self) -> None:
        """
        A restart before the service is ready fails with L{RestartRefused}.
        """
        reactor = MemoryReactorClock()
        service = GraceService(
            reactor=reactor,
            installSignalHandlers=False,
            registry=SocketRegistry(inherit=lambda: []),
        )
        failure = self.failureResultOf(service.restart(), RestartRefused)
        self.assertIn("not ready", failure.getErrorMessage())
        self.assertEqual(reactor.getDelayedCalls(), [])


class ServiceSettingsTests(SynchronousTestCase):
    """
    L{GraceService} and L{MasterService} take every setting as a keyword,
    C{drainRate} and C{probation} included, and refuse a bad value naming
    it.
    """

    def given(self, service: Any) -> Settings:
        # What the lifecycle will use once installed, with no TXGRACE_*.
        return resolve(service.lifecycle._code, {})

    def test_graceService(self) -> None:
        service = GraceService(
            reactor=MemoryReactorClock(),
            installSignalHandlers=False,
            registry=SocketRegistry(inherit=lambda: []),
            drainRate=25,
            probation=3,
        )
        settings = self.given(service)
        self.assertEqual((settings.drainRate, settings.probation), (25.0, 3.0))

    def test_masterService(self) -> None:
        service = MasterService(
            [],
            2,
            reactor=MemoryReactorClock(),
            registry=SocketRegistry(inherit=lambda: []),
            drainRate=0,
            probation=1.5,
        )
        settings = self.given(service)
        self.assertEqual((settings.drainRate, settings.probation), (0.0, 1.5))

    def test_leftToTheEnvironment(self) -> None:
        """
        Not given, they come from the environment, then the defaults.
        """
        service = GraceService(
            reactor=MemoryReactorClock(),
            installSignalHandlers=False,
            registry=SocketRegistry(inherit=lambda: []),
        )
        settings = resolve(
            service.lifecycle._code,
            {"TXGRACE_DRAIN_RATE": "40", "TXGRACE_PROBATION": "2"},
        )
        self.assertEqual((settings.drainRate, settings.probation), (40.0, 2.0))
        self.assertEqual(self.given(service), Settings())

    def test_badValues(self) -> None:
        for keyword, value, message in [
            ("drainRate", -1, "drainRate="),
            ("probation", "soon", "probation='soon'"),
        ]:
            with self.assertRaises(SettingError) as raised:
                GraceService(
                    reactor=MemoryReactorClock(),
                    installSignalHandlers=False,
                    registry=SocketRegistry(inherit=lambda: []),
                    **{keyword: value},
                )
            self.assertTrue(str(raised.exception).startswith(message), raised.exception)
