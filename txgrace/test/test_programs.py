"""
A C{grace:} port makes any Twisted program graceful, with no other code:
C{twist web}, C{twistd -n -y}, a daemonized C{twistd --pidfile}, a plain
C{reactor.run()} script, Klein's C{app.run}, C{twistd --uid} on a low port.
Each is run for real on loopback, with a slow request in flight across
SIGHUP and then across SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.test import defaultEnvironment
from txgrace.test.test_process import _Background, shortTemporaryDirectory
from txgrace.testing import (
    PacedClient,
    HTTPLoad,
    RequestFailed,
    ServerProcess,
    Serving,
    isAlive,
    slowRequest,
    waitUntil,
)

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
LOCAL = "grace:tcp:0:interface=127.0.0.1"

TAC = """\
from twisted.application import service, strports
from txgrace.test._apps import site

application = service.Application("txgrace-test")
strports.service({endpoint!r}, site).setServiceParent(application)
"""

TWO_SERVICES_TAC = """\
from twisted.application import service, strports
from txgrace import GraceService
from txgrace.test._apps import site

application = service.Application("txgrace-test")
strports.service({endpoint!r}, site).setServiceParent(application)
grace = GraceService()
grace.listen({serviceEndpoint!r}, site)
grace.setServiceParent(application)
"""

BROKEN_ON_MARKER_TAC = """\
import os
from twisted.application import service, strports
from txgrace.test._apps import site

if os.path.exists("broken"):
    raise RuntimeError("this build is broken (marker file)")
application = service.Application("txgrace-test")
strports.service({endpoint!r}, site).setServiceParent(application)
"""

SCRIPT = """\
import sys
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import globalLogBeginner, jsonFileLogObserver
from txgrace.test._apps import site

globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, "")])
serverFromString(reactor, {endpoint!r}).listen(site)
reactor.run()
"""

SERVICE_SCRIPT = """\
import sys
from twisted.internet import reactor
from twisted.logger import globalLogBeginner, jsonFileLogObserver
from txgrace import GraceService
from txgrace.test._apps import site

globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, "")])
service = GraceService(hammerTimeout=30)
service.listen({endpoint!r}, site)
service.startService()
reactor.run()
"""

SHARED_SCRIPT = """\
import sys
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from txgrace import GraceService
from txgrace.lifecycle import lifecycleFor
from txgrace.test._apps import site

globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, "")])
service = GraceService(hammerTimeout=0.5)  # no port of its own
service.startService()
serverFromString(reactor, {endpoint!r}).listen(site)  # a bare grace: port
Logger().info("one lifecycle: {{same}}", same=service.lifecycle is lifecycleFor())
reactor.run()
"""

BARE_PORT_APP = """\
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from txgrace.test._apps import site

# A grace: port of the application's own, next to twist txgrace's.
serverFromString(reactor, {endpoint!r}).listen(site)
"""

KLEIN = """\
import os, sys
from klein import Klein
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver

globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout, "")])
log = Logger()
app = Klein()

@app.route("/")
def hello(request):
    return f"hello from pid {{os.getpid()}}\\n"

@app.route("/sleep")
def sleep(request):
    duration = float(request.args[b"duration"][0])
    log.info("sleeping {{duration}}", duration=duration)
    return deferLater(
        reactor, duration, lambda: f"slept {{duration}} from pid {{os.getpid()}}\\n"
    )

app.run(endpoint_description={endpoint!r}, logFile=open(os.devnull, "w"))
"""


def get(port: int, path: str = "/") -> bytes:
    status, body = slowRequest("127.0.0.1", port, path, timeout=15)
    assert status == 200, (status, body)
    return body


def assertAborted(test: TestCase, request: _Background) -> None:
    """
    The request in C{request} was cut by the server (the hammer's abort, a
    TCP reset).
    """
    try:
        result = request.join()
    except RequestFailed as e:
        test.assertEqual(e.kind, "reset", repr(e))
    else:
        test.fail(f"the request was answered: {result!r}")


def refused(port: int) -> bool:
    """
    Whether a connection to C{port} is refused (nothing listens).
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


