"""
Every way a deploy goes wrong, with real processes on loopback.  Each test
checks what clients saw (no failed request wherever the old process could
still serve) and what the operator saw (one log line naming the cause).

The README's "Reliability" table is drawn from these tests:
C{trial txgrace.test.test_faults} reproduces it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.test.test_process import (
    APP,
    LOCAL,
    OneLineErrorMixin,
    _Background,
    runTwist,
    shortTemporaryDirectory,
    startServer,
)
from txgrace.test.test_install import virtualenvSharingPackages
from txgrace.test.test_restart import get, restart
from txgrace.testing import (
    HTTPLoad,
    RequestFailed,
    ServerProcess,
    Serving,
    isAlive,
    slowRequest,
    waitUntil,
)


def startUnderShell(
    test: TestCase, setting: str, endpoint: str
) -> tuple[ServerProcess, Serving]:
    """
    Start C{twist txgrace} with the test app on C{endpoint}, from a shell
    that first runs C{setting} (C{ulimit -n 64}, C{umask 000}); it is killed
    after the test.
    """
    command = "%s && exec %s -m twisted --log-format json txgrace --endpoint %s --app %s" % (
        setting, shlex.quote(sys.executable), shlex.quote(endpoint), APP
    )
    server = ServerProcess([], command=["/bin/sh", "-c", command])
    test.addCleanup(server.kill)
    return server, server.waitServing()


class _FaultMixin:
    """
    A server whose successors can be made to misbehave through
    C{$TXGRACE_TEST_FAULT}, under continuous load.
    """

    def startFaulty(self: TestCase, *extra: str) -> tuple[ServerProcess, Serving, str]:
        fault = os.path.abspath(self.mktemp())
        env = dict(os.environ, TXGRACE_TEST_FAULT=fault)
        server, serving = startServer(self, *extra, env=env)
        return server, serving, fault

    def failSuccessor(
        self: TestCase, mode: str, expected: str, *extra: str
    ) -> tuple[ServerProcess, Serving]:
        """
        Make the next successor fail with C{mode} under load; check that the
        operator sees C{expected}, that no request failed, that the failed
        successor served nobody (connections wait on the socket until a
        process is ready), that the old process serves on, and that a later
        restart works.
        """
        server, serving, fault = self.startFaulty(*extra)  # type: ignore[attr-defined]
        load = HTTPLoad("127.0.0.1", serving.port(), clients=4).start()
        self.addCleanup(load.stop)
        with open(fault, "w") as f:
            f.write(mode)
        server.signal(signal.SIGHUP)
        failed = server.waitForMessage("Started successor pid")["pid"]
        server.waitForMessage(expected)
        self.assertIn(f"pid {serving.pid}".encode(), get(serving.port()))
        os.unlink(fault)
        successor = restart(server, serving)
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertIn(serving.pid, result.pids)
        self.assertNotIn(failed, result.pids)
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))
        return server, successor


class SuccessorFaultTests(_FaultMixin, TestCase):
    """
    A successor that fails before it is ready costs nothing.
    """

    def test_crashWhileImporting(self) -> None:
        """
        The app raises while being imported in the successor.
        """
        self.failSuccessor(
            "crash", r"Restart failed, .*exited with status 1 before it was ready"
        )

    def test_exitAfterBindBeforeReady(self) -> None:
        """
        The successor listens on the inherited sockets, then dies before it
        is ready.
        """
        self.failSuccessor(
            "exit-after-bind",
            r"Restart failed, .*exited with status 3 before it was ready",
        )

    def test_hangsBeforeReady(self) -> None:
        """
        The successor never becomes ready: killed at C{--ready-timeout}.
        (Long enough for the good successor that follows to start on a
        loaded machine: 1 s was not.)
        """
        self.failSuccessor(
            "hang",
            r"Restart failed, .*was not ready within 5s and was killed",
            "--ready-timeout",
            "5",
        )

    def test_killedMidHandover(self) -> None:
        """
        The successor is killed with SIGKILL before it is ready.
        """
        server, serving, fault = self.startFaulty("--ready-timeout", "30")
        load = HTTPLoad("127.0.0.1", serving.port(), clients=4).start()
        self.addCleanup(load.stop)
        with open(fault, "w") as f:
            f.write("hang")
        server.signal(signal.SIGHUP)
        started = server.waitForMessage("Started successor pid")
        self.assertTrue(waitUntil(lambda: isAlive(started["pid"]), 5))
        os.kill(started["pid"], signal.SIGKILL)
        server.waitForMessage(
            r"Restart failed, .*exited with signal 9 before it was ready"
        )
        os.unlink(fault)
        restart(server, serving)
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertNotIn(started["pid"], result.pids)

    def test_exitJustAfterReady(self) -> None:
        """
        A successor that dies just after it is ready has already taken over;
        its predecessor, if still draining, says so in one line.
        """
        server, serving, fault = self.startFaulty()
        slow = _Background(slowRequest, "127.0.0.1", serving.port(), "/sleep?duration=2")
        server.waitForMessage("sleeping 2")
        with open(fault, "w") as f:
            f.write("exit-after-ready")
        server.signal(signal.SIGHUP)
        server.waitServing(2)
        server.waitForMessage(r"Successor pid \d+ exited with status 4 after it was ready")
        self.assertEqual(slow.join()[0], 200)

    def test_commandMissing(self) -> None:
        """
        The successor's command no longer exists (a removed virtualenv): the
        old process serves on and says what is missing.
        """
        directory = os.path.join(shortTemporaryDirectory(self), "venv")
        python, _ = virtualenvSharingPackages(directory, withPip=False)
        server = ServerProcess(
            [],
            command=[
                python, "-m", "twisted", "--log-format", "json", "txgrace",
                "--endpoint", LOCAL, "--app", APP,
            ],
        )
        self.addCleanup(server.kill)
        serving = server.waitServing()
        shutil.rmtree(directory)
        server.signal(signal.SIGHUP)
        server.waitForMessage(
            r"Restart failed, .*status 127 before it was ready: .*/python does "
            r"not exist or is not executable"
        )
        self.assertIn(f"pid {serving.pid}".encode(), get(serving.port()))


class PredecessorFaultTests(TestCase):
    """
    The old process failing during its drain hurts only its own connections.
    """

    def test_oldKilledWhileDraining(self) -> None:
        """
        SIGKILL of the draining predecessor cuts only its own slow request;
        the successor and its clients are unaffected.
        """
        server, serving = startServer(self)
        slow = _Background(slowRequest, "127.0.0.1", serving.port(), "/sleep?duration=5")
        server.waitForMessage("sleeping 5")
        server.signal(signal.SIGHUP)
        successor = server.waitServing(2)
        load = HTTPLoad("127.0.0.1", serving.port(), clients=4).start()
        self.addCleanup(load.stop)
        server.waitForMessage("Draining 1 connections")
        os.kill(serving.pid, signal.SIGKILL)
        # The kernel closes a killed process's sockets in order: EOF.
        self.assertEqual(
            self.assertRaises(RequestFailed, slow.join).kind, "eof_before_response"
        )
        time.sleep(0.5)
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertEqual(set(result.pids), {successor.pid})


class StormTests(TestCase):
    """
    Many restart signals: one restart at a time, all requests served, no
    stray process.
    """

    def test_restartStorm(self) -> None:
        """
        20 restart signals within one second to whichever process serves,
        then 20 more spread over 10 s: every successor that was started
        became ready, generations follow one another, every request is
        served, and only the newest process is left.
        """
        path = os.path.abspath(self.mktemp())
        server, serving = startServer(self, "--pidfile", path)
        load = HTTPLoad("127.0.0.1", serving.port(), clients=4).start()
        self.addCleanup(load.stop)

        def signalServing() -> None:
            try:
                with open(path) as f:
                    os.kill(int(f.read()), signal.SIGHUP)
            except (OSError, ValueError):
                pass

        for _ in range(20):
            signalServing()
            time.sleep(0.05)
        for _ in range(20):
            signalServing()
            time.sleep(0.5)
        started = len([m for m in server.messages() if "Started successor pid" in m])
        last = server.waitServing(started + 1)
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        generations = [s.generation for s in server.serving()]
        self.assertEqual(generations, list(range(1, started + 2)))
        self.assertNotIn("Restart failed", "\n".join(server.messages()))
        self.assertTrue(
            waitUntil(
                lambda: [p for p in server.pids() if isAlive(p)] == [last.pid], 30
            ),
            [p for p in server.pids() if isAlive(p)],
        )
        self.assertGreater(started, 2)


class FileDescriptorLimitTests(TestCase):
    """
    Running out of descriptors is survived.
    """

    def test_lowDescriptorLimit(self) -> None:
        """
        With C{ulimit -n 64}, 80 connections exhaust the descriptors; once
        they close, accepting resumes, and a restart works.
        """
        server, serving = startUnderShell(self, "ulimit -n 64", LOCAL)
        hogs = []
        for _ in range(80):
            try:
                hogs.append(
                    socket.create_connection(("127.0.0.1", serving.port()), timeout=5)
                )
            except OSError:
                break
        for hog in hogs:
            hog.close()
        self.assertTrue(
            waitUntil(lambda: _answers(serving.port(), serving.pid), 10),
            "accepting did not resume",
        )
        successor = restart(server, serving)
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))


def _answers(port: int, pid: int) -> bool:
    try:
        return f"pid {pid}".encode() in slowRequest("127.0.0.1", port, "/", 2)[1]
    except (OSError, RequestFailed):
        return False


_BIND_PORT_81 = """
import socket, sys
probe = socket.socket()
try:
    probe.bind(("127.0.0.1", 81))
