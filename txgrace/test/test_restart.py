"""
Zero-downtime restart with real processes on loopback: handover under load,
slow requests across a restart, failed successors, signal storms, systemd
notifications, the pidfile, changed endpoints and UNIX sockets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys

from twisted.trial.unittest import TestCase

from txgrace.test.test_process import (
    APP,
    LOCAL,
    _Background,
    shortTemporaryDirectory,
    startServer,
)
from txgrace.testing import (
    HTTPLoad,
    ServerProcess,
    Serving,
    isAlive,
    openFDs,
    slowRequest,
    waitUntil,
)


def restart(server: ServerProcess, current: Serving, timeout: float = 30.0) -> Serving:
    """
    SIGHUP the serving process, wait for its successor to be ready and for
    the old process to exit.
    """
    server.signal(signal.SIGHUP, current.pid)
    successor = server.waitServing(current.generation + 1, timeout)
    if not waitUntil(lambda: not isAlive(current.pid), timeout):
        raise AssertionError(f"pid {current.pid} did not exit after the handover")
    return successor


def get(port: int, path: str = "/") -> bytes:
    """
    One request; the body.
    """
    status, body = slowRequest("127.0.0.1", port, path, timeout=15)
    assert status == 200, (status, body)
    return body


class RestartTests(TestCase):
    """
    SIGHUP hands the sockets to a successor with no failed request.
    """

    def test_restartsUnderLoad(self) -> None:
        """
        Ten restarts while clients send requests without pause, half on a new
        connection each, half on keep-alive connections: no request fails,
        every restart brings a new pid, and every old pid exits.
        """
        server, serving = startServer(self, "--endpoint", LOCAL, "--endpoint", LOCAL)
        load = HTTPLoad("127.0.0.1", serving.port(0), clients=8).start()
        self.addCleanup(load.stop)
        generations = [serving]
        for _ in range(10):
            generations.append(restart(server, generations[-1]))
        get(serving.port(1))
        result = load.stop()
        self.assertEqual(dict(result.failures), {}, result)
        pids = [g.pid for g in generations]
        self.assertEqual(len(set(pids)), 11)
        self.assertTrue(set(result.pids) <= set(pids))
        self.assertIn(pids[-1], result.pids)
        self.assertGreater(result.ok, 100)
        self.assertEqual(server.waitFirst(), 0)
        # Every generation listened on the same two ports.
        for g in generations:
            self.assertEqual(g.addresses, serving.addresses)

    def test_slowRequestAcrossRestart(self) -> None:
        """
        A slow request started just before a restart completes with 200 from
        the old pid; requests after the handover are served by the new pid.
        """
        server, serving = startServer(self)
        slow = _Background(slowRequest, "127.0.0.1", serving.port(), "/sleep?duration=2")
        server.waitForMessage("sleeping 2")
        successor = restart(server, serving)
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))
        status, body = slow.join()
        self.assertEqual(status, 200)
        self.assertIn(f"from pid {serving.pid}".encode(), body)

    def test_successorCrashes(self) -> None:
        """
        A successor that crashes while starting up is reported with its exit
        status; the old process goes on serving and a later restart works.
        """
        fault = os.path.abspath(self.mktemp())
        env = dict(os.environ, TXGRACE_TEST_FAULT=fault)
        server, serving = startServer(self, env=env)
        with open(fault, "w") as f:
            f.write("crash")
        server.signal(signal.SIGHUP)
        server.waitForMessage(
            r"Restart failed, pid \d+ goes on serving: successor pid \d+ exited "
            r"with status 1 before it was ready"
        )
        self.assertIn(f"pid {serving.pid}".encode(), get(serving.port()))
        os.unlink(fault)
        successor = restart(server, serving)
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))

    def test_successorHangs(self) -> None:
        """
        A successor that is not ready within C{--ready-timeout} is killed;
        the old process goes on serving and a later restart works.
        """
        fault = os.path.abspath(self.mktemp())
        env = dict(os.environ, TXGRACE_TEST_FAULT=fault)
        # Long enough for the good successor that follows to start on a
        # loaded machine.
        server, serving = startServer(self, "--ready-timeout", "5", env=env)
        with open(fault, "w") as f:
            f.write("hang")
        server.signal(signal.SIGHUP)
        started = server.waitForMessage("Started successor pid")
        server.waitForMessage("was not ready within 5s and was killed")
        self.assertTrue(waitUntil(lambda: not isAlive(started["pid"]), 10))
        self.assertIn(f"pid {serving.pid}".encode(), get(serving.port()))
        os.unlink(fault)
        restart(server, serving)

    def test_twoSignalsOneSuccessor(self) -> None:
        """
        Two restart signals within a millisecond start one successor; the
        second is refused with a log line.
        """
        server, serving = startServer(self)
        os.kill(serving.pid, signal.SIGHUP)
        os.kill(serving.pid, signal.SIGUSR2)
        successor = server.waitServing(2)
        server.waitForMessage("Restart refused: successor pid .* is still starting")
        self.assertTrue(waitUntil(lambda: not isAlive(serving.pid), 30))
        started = [m for m in server.messages() if "Started successor pid" in m]
        self.assertEqual(len(started), 1)
        self.assertIn(f"pid {successor.pid}".encode(), get(serving.port()))

    def test_restartWhilePredecessorDrains(self) -> None:
        """
        A successor that is ready may be restarted at once, while its
        predecessor is still draining a slow request.
        """
        server, serving = startServer(self)
        slow = _Background(slowRequest, "127.0.0.1", serving.port(), "/sleep?duration=3")
        server.waitForMessage("sleeping 3")
        server.signal(signal.SIGHUP)
        second = server.waitServing(2)
        self.assertTrue(isAlive(serving.pid))
        third = restart(server, second)
        self.assertIn(f"pid {third.pid}".encode(), get(serving.port()))
        self.assertIn(f"from pid {serving.pid}".encode(), slow.join()[1])

    def test_drainingPredecessorSurvivesOneSIGTERM(self) -> None:
        """
        A process draining after a handover goes on draining when one SIGTERM
        reaches it (as C{systemctl stop} signals every process of the unit):
        its slow request still completes.
        """
        server, serving = startServer(self)
        slow = _Background(slowRequest, "127.0.0.1", serving.port(), "/sleep?duration=2")
        server.waitForMessage("sleeping 2")
        server.signal(signal.SIGHUP)
        server.waitServing(2)
        server.waitForMessage("Draining 1 connections")
        server.signal(signal.SIGTERM, serving.pid)
        server.waitForMessage("Already draining")
        status, body = slow.join()
        self.assertEqual(status, 200)
        self.assertIn(f"from pid {serving.pid}".encode(), body)
        self.assertEqual(server.waitFirst(), 0)

    def test_fdsStableOverGenerations(self) -> None:
        """
        After 20 restarts the newest generation has as many open descriptors
        as the first: nothing leaks into successors.
        """
        server, serving = startServer(self, "--endpoint", LOCAL, "--endpoint", LOCAL)
        first = openFDs(serving.pid)
        current = serving
        for _ in range(20):
            current = restart(server, current)
        # Measured before any request, whose socket could still be open.
        self.assertEqual(openFDs(current.pid), first)
        self.assertIn(f"pid {current.pid}".encode(), get(serving.port()))

    def test_systemdNotifications(self) -> None:
        """
        With C{NOTIFY_SOCKET} set, the first process sends C{READY=1}; a
        restart sends C{RELOADING=1} then C{MAINPID=<successor>} and
        C{READY=1}; a final stop sends C{STOPPING=1}.
        """
        path = os.path.join(shortTemporaryDirectory(self), "notify")
        notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(notifications.close)
        notifications.bind(path)
        notifications.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        server, serving = startServer(self, env=env)

        def receive() -> list[str]:
            return notifications.recv(4096).decode().split("\n")

        self.assertIn("READY=1", receive())
        server.signal(signal.SIGHUP)
        reloading = receive()
        self.assertEqual(reloading[0], "RELOADING=1")
        self.assertTrue(reloading[1].startswith("MONOTONIC_USEC="))
        successor = server.waitServing(2)
        self.assertEqual(receive(), [f"MAINPID={successor.pid}", "READY=1"])
        self.assertTrue(waitUntil(lambda: not isAlive(serving.pid), 30))
        server.signal(signal.SIGTERM, successor.pid)
        self.assertEqual(receive(), ["STOPPING=1"])

    def test_pidfileFollowsRestarts(self) -> None:
        """
        After a restart the pidfile names the new pid; after the final stop
        it is gone.
        """
        path = os.path.abspath(self.mktemp())
        server, serving = startServer(self, "--pidfile", path)
        self.assertTrue(waitUntil(lambda: os.path.exists(path), 10))
        successor = restart(server, serving)
        with open(path) as f:
            self.assertEqual(f.read().strip(), str(successor.pid))
        server.signal(signal.SIGTERM, successor.pid)
        self.assertTrue(waitUntil(lambda: not isAlive(successor.pid), 30))
        self.assertFalse(os.path.exists(path))

    def test_unixSocketSurvivesHandover(self) -> None:
        """
        A handover neither removes the UNIX socket path nor changes its mode.
        """
        path = os.path.join(shortTemporaryDirectory(self), "app.sock")
        server, serving = startServer(
            self, "--endpoint", f"grace:unix:{path}:mode=640"
        )
        inode = os.stat(path).st_ino
        successor = restart(server, serving)
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(path)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertIn(f"pid {successor.pid}".encode(), c.recv(65536))

    def test_tcpPortZeroKept(self) -> None:
        """
        C{grace:tcp:0} keeps the port the kernel chose across restarts.
        """
        server, serving = startServer(self)
        successor = restart(server, serving)
        self.assertEqual(successor.addresses, serving.addresses)


def unixGet(path: str) -> bytes:
    """
    One request on a new connection to the UNIX socket at C{path}; the
    whole response.
    """
    response = b""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(15)
        client.connect(path)
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while chunk := client.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 "), response
    return response


class UNIXSocketOwnershipTests(TestCase):
    """
    A UNIX socket path is removed only by the process that owns it, at its
    final stop: never by a predecessor that handed over, a successor that
    never became ready, or a worker whose master still serves.
    """

    def setUp(self) -> None:
        self.directory = shortTemporaryDirectory(self)
        self.path = os.path.join(self.directory, "app.sock")
        self.endpoint = f"grace:unix:{self.path}"

    def assertServedBy(self, pid: int) -> None:
        self.assertIn(f"from pid {pid}".encode(), unixGet(self.path))

    def test_restartThenStop(self) -> None:
        """
        Across a restart the path stays (the same socket file) while the old
        process exits; the successor, which now owns it
        (C{TXGRACE_OWNED_SOCKETS}), removes it at its final stop, and the
        directory is left empty.
        """
        server, serving = startServer(self, "--endpoint", self.endpoint)
        inode = os.stat(self.path).st_ino
        successor = restart(server, serving)
        self.assertEqual(os.stat(self.path).st_ino, inode)
        self.assertServedBy(successor.pid)
        server.signal(signal.SIGTERM, successor.pid)
        self.assertTrue(waitUntil(lambda: not isAlive(successor.pid), 30))
        self.assertEqual(os.listdir(self.directory), [])

    def test_successorNotReady(self) -> None:
        """
        A successor whose readiness hold fails stops without removing the
        path: the old process goes on serving on it, and its own final stop
        removes it.
        """
        fault = os.path.abspath(self.mktemp())
        server, serving = startServer(
            self,
            "--endpoint",
            self.endpoint,
            env=dict(os.environ, TXGRACE_TEST_FAULT=fault),
        )
        inode = os.stat(self.path).st_ino
        with open(fault, "w") as f:
            f.write("hold-fails")
        server.signal(signal.SIGHUP, serving.pid)
        started = server.waitForMessage("Started successor pid")["pid"]
        server.waitForMessage("Not ready, stopping: RuntimeError: readiness check failed")
        server.waitForMessage(r"Restart failed, pid \d+ goes on serving")
        self.assertTrue(waitUntil(lambda: not isAlive(started), 30))
        self.assertEqual(os.stat(self.path).st_ino, inode)
        self.assertServedBy(serving.pid)
        server.signal(signal.SIGTERM, serving.pid)
        self.assertEqual(server.waitFirst(), 0)
        self.assertEqual(os.listdir(self.directory), [])

    def test_workerStoppedDirectly(self) -> None:
        """
        A worker sent SIGTERM by its pid (not through its master) stops
        without removing the path: the master's other workers go on serving
        on it, and the master removes it at its final stop.
        """
        server = ServerProcess(
            ["--workers", "2", "--endpoint", self.endpoint, "--app", APP]
        )
        self.addCleanup(server.kill)
        ready = server.waitForMessage("Master pid .* serving", 60)
        workers = [int(p) for p in ready["pids"].split(", ")]
        inode = os.stat(self.path).st_ino
        os.kill(workers[0], signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(workers[0]), 30))
        self.assertEqual(os.stat(self.path).st_ino, inode)
        for _ in range(4):
            body = unixGet(self.path)
            self.assertNotIn(f"from pid {workers[0]}".encode(), body)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait(60), 0)
        self.assertEqual(os.listdir(self.directory), [])


class ChangedEndpointsTests(TestCase):
    """
    A successor with another set of endpoints adopts the sockets that match,
    binds the new ones, and closes the inherited ones nothing claimed.
    """

    def test_changedEndpoints(self) -> None:
        """
        The kept port never refuses, the added port serves, and the removed
        port's socket is closed.
        """
        kept, removed, added = (socket.socket() for _ in range(3))
        ports = []
        for skt in (kept, removed, added):
            skt.bind(("127.0.0.1", 0))
            ports.append(skt.getsockname()[1])
            skt.close()
        config = os.path.abspath(self.mktemp())

        def configure(*portNumbers: int) -> None:
            with open(config, "w") as f:
                json.dump(
                    {
                        "endpoints": [
                            f"grace:tcp:{p}:interface=127.0.0.1" for p in portNumbers
                        ]
                    },
                    f,
                )

        configure(ports[0], ports[1])
        server = ServerProcess(
            [], command=[sys.executable, "-m", "txgrace.test._configserver", config]
        )
        self.addCleanup(server.kill)
        serving = server.waitServing(1)
        load = HTTPLoad("127.0.0.1", ports[0], clients=4).start()
        self.addCleanup(load.stop)
        configure(ports[0], ports[2])
        successor = restart(server, serving)
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertEqual(
            [a[2] for a in successor.addresses], [ports[0], ports[2]]
        )
        self.assertIn(f"pid {successor.pid}".encode(), get(ports[2]))
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports[1]), timeout=5).close()
        server.waitForMessage(r"Closing inherited fd \d+ .*no endpoint claimed it")