class ProgramTestsMixin:
    """
    The same story for every program: a slow request across SIGHUP is
    answered by the old pid, which then exits; the new pid serves; a slow
    request across SIGTERM completes and the process exits; nothing is
    refused or reset meanwhile.
    """

    def start(self) -> tuple[Callable[[int], None], Callable[[int], Serving], Callable[[str], None]]:
        """
        Start the program.

        @return: C{signal(pid, signum)}, C{waitServing(generation)} and
            C{waitForMessage(pattern)}.
        """
        raise NotImplementedError()

    def server(self, command: list[str], cwd: str, env: dict[str, str] | None = None) -> ServerProcess:
        environment = dict(os.environ, **(env or {}))
        server = ServerProcess([], command=command, cwd=cwd, env=environment)
        self.addCleanup(server.kill)  # type: ignore[attr-defined]
        return server

    def story(self, server: ServerProcess, firstIsChild: bool = True) -> list[int]:
        test: Any = self
        first = server.waitServing(1)
        port = first.port(0)
        slow = _Background(slowRequest, "127.0.0.1", port, "/sleep?duration=2")
        server.waitForMessage(r"sleeping 2")
        load = HTTPLoad("127.0.0.1", port, clients=4, maxRequests=20_000).start()
        test.addCleanup(load.stop)
        os.kill(first.pid, signal.SIGHUP)
        second = server.waitServing(2)
        test.assertNotEqual(second.pid, first.pid)
        test.assertEqual(second.port(0), port)
        test.assertEqual(get(port), f"hello from pid {second.pid}\n".encode())
        status, body = slow.join()
        test.assertEqual((status, body), (200, f"slept 2.0 from pid {first.pid}\n".encode()))
        test.assertTrue(waitUntil(lambda: not isAlive(first.pid), 30))
        if firstIsChild:
            test.assertEqual(server.process.wait(10), 0)
        result = load.stop()
        test.assertEqual(dict(result.failures), {})
        test.assertGreater(result.pids[second.pid], 0)
        # And now a graceful stop of the new generation.
        slow = _Background(slowRequest, "127.0.0.1", port, "/sleep?duration=1.5")
        since = server.eventCount()
        server.waitForMessage(r"sleeping 1.5", since=since)
        os.kill(second.pid, signal.SIGTERM)
        status, body = slow.join()
        test.assertEqual((status, body), (200, f"slept 1.5 from pid {second.pid}\n".encode()))
        test.assertTrue(waitUntil(lambda: not isAlive(second.pid), 30))
        test.assertTrue(refused(port))
        return [first.pid, second.pid]


class TwistWebTests(ProgramTestsMixin, TestCase):
    def test_twoListens(self) -> None:
        """
        C{twist web --listen grace:... --listen grace:...}.
        """
        directory = shortTemporaryDirectory(self)
        server = self.server(
            [
                sys.executable, "-m", "twisted", "--log-format", "json", "web",
                "--listen", LOCAL, "--listen", LOCAL,
                "--class", "txgrace.test._apps.AppRoot",
            ],
            directory,
        )
        first = server.waitServing(1)
        self.assertEqual(len(first.addresses), 2)
        self.story(server)

    def test_loadOverTenRestarts(self) -> None:
        """
        Ten restarts of C{twist web} under load, new-connection and
        keep-alive clients: no failed request, every generation served.
        """
        directory = shortTemporaryDirectory(self)
        server = self.server(
            [
                sys.executable, "-m", "twisted", "--log-format", "json", "web",
                "--listen", LOCAL, "--class", "txgrace.test._apps.AppRoot",
            ],
            directory,
        )
        current = server.waitServing(1)
        port = current.port(0)
        # Bounded by count, far above what the restarts take (the test stops it).
        load = HTTPLoad("127.0.0.1", port, clients=6, maxRequests=1_000_000).start()
        self.addCleanup(load.stop)
        pids = [current.pid]
        for generation in range(2, 12):
            os.kill(current.pid, signal.SIGHUP)
            current = server.waitServing(generation)
            self.assertTrue(waitUntil(lambda: not isAlive(pids[-1]), 30))
            pids.append(current.pid)
        get(port)
        result = load.stop()
        self.assertEqual((result.failed, dict(result.failures)), (0, {}))
        self.assertEqual(len(set(pids)), 11)
        # Every one of the 11 generations answered some of the load, and
        # no other pid did.
        self.assertEqual(sorted(result.pids), sorted(pids), result)
        self.assertEqual(sum(result.pids.values()), result.ok)
        for pid in pids:
            self.assertGreater(result.pids[pid], 0, (pid, result))


class TwistdForegroundTests(ProgramTestsMixin, TestCase):
    def test_twistdNoDaemon(self) -> None:
        """
        C{twistd -n -y app.tac}: its default pidfile (C{twistd.pid}) does not
        refuse the successor, names the serving pid after the handover, and
        is removed by the final stop.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "app.tac"), "w") as f:
            f.write(TAC.format(endpoint=LOCAL))
        server = self.server(
            [TWISTD, "-n", "--logger", "txgrace.test._apps.jsonStdoutObserver", "-y", "app.tac"],
            directory,
        )
        pidFile = os.path.join(directory, "twistd.pid")
        first, second = self.story(server)
        self.assertFalse(os.path.exists(pidFile))
        messages = "\n".join(server.messages())
        self.assertNotIn("Another twistd server is running", messages)

    def test_pidFileFollows(self) -> None:
        """
        After a handover twistd's pidfile names the new pid.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "app.tac"), "w") as f:
            f.write(TAC.format(endpoint=LOCAL))
        pidFile = os.path.join(directory, "app.pid")
        server = self.server(
            [TWISTD, "-n", "--pidfile", pidFile, "--logger",
             "txgrace.test._apps.jsonStdoutObserver", "-y", "app.tac"],
            directory,
        )
        first = server.waitServing(1)
        self.assertEqual(readPid(pidFile), first.pid)
        os.kill(first.pid, signal.SIGHUP)
        second = server.waitServing(2)
        self.assertTrue(waitUntil(lambda: not isAlive(first.pid), 30))
        self.assertEqual(readPid(pidFile), second.pid)
        os.kill(readPid(pidFile), signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(second.pid), 30))
        self.assertFalse(os.path.exists(pidFile))


