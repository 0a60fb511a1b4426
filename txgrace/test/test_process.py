"""
Graceful stop and the command line, with real C{twist txgrace} processes on
loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from txgrace.tap import HAMMERED_EXIT_STATUS
from txgrace.testing import (
    RequestFailed,
    ServerProcess,
    Serving,
    isAlive,
    slowRequest,
    waitUntil,
)

APP = "txgrace.test._apps.site"
LOCAL = "grace:tcp:0:interface=127.0.0.1"


class _Background:
    """
    Runs a blocking call in a thread and keeps its result or exception.
    """

    def __init__(self, f: Any, *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = f(*args)
            except BaseException as e:
                self.error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 60.0) -> Any:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result


def shortTemporaryDirectory(test: SynchronousTestCase) -> str:
    """
    A private directory with a short path (UNIX socket paths are limited to
    about 100 bytes), removed after the test.
    """
    directory = tempfile.mkdtemp(prefix="txgrace-")
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def startServer(test: TestCase, *extra: str, **kwargs: Any) -> tuple[ServerProcess, Serving]:
    """
    Start C{twist txgrace} with the test app; it is killed after the test.
    """
    arguments = list(extra)
    if "--endpoint" not in arguments:
        arguments = ["--endpoint", LOCAL, *arguments]
    if "--app" not in arguments:
        arguments += ["--app", APP]
    server = ServerProcess(arguments, **kwargs)
    test.addCleanup(server.kill)
    return server, server.waitServing()


class GracefulStopTests(TestCase):
    """
    SIGTERM stops listening, lets in-flight requests finish, and hammers what
    is left at the deadline.
    """

    def test_slowRequestCompletes(self) -> None:
        """
        A request in flight when SIGTERM arrives gets its whole 200 response
        (with C{Connection: close}); a connection made after the stop began
        is refused; the process exits 0.  The first SIGTERM is logged, by
        name, as SIGHUP is.
        """
        server, serving = startServer(self)
        port = serving.port()
        slow = _Background(slowRequest, "127.0.0.1", port, "/sleep?duration=1.5")
        server.waitForMessage("sleeping 1.5")
        since = server.eventCount()
        server.signal(signal.SIGTERM)
        received = server.waitForMessage(
            r"^Received SIGTERM: stopping gracefully \(a second signal aborts\)$",
            since=since,
        )
        self.assertEqual(received["log_namespace"], "txgrace.lifecycle")
        server.waitForMessage("Draining 1 connections")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        status, body = slow.join()
        self.assertEqual(status, 200)
        self.assertIn(f"from pid {serving.pid}".encode(), body)
        self.assertEqual(server.wait(), 0)
        server.waitForMessage(r"Drained 1 connections in .*, aborted 0")

    def test_idleKeepAliveClosed(self) -> None:
        """
        An idle keep-alive connection does not hold the stop up: it is closed
        and the process exits 0.
        """
        server, serving = startServer(self)
        with socket.create_connection(("127.0.0.1", serving.port()), timeout=10) as c:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200", c.recv(65536))
            server.signal(signal.SIGTERM)
            self.assertEqual(server.wait(), 0)
            self.assertEqual(c.recv(65536), b"")

    def test_hammerAtDeadline(self) -> None:
        """
        A request that never ends is aborted at the hammer deadline, and the
        hammer says how many it aborted.
        """
        server, serving = startServer(self, "--hammer-timeout", "1")
        forever = _Background(slowRequest, "127.0.0.1", serving.port(), "/forever", 30)
        server.waitForMessage("forever begins")
        server.signal(signal.SIGTERM)
        server.waitForMessage("Hammer: aborted 1 connections")
        # An aborted connection is reset (SO_LINGER 0), not closed.
        self.assertEqual(self.assertRaises(RequestFailed, forever.join).kind, "reset")
        self.assertEqual(server.wait(), HAMMERED_EXIT_STATUS)

    def test_secondSignalHammers(self) -> None:
        """
        A second SIGTERM during the drain hammers at once, long before the
        60 s deadline.
        """
        server, serving = startServer(self)
        forever = _Background(slowRequest, "127.0.0.1", serving.port(), "/forever", 30)
        server.waitForMessage("forever begins")
        server.signal(signal.SIGTERM)
        server.waitForMessage("Draining 1 connections")
        server.signal(signal.SIGTERM)
        server.waitForMessage("Hammer: aborted 1 connections", timeout=10)
        self.assertEqual(self.assertRaises(RequestFailed, forever.join).kind, "reset")
        self.assertEqual(server.wait(timeout=10), HAMMERED_EXIT_STATUS)

    def test_demoSecondSignal(self) -> None:
        """
        The demo's slow request, hammered by a second SIGTERM, ends without
        an unhandled error in the log.
        """
        from txgrace.test.test_install import _sourceTree

        server, serving = startServer(
            self, "--app", "demo.gracedemo.site", cwd=_sourceTree()
        )
        with socket.create_connection(("127.0.0.1", serving.port()), timeout=30) as c:
            c.sendall(b"GET /sleep/?duration=60s HTTP/1.1\r\nHost: x\r\n\r\n")
            # The server has read the request, so it is sleeping.
            self.assertTrue(waitUntil(lambda: _connectionsRead(serving.pid) == 1, 10))
            server.signal(signal.SIGTERM)
            server.waitForMessage("Draining 1 connections")
            server.signal(signal.SIGTERM)
            server.waitForMessage("Hammer: aborted 1 connections", timeout=10)
            self.assertRaises(ConnectionResetError, c.recv, 65536)
        self.assertEqual(server.wait(timeout=10), HAMMERED_EXIT_STATUS)
        output = "\n".join(server.messages())
        self.assertNotIn("Unhandled error", output)
        self.assertNotIn("CancelledError", output)

    def test_pidfile(self) -> None:
        """
        C{--pidfile} names the serving pid, and is removed on a final stop.
        """
        path = os.path.abspath(self.mktemp())
        server, serving = startServer(self, "--pidfile", path)
        self.assertTrue(waitUntil(lambda: os.path.exists(path), 10))
        with open(path) as f:
            self.assertEqual(f.read().strip(), str(serving.pid))
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertFalse(os.path.exists(path))

    def test_unixSocket(self) -> None:
        """
        A UNIX socket keeps its C{mode=}, serves, and its path is removed on
        the final stop.
        """
        path = os.path.join(shortTemporaryDirectory(self), "app.sock")
        server, serving = startServer(
            self, "--endpoint", f"grace:unix:{path}:mode=600"
        )
        self.assertEqual(serving.addresses[0], ("unix", path, None))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertIn(f"pid {serving.pid}".encode(), c.recv(65536))
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertFalse(os.path.exists(path))


def _connectionsRead(pid: int) -> int:
    """
    How many established TCP connections (IPv4) C{pid} holds with nothing
    left unread in them.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    with open(f"/proc/{pid}/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(
        1
        for row in rows
        if row[3] == "01" and row[9] in inodes and int(row[4].split(":")[1], 16) == 0
    )