except PermissionError:
    sys.exit(13)
"""
"""
Exits 0 if this user may bind port 81, 13 if it may not.
"""


class BadInputTests(OneLineErrorMixin, TestCase):
    """
    Bad input: one clear line naming the input, a non-zero exit, no
    traceback.  One real C{twist txgrace} per way of failing (the options,
    the endpoint, listening); an app that fails to import is in
    L{txgrace.test.test_tap}, and L{txgrace.test.test_units} checks the
    other messages.
    """

    def test_endpointWithoutPrefix(self) -> None:
        """
        An endpoint without C{grace:} is refused, naming it.
        """
        result = runTwist("--endpoint", "tcp:8080", "--app", APP)
        self.assertOneLineError(result, "'tcp:8080'", "grace:")

    def test_portTaken(self) -> None:
        """
        A port that is taken ends the program with the address in the line.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = runTwist(
            "--endpoint", f"grace:tcp:{port}:interface=127.0.0.1", "--app", APP
        )
        self.assertOneLineError(result, f"127.0.0.1:{port}")

    def test_missingCertificate(self) -> None:
        """
        A missing certificate file is named.
        """
        result = runTwist(
            "--endpoint",
            "grace:ssl:0:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem",
            "--app", APP,
        )
        self.assertOneLineError(result, "/nonexistent/")

    def test_privilegedPort(self) -> None:
        """
        A port that needs privileges fails with its address, for a user
        without them.  Skipped, with the reason, where this user may bind
        port 81 after all; if the server binds it anyway, it is killed (by
        pid) and the test fails at once instead of waiting out a timeout.
        """
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise SkipTest("running as root and setpriv is missing")
            # Stay root but without the capability to bind low ports: a
            # pyenv interpreter under /root (mode 0700) cannot run as nobody.
            prefix = [setpriv, "--bounding-set=-net_bind_service",
                      "--inh-caps=-net_bind_service"]
        else:
            prefix = []
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", _BIND_PORT_81],
            capture_output=True, text=True, timeout=60, cwd="/",
        )
        if probe.returncode == 0:
            raise SkipTest(
                "this user may bind port 81 (it keeps CAP_NET_BIND_SERVICE, or "
                "net.ipv4.ip_unprivileged_port_start is 81 or less)"
            )
        if probe.returncode != 13:
            raise SkipTest(
                "cannot tell whether this user may bind port 81: "
                + (probe.stdout + probe.stderr).strip()[-500:]
            )
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "twisted", "txgrace", "--endpoint",
             "grace:tcp:81:interface=127.0.0.1", "--app", APP],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd="/",
        )
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            self.fail(
                "twist txgrace was still running after 60 s: it bound port 81 "
                "although the probe could not; output:\n" + (stdout + stderr)[-2000:]
            )
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        self.assertOneLineError(result, "127.0.0.1:81", "Permission denied")

    def test_negativeReadyTimeout(self) -> None:
        """
        A negative ready timeout is refused, naming the option and the value.
        """
        result = runTwist("--endpoint", LOCAL, "--app", APP, "--ready-timeout", "-1")
        self.assertOneLineError(result, "--ready-timeout", "'-1'")

    def test_inheritedSocketElsewhere(self) -> None:
        """
        An inherited socket named like the endpoint but bound to another
        address is not adopted: it is logged, closed, and a fresh socket is
        bound.
        """
        elsewhere = socket.socket()
        self.addCleanup(elsewhere.close)
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen(1)
        elsewhere.set_inheritable(True)
        script = (
            'exec 3<&%d; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web exec "$@"'
            % elsewhere.fileno()
        )
        server = ServerProcess(
            [],
            command=[
                "/bin/sh", "-c", script, "sh", sys.executable, "-m", "twisted",
                "--log-format", "json", "txgrace", "--endpoint",
                "grace:tcp:0:interface=127.0.0.2:name=web", "--app", APP,
            ],
            passFDs=[elsewhere.fileno()],
        )
        self.addCleanup(server.kill)
        serving = server.waitServing()
        self.assertEqual(serving.addresses[0][1], "127.0.0.2")
        server.waitForMessage(r"Not adopting inherited fd 3 \(web\): it is bound to")
        server.waitForMessage(r"Closing inherited fd 3 \(web\)")

    def test_failedStartFlushesBufferedLog(self) -> None:
        """
        twist holds log events back until the service has started; a start
        that fails writes them to stderr (which a successor shares with its
        predecessor) before its one-line error, so the line that says why
        (here: the inherited socket was not adopted, and the fresh bind
        then found the port taken) is not lost.
        """
        elsewhere = socket.socket()
        self.addCleanup(elsewhere.close)
        elsewhere.bind(("127.0.0.1", 0))
        elsewhere.listen(1)
        elsewhere.set_inheritable(True)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        script = (
            'exec 3<&%d; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web exec "$@"'
            % elsewhere.fileno()
        )
        result = subprocess.run(
            [
                "/bin/sh", "-c", script, "sh", sys.executable, "-m", "twisted",
                "txgrace", "--endpoint",
                f"grace:tcp:{port}:interface=127.0.0.1:name=web", "--app", APP,
            ],
            pass_fds=[elsewhere.fileno()],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertOneLineError(result, f"127.0.0.1:{port}")
        self.assertIn("Not adopting inherited fd 3 (web): it is bound to", result.stderr)
        lastLine = result.stderr.rstrip().splitlines()[-1]
        self.assertTrue(lastLine.startswith("twist txgrace: error: "), lastLine)


class SecurityTests(TestCase):
    """
    Nothing private leaks.
    """

    def test_subprocessSeesNoListenState(self) -> None:
        """
        After a handover, a subprocess the application spawns (even with
        close_fds=False) sees no C{LISTEN_*} or C{TXGRACE_CONTROL_FD} variable
        and no descriptor beyond its own.
        """
        server, serving = startServer(self)
        successor = restart(server, serving)
        output = get(serving.port(), "/spawn").decode()
        self.assertNotIn("LISTEN_", output)
        self.assertNotIn("TXGRACE_CONTROL_FD", output)
        fds = output.split("FDS", 1)[1].split()
        # stdin, stdout and stderr, then the directory ls opens to list
        # them, which takes the lowest free number: any descriptor that
        # leaked into the subprocess would hold 3 and push it to 4.
        self.assertEqual(fds, ["0", "1", "2", "3"])
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))

    def test_unixModeNeverLooser(self) -> None:
        """
        Even under umask 000 the socket file is never more permissive than
        C{mode=}, before or after a handover.
        """
        path = os.path.join(shortTemporaryDirectory(self), "s.sock")
        server, serving = startUnderShell(self, "umask 000", f"grace:unix:{path}:mode=600")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        restart(server, serving)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