def readPid(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())


def waitForLine(path: str, pattern: str, timeout: float = 30.0, after: int = 0) -> re.Match[str]:
    """
    Wait until the text file C{path} has a line matching C{pattern} after
    its first C{after} lines.
    """
    compiled = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines[after:]:
            match = compiled.search(line)
            if match:
                return match
        time.sleep(0.05)
    raise AssertionError(f"no line matching {pattern!r} in {path} within {timeout}s")


SERVING = r"Serving tcp:127\.0\.0\.1:(\d+) with pid (\d+) \(generation {}\)"


class TwistdDaemonTests(TestCase):
    def test_daemon(self) -> None:
        """
        C{twistd --pidfile P --logfile L -y app.tac}: C{kill -HUP $(cat P)}
        restarts, again and again, with no failed request under load and a
        slow request answered by the old pid; the successor does not
        daemonize again (its pid is the one that serves and that P names);
        every generation's lines are in L; TERM drains (a slow request in
        flight completes) and removes P.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "app.tac"), "w") as f:
            f.write(TAC.format(endpoint=LOCAL))
        pidFile = os.path.join(directory, "app.pid")
        logFile = os.path.join(directory, "app.log")
        launched = subprocess.run(
            [TWISTD, "--pidfile", pidFile, "--logfile", logFile, "-y", "app.tac"],
            cwd=directory, timeout=60, capture_output=True, text=True,
        )
        self.assertEqual(launched.returncode, 0, launched.stderr)
        pids: list[int] = []

        def cleanup() -> None:
            for pid in pids + ([readPid(pidFile)] if os.path.exists(pidFile) else []):
                if isAlive(pid):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(cleanup)
        match = waitForLine(logFile, SERVING.format(1))
        port, first = int(match.group(1)), int(match.group(2))
        pids.append(first)
        self.assertEqual(readPid(pidFile), first)
        # Paced, not as fast as it can: twistd's log file rotates at 1 MB,
        # and this test reads every generation's lines in one file.
        load = [PacedClient("127.0.0.1", port, 0.05) for _ in range(4)]
        for client in load:
            self.addCleanup(client.stop)
            client.start()
        slow = _Background(slowRequest, "127.0.0.1", port, "/sleep?duration=2")
        waitForLine(logFile, r"sleeping 2")
        os.kill(readPid(pidFile), signal.SIGHUP)
        second = int(waitForLine(logFile, SERVING.format(2)).group(2))
        pids.append(second)
        self.assertEqual(get(port), f"hello from pid {second}\n".encode())
        self.assertEqual(slow.join(), (200, f"slept 2.0 from pid {first}\n".encode()))
        self.assertTrue(waitUntil(lambda: not isAlive(first), 30))
        self.assertEqual(readPid(pidFile), second)
        os.kill(readPid(pidFile), signal.SIGHUP)
        third = int(waitForLine(logFile, SERVING.format(3)).group(2))
        pids.append(third)
        self.assertTrue(waitUntil(lambda: not isAlive(second), 30))
        self.assertEqual(readPid(pidFile), third)
        self.assertEqual(get(port), f"hello from pid {third}\n".encode())
        for client in load:
            client.stop()
        self.assertEqual([c.failures for c in load], [[]] * 4)
        self.assertIn(third, {pid for c in load for pid in c.pids})
        # A graceful stop: the slow request in flight across TERM completes.
        with open(logFile) as f:
            seen = len(f.read().splitlines())
        slow = _Background(slowRequest, "127.0.0.1", port, "/sleep?duration=1.5")
        waitForLine(logFile, r"sleeping 1\.5", after=seen)
        os.kill(readPid(pidFile), signal.SIGTERM)
        self.assertEqual(slow.join(), (200, f"slept 1.5 from pid {third}\n".encode()))
        self.assertTrue(waitUntil(lambda: not isAlive(third), 30))
        self.assertFalse(os.path.exists(pidFile))
        self.assertTrue(refused(port))
        with open(logFile) as f:
            log = f.read()
        # Each generation started (twistd's banner) and each of the first
        # two logged its drain after its successor's start: none overwrote
        # another's lines.
        self.assertEqual(log.count("starting up."), 3)
        self.assertEqual(log.count("Server Shut Down."), 3)
        self.assertEqual(len(re.findall(r"Drained \d+ connections", log)), 3)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Another twistd server", log)


    def test_daemonSuccessorErrorInLog(self) -> None:
        """
        A daemon's successor that fails while twistd loads the C{.tac}
        (before its logging starts) writes its error to the daemon's
        C{--logfile}, not to the daemon's C{/dev/null}; the old pid goes on
        serving and P still names it.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "app.tac"), "w") as f:
            f.write(BROKEN_ON_MARKER_TAC.format(endpoint=LOCAL))
        pidFile = os.path.join(directory, "app.pid")
        logFile = os.path.join(directory, "app.log")
        launched = subprocess.run(
            [TWISTD, "--pidfile", pidFile, "--logfile", logFile, "-y", "app.tac"],
            cwd=directory, timeout=60, capture_output=True, text=True,
        )
        self.assertEqual(launched.returncode, 0, launched.stderr)
        match = waitForLine(logFile, SERVING.format(1))
        port, first = int(match.group(1)), int(match.group(2))

        def cleanup() -> None:
            if isAlive(first):
                os.kill(first, signal.SIGKILL)

        self.addCleanup(cleanup)
        open(os.path.join(directory, "broken"), "w").close()
        os.kill(readPid(pidFile), signal.SIGHUP)
        waitForLine(logFile, r"RuntimeError: this build is broken \(marker file\)")
        waitForLine(
            logFile,
            rf"Restart failed, pid {first} goes on serving: successor pid \d+ "
            r"exited with status 1 before it was ready",
        )
        self.assertEqual(get(port), f"hello from pid {first}\n".encode())
        self.assertEqual(readPid(pidFile), first)
        os.kill(first, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(first), 30))
        self.assertFalse(os.path.exists(pidFile))