def runTwist(
    *arguments: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """
    Run C{twist txgrace} to completion.
    """
    return subprocess.run(
        [sys.executable, "-m", "twisted", "txgrace", *arguments],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class OneLineErrorMixin:
    """
    For tests of programs that must fail with one clear line.
    """

    def assertOneLineError(
        self: Any, result: subprocess.CompletedProcess[str], *words: str
    ) -> None:
        """
        C{result} failed, printed no traceback, and named every one of
        C{words}.
        """
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        for word in words:
            self.assertIn(word, output)


class CommandLineTests(TestCase):
    """
    C{twist txgrace}'s options.  Its one-line errors are in
    L{txgrace.test.test_faults.BadInputTests}, one per way of failing; every
    message is checked in L{txgrace.test.test_units}.
    """

    def test_help(self) -> None:
        """
        C{--help} documents every option.
        """
        result = runTwist("--help")
        self.assertEqual(result.returncode, 0)
        for option in (
            "--endpoint",
            "--app",
            "--hammer-timeout",
            "--ready-timeout",
            "--pidfile",
            "--restart-signal",
        ):
            self.assertIn(option, result.stdout)

    def test_appAsResourceAndColon(self) -> None:
        """
        C{pkg.mod:attr} works, and an IResource is served through a Site.
        """
        server, serving = startServer(self, "--app", "txgrace.test._apps:root")
        self.assertEqual(
            slowRequest("127.0.0.1", serving.port(), "/")[0], 200
        )
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(), 0)
        self.assertFalse(isAlive(serving.pid))
