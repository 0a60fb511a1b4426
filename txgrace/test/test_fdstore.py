"""
systemd's file descriptor store, with a stand-in for systemd: a notify
socket that keeps the sockets a server sends with C{FDSTORE=1} and starts the
server again with them as C{LISTEN_FDS}, as systemd does after a crash
(C{Restart=always}) or a C{systemctl restart}.  Under load, a C{kill -9} and
a stop and start then refuse no connection.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
import threading

from twisted.trial.unittest import TestCase

from txgrace.test.test_process import APP, LOCAL, shortTemporaryDirectory
from txgrace.testing import HTTPLoad, ServerProcess, isAlive, waitUntil

# As systemd starts a service: the stored sockets at 3, 4, ..., and
# LISTEN_PID naming the process that will run.
LAUNCHER = """\
import os, sys
sources = [int(fd) for fd in sys.argv[1].split(",") if fd]
for index, fd in enumerate(sources):
    os.dup2(fd, 3 + index)
for fd in sources:
    if fd >= 3 + len(sources):
        os.close(fd)
if sources:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class FakeSystemd:
    """
    A notify socket that keeps what C{FDSTORE=1} sends (one socket per
    name, as systemd keeps one copy of each) and forgets what
    C{FDSTOREREMOVE=1} names.

    @ivar stored: The stored descriptors (this process's copies), by name.
    @ivar messages: Every message received, as text.
    """

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.stored: dict[str, int] = {}
        self.messages: list[str] = []
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data, fds, flags, address = socket.recv_fds(self.socket, 4096, 16)
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            fields = dict(line.partition("=")[::2] for line in text.splitlines())
            with self._lock:
                self.messages.append(text)
                if fields.get("FDSTORE") == "1" and fds:
                    name = fields.get("FDNAME", "stored")
                    old = self.stored.pop(name, None)
                    if old is not None:
                        os.close(old)
                    self.stored[name] = fds[0]
                    for extra in fds[1:]:
                        os.close(extra)
                else:
                    for fd in fds:
                        os.close(fd)
                if fields.get("FDSTOREREMOVE") == "1":
                    fd = self.stored.pop(fields.get("FDNAME", ""), None)
                    if fd is not None:
                        os.close(fd)
                self._lock.notify_all()

    def waitStored(self, count: int, timeout: float = 30.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.stored) >= count, timeout)

    def environment(self) -> dict[str, str]:
        """
        The environment systemd gives a service with a store.
        """
        environment = dict(os.environ, NOTIFY_SOCKET=self.path, FDSTORE="16")
        for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            environment.pop(variable, None)
        return environment

    def start(self, arguments: list[str]) -> ServerProcess:
        """
        Start C{twist txgrace arguments} as systemd would: with the stored
        sockets as descriptors 3, 4, ... and their names.
        """
        with self._lock:
            names = list(self.stored)
            fds = [self.stored[name] for name in names]
        environment = self.environment()
        # Out of the way of 3, 4, ..., where the launcher puts them.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        if fds:
            environment["LISTEN_FDS"] = str(len(fds))
            environment["LISTEN_FDNAMES"] = ":".join(names)
        command = [
            sys.executable, "-c", LAUNCHER, ",".join(map(str, high)),
            sys.executable, "-m", "twisted", "--log-format", "json", "txgrace",
            *arguments,
        ]
        try:
            server = ServerProcess([], command=command, env=environment, passFDs=high)
        finally:
            for fd in high:
                os.close(fd)
        return server

    def close(self) -> None:
        self.socket.close()
        for fd in self.stored.values():
            os.close(fd)
        self.stored.clear()