class PlainScriptTests(ProgramTestsMixin, TestCase):
    def test_script(self) -> None:
        """
        C{serverFromString(reactor, "grace:...").listen(site); reactor.run()}.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "serve.py"), "w") as f:
            f.write(SCRIPT.format(endpoint=LOCAL))
        server = self.server([sys.executable, "serve.py"], directory)
        self.story(server)


    def test_graceServiceStartService(self) -> None:
        """
        The README's snippet: a L{GraceService} started with
        C{startService()} and nothing joining it to the reactor's shutdown
        still drains on SIGTERM.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "serve.py"), "w") as f:
            f.write(SERVICE_SCRIPT.format(endpoint=LOCAL))
        server = self.server([sys.executable, "serve.py"], directory)
        self.story(server)


class SharedLifecycleTests(TestCase):
    """
    One lifecycle per process: the settings given to L{txgrace.GraceService}
    or to C{twist txgrace} govern the drain of a bare C{grace:} port in the
    same process.
    """

    def hammeredAfterHalfASecond(self, server: ServerProcess, ports: list[int]) -> None:
        """
        A request that never ends on each of C{ports}; SIGTERM aborts all of
        them after the half-second hammer timeout (the default is 60 s).
        """
        forever = []
        for port in ports:
            since = server.eventCount()
            forever.append(_Background(slowRequest, "127.0.0.1", port, "/forever"))
            server.waitForMessage("forever begins", since=since)
        since = server.eventCount()
        began = time.monotonic()
        os.kill(server.pid, signal.SIGTERM)
        server.waitForMessage(
            rf"Hammer: aborted {len(ports)} connections", since=since, timeout=15
        )
        self.assertLess(time.monotonic() - began, 15)
        for request in forever:
            assertAborted(self, request)
        self.assertTrue(waitUntil(lambda: not isAlive(server.pid), 30))

    def test_graceServiceSettingsReachBarePort(self) -> None:
        """
        A script with a L{txgrace.GraceService}C{(hammerTimeout=0.5)} that
        listens on a bare C{serverFromString(reactor, "grace:...")} port:
        both use the process's one lifecycle, and the bare port's drain is
        hammered after 0.5 s.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "serve.py"), "w") as f:
            f.write(SHARED_SCRIPT.format(endpoint=LOCAL))
        server = ServerProcess(
            [], command=[sys.executable, "serve.py"], cwd=directory, env=dict(os.environ)
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        server.waitForMessage(r"one lifecycle: True")
        self.hammeredAfterHalfASecond(server, [first.port(0)])

    def test_twistTxgraceSettingsReachBarePort(self) -> None:
        """
        C{twist txgrace --hammer-timeout 0.5} with an app that opens a bare
        C{grace:} port of its own: the one lifecycle serves and drains both
        ports with twist txgrace's settings.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "bareportapp.py"), "w") as f:
            f.write(BARE_PORT_APP.format(endpoint=LOCAL))
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "bareportapp.site", "--hammer-timeout", "0.5"],
            cwd=directory,
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        self.assertEqual(len(first.addresses), 2)
        self.hammeredAfterHalfASecond(server, [first.port(0), first.port(1)])


class KleinTests(ProgramTestsMixin, TestCase):
    def test_kleinRun(self) -> None:
        """
        Klein's C{app.run(endpoint_description="grace:...")}.
        """
        try:
            import klein  # noqa: F401
        except ImportError:
            raise SkipTest("klein is not installed")
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "kleinapp.py"), "w") as f:
            f.write(KLEIN.format(endpoint=LOCAL))
        server = self.server([sys.executable, "kleinapp.py"], directory)
        self.story(server)


