"""
C{python -m txgrace restart --pidfile P} against real servers: it waits for
the outcome and says it, with the exit status a deploy script or
C{systemctl reload} can use.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from twisted.trial.unittest import TestCase

from txgrace.pidfile import readRestartStatus, restartStatusPath
from txgrace.test.test_process import APP, LOCAL, shortTemporaryDirectory
from txgrace.testing import ServerProcess, isAlive, slowRequest, waitUntil


def restartCommand(*arguments: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "txgrace", "restart", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class RestartCommandTests(TestCase):
    def startServer(self, *extra: str) -> tuple[ServerProcess, str, str]:
        directory = shortTemporaryDirectory(self)
        pidFile = os.path.join(directory, "app.pid")
        fault = os.path.join(directory, "fault")
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", APP, "--pidfile", pidFile, *extra],
            env=dict(os.environ, TXGRACE_TEST_FAULT=fault),
        )
        self.addCleanup(server.kill)
        return server, pidFile, fault

    def test_goodRestart(self) -> None:
        """
        Exit 0 and the new pid, which the pidfile names and which serves.
        """
        server, pidFile, _ = self.startServer()
        first = server.waitServing(1)
        result = restartCommand("--pidfile", pidFile)
        second = server.waitServing(2)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            result.stdout, f"restarted: pid {second.pid} serves (was pid {first.pid})\n"
        )
        with open(pidFile) as f:
            self.assertEqual(int(f.read()), second.pid)
        status, body = slowRequest("127.0.0.1", first.port(0), "/", timeout=15)
        self.assertEqual(body, f"hello from pid {second.pid}\n".encode())
        os.kill(second.pid, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(second.pid), 30))
        self.assertFalse(os.path.exists(pidFile))
        self.assertFalse(os.path.exists(restartStatusPath(pidFile)))

    def test_successorCrashesAtImport(self) -> None:
        """
        A successor that crashes at import: exit 1 with the reason; the old
        pid goes on serving.
        """
        server, pidFile, fault = self.startServer()
        first = server.waitServing(1)
        with open(fault, "w") as f:
            f.write("crash")
        result = restartCommand("--pidfile", pidFile)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertRegex(
            result.stderr,
            rf"^txgrace restart: pid {first.pid} goes on serving; the restart "
            r"failed: successor pid \d+ exited with status 1 before it was ready\n$",
        )
        with open(pidFile) as f:
            self.assertEqual(int(f.read()), first.pid)
        self.assertTrue(isAlive(first.pid))

    def test_successorHangs(self) -> None:
        """
        A successor that is not ready within --ready-timeout: exit 1 with the
        reason.
        """
        server, pidFile, fault = self.startServer("--ready-timeout", "1")
        first = server.waitServing(1)
        with open(fault, "w") as f:
            f.write("hang")
        result = restartCommand("--pidfile", pidFile)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(
            result.stderr,
            r"the restart failed: successor pid \d+ was not ready within 1s and "
            r"was killed\n$",
        )
        status = readRestartStatus(pidFile)
        assert status is not None
        self.assertEqual((status["pid"], status["outcome"]), (first.pid, "failed"))

    def test_refused(self) -> None:
        """
        A restart asked while one is in progress is refused, and says so.
        """
        server, pidFile, fault = self.startServer("--ready-timeout", "30")
        first = server.waitServing(1)
        with open(fault, "w") as f:
            f.write("hang")
        os.kill(first.pid, signal.SIGHUP)
        server.waitForMessage(r"Started successor pid")
        result = restartCommand("--pidfile", pidFile)
        self.assertEqual(result.returncode, 1)
        self.assertRegex(
            result.stderr, r"the restart refused: successor pid \d+ is still starting\n$"
        )

    def test_noServer(self) -> None:
        """
        A pidfile that names no live process: exit 1, one line.
        """
        directory = shortTemporaryDirectory(self)
        pidFile = os.path.join(directory, "app.pid")
        dead = subprocess.Popen(["true"])
        dead.wait()
        with open(pidFile, "w") as f:
            f.write(f"{dead.pid}\n")
        result = restartCommand("--pidfile", pidFile)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr,
            f"txgrace restart: pid {dead.pid} (from {pidFile}) is not running\n",
        )
        missing = restartCommand("--pidfile", os.path.join(directory, "none.pid"))
        self.assertEqual(missing.returncode, 1)
        self.assertIn("cannot read pidfile", missing.stderr)
        self.assertEqual(len(missing.stderr.splitlines()), 1)
