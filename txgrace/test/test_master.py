"""
Master mode (C{--workers N}) with real processes on loopback: rolling
restarts under load, drills with failing workers, a killed master, and the
master as pid 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.master import zombieChildren
from txgrace.test.test_process import APP, LOCAL, _Background
from txgrace.test.test_restart import get
from txgrace.testing import (
    HTTPLoad,
    PacedClient,
    ServerProcess,
    isAlive,
    slowRequest,
    waitUntil,
)


def _servedBy(body: bytes) -> int:
    return int(body.split(b"pid ")[1].split()[0])


def _pids(event: dict[str, Any]) -> list[int]:
    return [int(p) for p in event["pids"].split(", ")]


class _MasterMixin:
    def startMaster(
        self: Any, *extra: str, workers: int = 2, env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> tuple[ServerProcess, int, list[int]]:
        """
        Start C{twist txgrace --workers N}; wait until every worker serves.

        @return: The server, its port, and the workers' pids.
        """
        arguments = ["--workers", str(workers), "--endpoint", LOCAL, "--app", APP, *extra]
        server = ServerProcess(arguments, env=env, command=command)
        self.addCleanup(server.kill)
        ready = server.waitForMessage("Master pid .* serving", 60)
        port = int(ready["addresses"].rsplit(":", 1)[1])
        return server, port, _pids(ready)

    def roll(self: Any, server: ServerProcess, pid: int | None = None) -> list[int]:
        """
        SIGHUP the master and wait for the roll to finish.

        @return: The new workers' pids.
        """
        since = server.eventCount()
        server.signal(signal.SIGHUP, pid)
        event = server.waitFor(
            lambda e: e.get("log_format", "").startswith("Rolling restart "), 60, since
        )
        while event["log_format"].startswith("Rolling restart of"):
            since = server.events.index(event) + 1
            event = server.waitFor(
                lambda e: e.get("log_format", "").startswith("Rolling restart "),
                60,
                since,
            )
        self.assertTrue(event["log_format"].startswith("Rolling restart done"), event)
        return _pids(event)


class RollingRestartTests(_MasterMixin, TestCase):
    """
    SIGHUP to the master replaces every worker with no failed request.
    """

    def test_rollsUnderLoad(self) -> None:
        """
        20 rolls with two workers under continuous load (new-connection and
        keep-alive clients): no request fails, the master's pid never
        changes, every roll replaces every worker, and the master exits 0 on
        SIGTERM.
        """
        server, port, workers = self.startMaster()
        load = HTTPLoad("127.0.0.1", port, clients=8).start()
        self.addCleanup(load.stop)
        seen = set(workers)
        for _ in range(20):
            new = self.roll(server)
            self.assertEqual(len(new), 2)
            self.assertFalse(seen & set(new))
            seen |= set(new)
            self.assertTrue(isAlive(server.pid))
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertTrue(set(result.pids) <= seen)
        self.assertFalse(server.pid in result.pids)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(60), 0)
        self.assertTrue(waitUntil(lambda: not any(isAlive(p) for p in seen), 30))

    def test_connectionsMoveAcrossRolls(self) -> None:
        """
        10 rolls with keep-alive clients sending every 0.3 and 1.1 s: each
        keeps its one TCP connection throughout (a retiring worker passes it
        to a worker that stays, through the master), with no failed request
        and no C{Connection: close}; the newest workers answer them.
        """
        server, port, workers = self.startMaster("--probation", "0.5")
        clients = [PacedClient("127.0.0.1", port, interval).start() for interval in (0.3, 1.1)]
        try:
            for _ in range(10):
                new = self.roll(server)
            time.sleep(1.5)
        finally:
            for client in clients:
                client.stop()
        for client in clients:
            self.assertEqual(client.failures, [])
            self.assertEqual(len(client.localPorts), 1)
            self.assertEqual(client.closes, 0)
            self.assertIn(client.pids[-1], new)
        # Each roll retired two workers, and at least one of them had a
        # client's connection to pass on.
        handedOff = [
            e for e in server.events
            if e.get("log_format", "").startswith("Drained") and e.get("handedOff")
        ]
        self.assertGreaterEqual(len(handedOff), 10)

    def test_slowRequestAcrossRoll(self) -> None:
        """
        A slow request started before a roll completes from the old worker.
        """
        server, port, workers = self.startMaster()
        slow = _Background(slowRequest, "127.0.0.1", port, "/sleep?duration=2")
        server.waitForMessage("sleeping 2")
        new = self.roll(server)
        status, body = slow.join()
        self.assertEqual(status, 200)
        self.assertTrue(any(f"from pid {p}".encode() in body for p in workers))
        self.assertTrue(waitUntil(lambda: not any(isAlive(p) for p in workers), 30))
        self.assertIn(_servedBy(get(port)), new)


class DrillTests(_MasterMixin, TestCase):
    """
    Workers that fail: N workers serve throughout, no request fails, and a
    later SIGHUP works.
    """

    def drill(self, mode: str, expected: str, *extra: str) -> None:
        fault = os.path.abspath(self.mktemp())
        env = dict(os.environ, TXGRACE_TEST_FAULT=fault)
        server, port, workers = self.startMaster(*extra, env=env)
        load = HTTPLoad("127.0.0.1", port, clients=4).start()
        self.addCleanup(load.stop)
        with open(fault, "w") as f:
            f.write(mode)
        since = server.eventCount()
        server.signal(signal.SIGHUP)
        failed = server.waitForMessage("Started worker pid", since=since)["pid"]
        server.waitForMessage(expected, 60)
        self.assertTrue(all(isAlive(p) for p in workers))
        os.unlink(fault)
        new = self.roll(server)
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertTrue(set(workers) <= set(result.pids))
        # A worker that never became ready accepted nothing.
        self.assertNotIn(failed, result.pids)
        # The old workers may accept until they read their STOP: once they
        # are gone, only the new ones serve.
        self.assertTrue(waitUntil(lambda: not any(isAlive(p) for p in workers), 30))
        self.assertIn(_servedBy(get(port)), new)

    def test_workerCrashesAtStart(self) -> None:
        """
        A new worker that crashes at start aborts the roll.
        """
        self.drill(
            "crash",
            r"Rolling restart aborted; the old workers go on serving: worker pid "
            r"\d+ exited with status 1 before it was ready",
        )

    def test_workerHangs(self) -> None:
        """
        A new worker that is not ready in time is killed and aborts the roll.
        """
        self.drill(
            "hang",
            r"Rolling restart aborted; .*was not ready within 5s and was killed",
            "--ready-timeout",
            "5",
        )

    def test_workerCrashesAfterReady(self) -> None:
        """
        A worker killed while serving is started again, and the requests go
        to the other worker meanwhile: only those the killed worker held can
        fail, at most one per client.
        """
        server, port, workers = self.startMaster()
        load = HTTPLoad("127.0.0.1", port, clients=4).start()
        self.addCleanup(load.stop)
        since = server.eventCount()
        os.kill(workers[0], signal.SIGKILL)
        server.waitForMessage(
            rf"Worker pid {workers[0]} \(slot 1\) exited with signal 9; starting another",
            since=since,
        )
        started = server.waitForMessage(r"Started worker pid", 30, since)["pid"]
        self.assertNotIn(started, workers)
        self.assertTrue(
            waitUntil(lambda: started in [s.pid for s in server.serving()], 30)
        )
        self.assertTrue(waitUntil(lambda: started in load.result.pids, 30))
        result = load.stop()
        self.assertLessEqual(result.failed, 4, result.failures)
        self.assertLessEqual(
            set(result.failures), {"reset", "eof_before_response", "keepalive_race"}
        )
        self.assertLessEqual(set(result.pids), {*workers, started})
        self.assertIn(workers[1], result.pids)
        new = self.roll(server)
        self.assertEqual(len(new), 2)
        self.assertFalse(set(new) & {workers[1], started})

    def test_hupDuringRoll(self) -> None:
        """
        A SIGHUP during a roll is refused with a log line; the one roll
        completes and replaces both workers.
        """
        server, port, workers = self.startMaster()
        since = server.eventCount()
        server.signal(signal.SIGHUP)
        server.waitForMessage("Rolling restart of 2 workers", since=since)
        server.signal(signal.SIGHUP)
        server.waitForMessage(
            "Restart refused: a rolling restart is in progress", since=since
        )
        new = _pids(server.waitForMessage("Rolling restart done", 60, since))
        self.assertEqual(len(new), 2)
        self.assertFalse(set(new) & set(workers))
        rolls = [m for m in server.messages() if m.startswith("Rolling restart of")]
        self.assertEqual(len(rolls), 1)
        self.assertTrue(waitUntil(lambda: not any(isAlive(p) for p in workers), 30))


class MasterLifeTests(_MasterMixin, TestCase):
    """
    The master's own end.
    """

    def test_masterKilled(self) -> None:
        """
        C{kill -9} of the master: every worker sees its control channel close,
        drains, and exits; none is left behind.
        """
        server, port, workers = self.startMaster("--hammer-timeout", "5")
        os.kill(server.pid, signal.SIGKILL)
        self.assertEqual(server.waitFirst(10), -signal.SIGKILL)
        self.assertTrue(waitUntil(lambda: not any(isAlive(p) for p in workers), 15))

        def gone() -> list[str]:
            return [m for m in server.messages() if "Stopping: the master is gone" in m]

        # One line from each worker, and no more.
        self.assertTrue(waitUntil(lambda: len(gone()) >= len(workers), 10), gone())
        self.assertEqual(len(gone()), len(workers), gone())

    def test_systemdNotifications(self) -> None:
        """
        The master is the main pid throughout: C{READY=1} once every worker
        is ready, C{RELOADING=1} at the start of a roll and C{READY=1} at its
        end, C{STOPPING=1} on stop.  Workers send nothing.
        """
        import socket as socketModule

        from txgrace.test.test_process import shortTemporaryDirectory

        path = os.path.join(shortTemporaryDirectory(self), "notify")
        notifications = socketModule.socket(socketModule.AF_UNIX, socketModule.SOCK_DGRAM)
        self.addCleanup(notifications.close)
        notifications.bind(path)
        notifications.settimeout(60)
        server, port, workers = self.startMaster(env=dict(os.environ, NOTIFY_SOCKET=path))

        def receive() -> list[str]:
            return notifications.recv(4096).decode().split("\n")

        self.assertEqual(receive(), ["READY=1", f"MAINPID={server.pid}"])
        self.roll(server)
        self.assertEqual(receive()[0], "RELOADING=1")
        self.assertEqual(receive(), ["READY=1"])
        server.signal(signal.SIGTERM)
        self.assertEqual(receive(), ["STOPPING=1"])
        self.assertEqual(server.wait(60), 0)
        notifications.settimeout(0.5)
        self.assertRaises(TimeoutError, notifications.recv, 4096)

    def test_shutdownDelay(self) -> None:
        """
        With C{--shutdown-delay}, the server goes on serving for that long
        after SIGTERM, then stops with status 0.
        """
        server, port, workers = self.startMaster("--shutdown-delay", "1.5")
        server.signal(signal.SIGTERM)
        server.waitForMessage("Serving 1.5s more before stopping")
        self.assertIn(_servedBy(get(port)), workers)
        self.assertEqual(server.wait(30), 0)

    def test_healthFailsThroughShutdownDelay(self) -> None:
        """
        With C{--health} and C{--shutdown-delay}, the master tells every
        worker that a stop has begun (its lame-duck message) at SIGTERM: the
        health check answers 503 from each worker throughout the delay,
        while requests are still served; then the workers drain and the
        master exits 0.
        """
        from txgrace.test.test_web import rawGet, status

        server, port, workers = self.startMaster(
            "--health", "/healthz", "--shutdown-delay", "4"
        )
        self.assertEqual({status(rawGet(port, "/healthz")) for _ in range(10)}, {200})
        server.signal(signal.SIGTERM)
        delay = server.waitForMessage("Serving 4.0s more before stopping")
        # The master logs that line a moment before its message to the
        # workers leaves (on its next reactor turn): wait for the first 503.
        self.assertTrue(
            waitUntil(lambda: status(rawGet(port, "/healthz")) == 503, 2.0)
        )
        answers = [rawGet(port, "/healthz") for _ in range(20)]
        self.assertEqual({status(a) for a in answers}, {503})
        self.assertTrue(all(a.endswith(b"stopping\n") for a in answers))
        self.assertIn(_servedBy(get(port)), workers)
        # All of that within the delay: nobody has begun to drain yet.
        self.assertEqual(
            [
                e for e in server.events[server.events.index(delay):]
                if e.get("log_format", "").startswith("Draining")
            ],
            [],
        )
        self.assertEqual(server.wait(30), 0)

    def test_asPidOne(self) -> None:
        """
        As pid 1 of a new pid namespace, the master reaps orphaned processes
        and exits 0 on SIGTERM.
        """
        unshare = shutil.which("unshare")
        if unshare is None:
            raise SkipTest("unshare is not installed")
        probe = subprocess.run(
            [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True
        )
        if probe.returncode != 0:
            raise SkipTest("cannot make a pid namespace here: %r" % probe.stderr)
        command = [
            unshare, "--pid", "--fork", "--mount-proc", "--kill-child",
            sys.executable, "-m", "twisted", "--log-format", "json", "txgrace",
            "--workers", "2", "--endpoint", LOCAL, "--app", APP,
        ]
        server = ServerProcess([], command=command)
        self.addCleanup(server.kill)
        ready = server.waitForMessage("Master pid .* serving", 60)
        self.assertEqual(ready["pid"], 1)
        port = int(ready["addresses"].rsplit(":", 1)[1])
        master = _childOf(server.pid)
        for _ in range(5):
            self.assertEqual(get(port, "/orphan"), b"orphaned\n")
        self.assertTrue(
            waitUntil(lambda: not zombieChildren(master), 10), zombieChildren(master)
        )
        os.kill(master, signal.SIGTERM)
        self.assertEqual(server.wait(60), 0)


def _childOf(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return int(f.read().split()[0])