def _unprivilegedUser() -> tuple[int, int]:
    """
    The user C{nobody}, for the privilege tests.

    @raise SkipTest: If not root, or no such user.
    """
    if os.getuid() != 0:
        raise SkipTest("needs root to bind a port below 1024")
    import pwd

    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        raise SkipTest("no user 'nobody'")
    return user.pw_uid, user.pw_gid


def _cannotRun(python: str, uid: int, gid: int, env: dict[str, str]) -> str | None:
    """
    Why user C{uid} (group C{gid}, no other group, as twistd's C{--uid} and
    C{--gid} leave it) cannot run C{python} and import Twisted and txgrace,
    or L{None} if it can.
    """
    try:
        probe = subprocess.run(
            [python, "-c", "import twisted, txgrace"],
            user=uid, group=gid, extra_groups=[], env=env, capture_output=True,
            text=True, cwd="/", timeout=60,
        )
    except OSError as e:
        return f"cannot run {python}: {e.strerror}"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"cannot run {python} with txgrace: {last}"
    return None


def _interpreterFor(test: TestCase, uid: int, gid: int) -> tuple[str, dict[str, str]]:
    """
    A Python that user C{uid} can run with this environment's packages, and
    the environment to run it in.

    That is this interpreter when it can.  Otherwise (a pyenv interpreter
    under C{/root}, mode 0700, cannot be run by anyone else) a private copy
    of this interpreter, its shared library and its standard library in a
    temporary directory, whose site-packages adds this environment's (and
    runs its C{.pth} files, so an editable install works).  Nothing outside
    that directory is touched.

    @raise SkipTest: If neither works, saying why.
    """
    environment = dict(os.environ)
    why = _cannotRun(sys.executable, uid, gid, environment)
    if why is None:
        return sys.executable, environment
    import shutil
    import sysconfig
    import tempfile

    version = sysconfig.get_config_var("VERSION")
    root = tempfile.mkdtemp(prefix="txgrace-python-")
    test.addCleanup(shutil.rmtree, root, True)
    os.chmod(root, 0o755)
    library = os.path.join(root, "lib")
    shutil.copytree(
        sysconfig.get_path("stdlib"),
        os.path.join(library, f"python{version}"),
        ignore=shutil.ignore_patterns(
            "site-packages", "test", "idlelib", "tkinter", "turtledemo",
            "ensurepip", "config-*",
        ),
    )
    sitePackages = os.path.join(library, f"python{version}", "site-packages")
    os.mkdir(sitePackages)
    with open(os.path.join(sitePackages, "_txgrace_test_environment.pth"), "w") as pth:
        for directory in dict.fromkeys(
            [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        ):
            pth.write(f"import site; site.addsitedir({directory!r})\n")
    os.mkdir(os.path.join(root, "bin"))
    python = os.path.join(root, "bin", f"python{version}")
    shutil.copy2(os.path.join(sys.base_exec_prefix, "bin", f"python{version}"), python)
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        name = sysconfig.get_config_var("INSTSONAME")
        shutil.copy2(os.path.join(sysconfig.get_config_var("LIBDIR"), name), library)
        environment["LD_LIBRARY_PATH"] = os.pathsep.join(
            filter(None, [library, environment.get("LD_LIBRARY_PATH")])
        )
    copyWhy = _cannotRun(python, uid, gid, environment)
    if copyWhy is not None:
        raise SkipTest(f"user {uid} {why}, and {copyWhy}")
    return python, environment


class PrivilegedTests(TestCase):
    def test_twistdUid(self) -> None:
        """
        C{twistd --uid nobody} with ports below 1024, one from C{strports}
        and one from a L{txgrace.GraceService}: both are bound before
        privileges drop, and the successor, running as nobody with no
        capability at all, inherits them and serves.
        """
        uid, gid = _unprivilegedUser()
        python, environment = _interpreterFor(self, uid, gid)
        directory = shortTemporaryDirectory(self)
        os.chmod(directory, 0o777)
        port, servicePort = _freeLowPorts(2)
        with open(os.path.join(directory, "app.tac"), "w") as f:
            f.write(TWO_SERVICES_TAC.format(
                endpoint=f"grace:tcp:{port}:interface=127.0.0.1",
                serviceEndpoint=f"grace:tcp:{servicePort}:interface=127.0.0.1",
            ))
        server = ServerProcess(
            [],
            command=[python, TWISTD, "-n", "--uid", str(uid), "--gid", str(gid),
                     "--pidfile=", "--logger", "txgrace.test._apps.jsonStdoutObserver",
                     "-y", "app.tac"],
            cwd=directory,
            env=environment,
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        self.assertEqual(sorted([first.port(0), first.port(1)]), sorted([port, servicePort]))
        os.kill(first.pid, signal.SIGHUP)
        second = server.waitServing(2)
        self.assertEqual(get(port), f"hello from pid {second.pid}\n".encode())
        self.assertEqual(get(servicePort), f"hello from pid {second.pid}\n".encode())
        with open(f"/proc/{second.pid}/status") as f:
            status = f.read()
        self.assertIn(f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}\n", status)
        self.assertIn("CapEff:\t0000000000000000\n", status)
        self.assertEqual(server.process.wait(30), 0)
        os.kill(second.pid, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(second.pid), 30))


def _freeLowPorts(count: int) -> list[int]:
    """
    C{count} ports below 1024 that are free on 127.0.0.1 now.
    """
    found = []
    for port in range(900, 1000):
        with socket.socket() as skt:
            try:
                skt.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise SkipTest(f"no {count} free ports below 1024")


class SymlinkDeployTests(TestCase):
    def test_restartIntoNewRelease(self) -> None:
        """
        Started from C{current -> releases/1}, a restart after the symlink
        moves to C{releases/2} runs the new release ($PWD, not getcwd()).
        """
        directory = shortTemporaryDirectory(self)
        for release in ("1", "2"):
            os.makedirs(os.path.join(directory, "releases", release))
            with open(os.path.join(directory, "releases", release, "releaseapp.py"), "w") as f:
                f.write(textwrap.dedent(f"""\
                    from twisted.web.resource import Resource
                    from twisted.web.server import Site

                    class Release(Resource):
                        isLeaf = True
                        def render_GET(self, request):
                            return b"release {release}\\n"

                    site = Site(Release())
                    """))
        current = os.path.join(directory, "current")
        os.symlink(os.path.join(directory, "releases", "1"), current)
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "releaseapp.site"],
            cwd=current,
            env=dict(os.environ, PWD=current),
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        self.assertEqual(get(first.port(0)), b"release 1\n")
        os.unlink(current)
        os.symlink(os.path.join(directory, "releases", "2"), current)
        os.kill(first.pid, signal.SIGHUP)
        second = server.waitServing(2)
        self.assertEqual(get(first.port(0)), b"release 2\n")
        os.kill(second.pid, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(second.pid), 30))