def _getUNIX(path: str) -> bytes:
    """
    The body of C{GET /} from the HTTP server on the UNIX socket C{path}.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(path)
        client.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    return response.partition(b"\r\n\r\n")[2]


class FileDescriptorStoreTests(TestCase):
    def setUp(self) -> None:
        self.directory = shortTemporaryDirectory(self)
        self.systemd = FakeSystemd(self.directory)
        self.addCleanup(self.systemd.close)

    def start(self, *extra: str) -> tuple[ServerProcess, int]:
        server = self.systemd.start(["--endpoint", LOCAL, "--app", APP, *extra])
        self.addCleanup(server.kill)
        serving = server.waitServing(1)
        return server, serving.port(0)

    def test_storedOnReady(self) -> None:
        """
        A process that serves sends each listening socket with FDSTORE=1,
        its name and FDPOLL=0.
        """
        server, port = self.start()
        self.assertTrue(self.systemd.waitStored(1))
        [(name, fd)] = self.systemd.stored.items()
        self.assertEqual(name, "tcp/127.0.0.1/0")
        self.assertEqual(socket.socket(fileno=os.dup(fd)).getsockname(), ("127.0.0.1", port))
        [message] = [m for m in self.systemd.messages if "FDSTORE=1" in m]
        self.assertEqual(message, "FDSTORE=1\nFDNAME=tcp/127.0.0.1/0\nFDPOLL=0")

    def crashAndRestart(self, how: str) -> None:
        server, port = self.start()
        self.assertTrue(self.systemd.waitStored(1))
        load = HTTPLoad("127.0.0.1", port, clients=4, maxRequests=20000).start()
        self.addCleanup(load.stop)
        self.assertTrue(waitUntil(lambda: load.result.ok > 50, 30))
        pid = server.waitServing(1).pid
        os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(pid), 30))
        okBefore = load.result.ok
        again = self.systemd.start(["--endpoint", LOCAL, "--app", APP])
        self.addCleanup(again.kill)
        serving = again.waitServing(1)
        self.assertEqual(serving.port(0), port)
        self.assertTrue(waitUntil(lambda: load.result.ok > okBefore + 50, 30))
        result = load.stop()
        self.assertEqual(result.failures["refused"], 0, result)
        self.assertGreater(result.pids[serving.pid], 0)
        if how == "stop":
            # A graceful stop drains: not one request fails.
            self.assertEqual(dict(result.failures), {})
        else:
            # Only what the killed process had accepted dies with it.
            self.assertLessEqual(result.failed, 4, result)
        os.kill(serving.pid, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(serving.pid), 30))

    def test_killNineRefusesNothing(self) -> None:
        """
        C{kill -9} under load, then a start with the stored socket: nothing
        is refused; queued connections are answered by the new process.
        """
        self.crashAndRestart("kill")

    def test_stopAndStartRefusesNothing(self) -> None:
        """
        A stop (SIGTERM) and a start with the stored socket: nothing fails.
        """
        self.crashAndRestart("stop")

    def test_unixPathKeptForTheStore(self) -> None:
        """
        A C{grace:unix:} socket that the process bound keeps its path on a
        final stop while the store holds it: after a stop and a start with
        the stored socket, clients reach the new process by the path.
        """
        path = os.path.join(self.directory, "web.sock")
        arguments = ["--endpoint", f"grace:unix:{path}:name=web", "--app", APP]
        server = self.systemd.start(arguments)
        self.addCleanup(server.kill)
        first = server.waitServing(1)
        self.assertTrue(self.systemd.waitStored(1))
        self.assertEqual(_getUNIX(path), f"hello from pid {first.pid}\n".encode())
        os.kill(first.pid, signal.SIGTERM)
        self.assertEqual(server.wait(30), 0)
        self.assertTrue(os.path.exists(path))
        again = self.systemd.start(arguments)
        self.addCleanup(again.kill)
        second = again.waitServing(1)
        again.waitForMessage(r"Adopting inherited fd \d+ \(web\)")
        self.assertEqual(_getUNIX(path), f"hello from pid {second.pid}\n".encode())
        os.kill(second.pid, signal.SIGTERM)
        self.assertEqual(again.wait(30), 0)

    def test_droppedPortRemoved(self) -> None:
        """
        A port that a new configuration no longer has is removed from the
        store (FDSTOREREMOVE=1) and closed.
        """
        server, port = self.start("--endpoint", "grace:tcp:0:interface=127.0.0.1:name=extra")
        self.assertTrue(self.systemd.waitStored(2))
        pid = server.waitServing(1).pid
        os.kill(pid, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(pid), 30))
        again = self.systemd.start(["--endpoint", LOCAL, "--app", APP])
        self.addCleanup(again.kill)
        again.waitServing(1)
        self.assertTrue(
            waitUntil(lambda: any("FDSTOREREMOVE=1\nFDNAME=extra" in m for m in self.systemd.messages), 30)
        )
        self.assertEqual(list(self.systemd.stored), ["tcp/127.0.0.1/0"])

    def test_masterDroppedPortRemoved(self) -> None:
        """
        Master mode: a port that a new configuration no longer has is
        removed from the store (FDSTOREREMOVE=1) too, and closed.
        """
        extra = "grace:tcp:0:interface=127.0.0.1:name=extra"
        arguments = ["--workers", "1", "--endpoint", LOCAL, "--app", APP]
        server = self.systemd.start([*arguments, "--endpoint", extra])
        self.addCleanup(server.kill)
        ready = server.waitForMessage(r"Master pid \d+ serving")
        self.assertTrue(self.systemd.waitStored(2))
        os.kill(ready["pid"], signal.SIGTERM)
        self.assertEqual(server.wait(60), 0)
        again = self.systemd.start(arguments)
        self.addCleanup(again.kill)
        again.waitForMessage(r"Master pid \d+ serving")
        self.assertTrue(
            waitUntil(lambda: any("FDSTOREREMOVE=1\nFDNAME=extra" in m for m in self.systemd.messages), 30)
        )
        self.assertEqual(list(self.systemd.stored), ["tcp/127.0.0.1/0"])
        again.waitForMessage(r"Closing inherited fd \d+ \(extra\): no endpoint claimed it")
        os.kill(again.pid, signal.SIGTERM)
        self.assertEqual(again.wait(60), 0)

    def test_masterKillNineRefusesNothing(self) -> None:
        """
        Master mode: C{kill -9} of the master (its workers then drain and
        exit), then a start with the stored socket: nothing is refused.
        """
        arguments = ["--workers", "2", "--endpoint", LOCAL, "--app", APP]
        server = self.systemd.start(arguments)
        self.addCleanup(server.kill)
        ready = server.waitForMessage(r"Master pid \d+ serving")
        port = int(ready["addresses"].rsplit(":", 1)[1])
        workers = [int(p) for p in ready["pids"].split(", ")]
        self.assertTrue(self.systemd.waitStored(1))
        load = HTTPLoad("127.0.0.1", port, clients=4, maxRequests=20000).start()
        self.addCleanup(load.stop)
        self.assertTrue(waitUntil(lambda: load.result.ok > 50, 30))
        os.kill(ready["pid"], signal.SIGKILL)
        self.assertTrue(waitUntil(lambda: not any(isAlive(w) for w in workers), 60))
        okBefore = load.result.ok
        again = self.systemd.start(arguments)
        self.addCleanup(again.kill)
        restarted = again.waitForMessage(r"Master pid \d+ serving")
        newWorkers = {int(p) for p in restarted["pids"].split(", ")}
        self.assertTrue(waitUntil(lambda: load.result.ok > okBefore + 50, 30))
        result = load.stop()
        # The workers drained what they had accepted, and every connection
        # queued meanwhile was answered by the new workers: not one request
        # failed in any way (refused, reset, cut short, timed out).
        self.assertEqual(dict(result.failures), {}, result)
        self.assertEqual(result.failed, 0, result)
        self.assertGreater(sum(result.pids[w] for w in newWorkers), 50, result)
        os.kill(again.pid, signal.SIGTERM)
        self.assertEqual(again.wait(60), 0)