class TerminalTests(TestCase):
    """
    In a terminal: after a HUP, Ctrl-C still reaches the serving generation,
    and the old process's exit does not hang up the terminal into a second
    restart.
    """

    def test_ctrlCAfterRestart(self) -> None:
        import fcntl
        import pty
        import termios

        directory = shortTemporaryDirectory(self)
        logFile = os.path.join(directory, "log.json")
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)

        def controllingTerminal() -> None:
            # The session leader with this terminal, in its foreground group,
            # as a shell would start a job (and as `docker run -t` does).
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format", "json",
             "--log-file", logFile, "txgrace", "--endpoint", LOCAL,
             "--app", "txgrace.test._apps.site"],
            stdin=slave, stdout=slave, stderr=slave, cwd=directory,
            start_new_session=True, preexec_fn=controllingTerminal,
        )
        os.close(slave)
        pids = [process.pid]

        def cleanup() -> None:
            for pid in pids:
                if isAlive(pid):
                    os.kill(pid, signal.SIGKILL)
            process.wait(10)

        self.addCleanup(cleanup)
        events = JSONLog(logFile)
        first = events.waitServing(1)
        self.assertEqual(first.pid, process.pid)
        os.kill(first.pid, signal.SIGHUP)
        second = events.waitServing(2)
        pids.append(second.pid)
        events.waitFor(lambda e: e.get("log_format", "").startswith("Drained"))
        # Give a hangup the time to restart the successor, if it came.
        time.sleep(1.0)
        self.assertEqual([s.generation for s in events.serving()], [1, 2])
        self.assertEqual(get(second.port(0)), f"hello from pid {second.pid}\n".encode())
        os.write(master, b"\x03")  # Ctrl-C
        self.assertTrue(waitUntil(lambda: not isAlive(second.pid), 30))
        self.assertEqual(process.wait(30), 0)
        self.assertEqual([s.generation for s in events.serving()], [1, 2])


class JSONLog:
    """
    The JSON log events in a file that processes append to.
    """

    def __init__(self, path: str) -> None:
        self._path = path

    def events(self) -> list[dict[str, Any]]:
        import json

        try:
            with open(self._path) as f:
                lines = f.read().split("\x1e")
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                found.append(json.loads(line))
            except ValueError:
                pass
        return found

    def waitFor(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            time.sleep(0.05)
        raise AssertionError(f"no such event in {self._path} within {timeout}s")

    def serving(self) -> list[Serving]:
        from txgrace.testing import _parseAddresses

        return [
            Serving(e["pid"], e["generation"], _parseAddresses(e["addresses"]))
            for e in self.events()
            if "addresses" in e and "generation" in e
        ]

    def waitServing(self, generation: int) -> Serving:
        self.waitFor(lambda e: e.get("generation") == generation and "addresses" in e)
        return [s for s in self.serving() if s.generation == generation][0]


class LifecycleProcessTests(TestCase):
    """
    Edges of the lifecycle that only real processes show.
    """

    def test_restartSignalWhileSuccessorStarts(self) -> None:
        """
        A restart signal that reaches a successor while it starts (as
        C{systemctl kill -s HUP} does) does not kill it: it becomes ready.
        """
        directory = shortTemporaryDirectory(self)
        fault = os.path.join(directory, "fault")
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "txgrace.test._apps.site"],
            env=dict(os.environ, TXGRACE_TEST_FAULT=fault),
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        with open(fault, "w") as f:
            f.write("slow-start")
        os.kill(first.pid, signal.SIGHUP)
        started = server.waitForMessage(r"Started successor pid")
        successor = started["pid"]
        # While it is still importing (slow-start takes 1.5 s):
        os.kill(successor, signal.SIGHUP)
        os.kill(successor, signal.SIGUSR2)
        second = server.waitServing(2)
        self.assertEqual(second.pid, successor)
        self.assertEqual(get(first.port(0)), f"hello from pid {successor}\n".encode())
        self.assertEqual(server.process.wait(30), 0)
        os.kill(successor, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(successor), 30))

    def test_exitAfterHammerWhateverThreadsDo(self) -> None:
        """
        A WSGI request still running in its thread when the hammer falls
        does not keep the process alive: it exits (status 1) and says why.
        """
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "txgrace.test._apps.wsgiSite",
             "--hammer-timeout", "0.5"],
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        slow = _Background(slowRequest, "127.0.0.1", first.port(0), "/?duration=3")
        time.sleep(0.5)
        os.kill(first.pid, signal.SIGTERM)
        server.waitForMessage(r"Hammer: aborted 1 connections")
        self.assertEqual(server.process.wait(30), 1)
        server.waitForMessage(r"Still running 5.0s after the hammer \(threads: .*\); exiting now")
        assertAborted(self, slow)


    def test_hammeredExitKeepsExitHandlersAndLog(self) -> None:
        """
        A process that exits with status 1 after a hammer still runs the
        app's exit handlers, once, flushes the app's open files, and its log
        file keeps its last lines.
        """
        directory = shortTemporaryDirectory(self)
        marker = os.path.join(directory, "atexit")
        logFile = os.path.join(directory, "log.json")
        process = subprocess.Popen(
            [sys.executable, "-m", "twisted", "--log-format", "json", "--log-file",
             logFile, "txgrace", "--endpoint", LOCAL, "--app",
             "txgrace.test._apps.site", "--hammer-timeout", "0"],
            env=dict(os.environ, TXGRACE_TEST_ATEXIT=marker),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        log = JSONLog(logFile)
        first = log.waitServing(1)
        forever = _Background(slowRequest, "127.0.0.1", first.port(0), "/forever")
        log.waitFor(lambda e: e.get("log_format") == "forever begins")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), 1)
        assertAborted(self, forever)
        with open(marker) as f:
            self.assertEqual(f.read(), f"exit handler of pid {process.pid}\n")
        with open(marker + ".buffered") as f:
            self.assertEqual(f.read(), "written, not flushed\n")
        self.assertEqual(log.events()[-1].get("log_format"), "Main loop terminated.")


class ProbationProcessTests(TestCase):
    def test_successorDiesAfterReady(self) -> None:
        """
        Ten successors that die 1 s after they began to serve, under load,
        with the default probation: no connection is refused, the old pid
        serves again each time, and a good restart then works.
        """
        directory = shortTemporaryDirectory(self)
        fault = os.path.join(directory, "fault")
        pidFile = os.path.join(directory, "app.pid")
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "txgrace.test._apps.site",
             "--pidfile", pidFile],
            env=defaultEnvironment(TXGRACE_TEST_FAULT=fault),
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        with open(fault, "w") as f:
            f.write("exit-1s-after-ready")
        port = first.port(0)
        load = HTTPLoad("127.0.0.1", port, clients=4, maxRequests=20000).start()
        self.addCleanup(load.stop)
        for _ in range(10):
            since = server.eventCount()
            os.kill(first.pid, signal.SIGHUP)
            event = server.waitForMessage(
                rf"Successor pid \d+ died [\d.]+s after ready \(status 4\); pid "
                rf"{first.pid} serves again",
                since=since,
            )
            self.assertNotEqual(event["successor"], first.pid)
            # The test switch crashes it one second after it began to serve.
            self.assertGreaterEqual(event["seconds"], 0.9)
            self.assertEqual(readPid(pidFile), first.pid)
        os.unlink(fault)
        since = server.eventCount()
        os.kill(first.pid, signal.SIGHUP)
        ready = server.waitForMessage(r"Successor pid \d+ is ready", since=since)
        self.assertTrue(waitUntil(lambda: not isAlive(first.pid), 30))
        self.assertEqual(get(port), f"hello from pid {ready['successor']}\n".encode())
        result = load.stop()
        # Connections a dead successor had accepted die with it, as in any
        # crash; none is refused.
        self.assertEqual(result.failures["refused"], 0, result)
        self.assertGreater(result.pids[first.pid], 0)
        self.assertEqual(server.process.wait(30), 0)
        os.kill(ready["successor"], signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(ready["successor"]), 30))


class MasterProbationTests(TestCase):
    def test_newWorkerDiesAfterReady(self) -> None:
        """
        With the default probation, a roll whose new worker dies 1 s after
        it is ready keeps the old worker serving (no connection refused),
        reports the failure, and starts a replacement; once the replacement
        has lasted its probation the old worker stops, and a later roll
        works.
        """
        directory = shortTemporaryDirectory(self)
        fault = os.path.join(directory, "fault")
        server = ServerProcess(
            ["--workers", "1", "--endpoint", LOCAL, "--app", "txgrace.test._apps.site"],
            env=defaultEnvironment(TXGRACE_TEST_FAULT=fault),
        )
        self.addCleanup(server.kill)
        old = server.waitServing(1)
        server.waitForMessage(r"Master pid \d+ serving")
        port = old.port(0)
        load = HTTPLoad("127.0.0.1", port, clients=4, maxRequests=20000).start()
        self.addCleanup(load.stop)
        self.assertTrue(waitUntil(lambda: load.result.ok > 50, 30))
        with open(fault, "w") as f:
            f.write("exit-1s-after-ready")
        since = server.eventCount()
        os.kill(server.pid, signal.SIGHUP)
        died = server.waitForMessage(
            rf"Worker pid \d+ \(slot 1\) died [\d.]+s after ready \(status 4\); "
            rf"worker pid {old.pid} serves on, and a replacement starts in",
            since=since,
        )
        # The replacement is a good build.
        os.unlink(fault)
        self.assertNotEqual(died["pid"], old.pid)
        self.assertGreaterEqual(died["seconds"], 0.9)
        self.assertTrue(isAlive(old.pid))
        server.waitForMessage(
            rf"Rolling restart aborted; the old workers go on serving: worker pid "
            rf"{died['pid']} \(slot 1\) died",
            since=since,
        )
        server.waitForMessage(r"Restart failed, pid \d+ goes on serving", since=since)
        replacement = server.waitForMessage(
            r"Started worker pid", since=server.events.index(died) + 1
        )["pid"]
        self.assertTrue(
            waitUntil(lambda: replacement in [s.pid for s in server.serving()], 30)
        )
        # The old worker stops once the replacement has lasted its probation.
        self.assertTrue(waitUntil(lambda: not isAlive(old.pid), 30))
        self.assertEqual(get(port), f"hello from pid {replacement}\n".encode())
        result = load.stop()
        # Only what the dead worker had accepted died with it.
        self.assertEqual(result.failures["refused"], 0, result)
        self.assertLessEqual(result.failed, 4, result)
        self.assertGreater(result.pids[old.pid], 0)
        self.assertGreater(result.pids[replacement], 0)
        since = server.eventCount()
        os.kill(server.pid, signal.SIGHUP)
        done = server.waitForMessage(r"Rolling restart done", 60, since)
        self.assertNotEqual(int(done["pids"]), replacement)
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(server.process.wait(60), 0)
        self.assertTrue(waitUntil(lambda: not isAlive(replacement), 30))


class MasterLifecycleTests(TestCase):
    def test_badAppEndsTheMaster(self) -> None:
        """
        A bad --app ends the master with the worker's one-line error and
        status 1, instead of respawning workers that never become ready.
        """
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "txgrace", "--workers", "2",
             "--endpoint", LOCAL, "--app", "txgrace_no_such_module.site"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        )
        self.assertEqual(result.returncode, 1)
        output = result.stdout + result.stderr
        self.assertIn(
            "twist txgrace: error: --app 'txgrace_no_such_module.site': no module "
            "named 'txgrace_no_such_module'",
            output,
        )
        self.assertIn("failed before the master was ready", output)
        self.assertNotIn("retrying", output)
        self.assertNotIn("Traceback", output)

    def test_secondSignalHammersWorkers(self) -> None:
        """
        In master mode a second SIGTERM aborts what the workers have left at
        once, even during the shutdown delay.
        """
        server = ServerProcess(
            ["--workers", "1", "--endpoint", LOCAL, "--app", "txgrace.test._apps.site",
             "--shutdown-delay", "30", "--hammer-timeout", "60"],
        )
        self.addCleanup(server.kill)
        worker = server.waitServing(1)
        server.waitForMessage(r"Master pid \d+ serving")
        forever = _Background(slowRequest, "127.0.0.1", worker.port(0), "/forever")
        server.waitForMessage("forever begins")
        os.kill(server.pid, signal.SIGTERM)
        server.waitForMessage(r"Serving 30.0s more before stopping")
        os.kill(server.pid, signal.SIGTERM)
        server.waitForMessage(r"Hammer: aborted 1 connections")
        self.assertEqual(server.process.wait(30), 0)
        self.assertTrue(waitUntil(lambda: not isAlive(worker.pid), 30))
        assertAborted(self, forever)
