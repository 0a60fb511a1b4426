"""
nginx in front of txgrace, with upstream keep-alive (C{keepalive 8}): across
restarts, every request through nginx is answered, and nginx never has to
open a new connection to txgrace, because the old process hands each of its
idle upstream connections to the successor (L{txgrace.handoff}).

nginx is a test dependency where it is installed (Debian package
C{nginx-light}), and these tests are skipped otherwise.  Each test runs its
own nginx as a child process (C{daemon off; master_process off;}) with its
configuration, pid file and logs in the test's temporary directory, and
kills it by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from twisted.trial.unittest import TestCase

from txgrace.test.test_process import shortTemporaryDirectory, startServer
from txgrace.test.test_restart import restart
from txgrace.testing import RequestFailed, slowRequest, waitUntil

HOST = "127.0.0.1"


def findNginx() -> str | None:
    """
    The nginx binary: on C{PATH}, or Debian's C{/usr/sbin/nginx} (C{/usr/sbin}
    is not on every user's C{PATH}); L{None} when it is not installed.
    """
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


NGINX = findNginx()

CONFIGURATION = """\
daemon off;
master_process off;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{
    worker_connections 256;
}}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream txgrace {{
        server {host}:{upstreamPort};
        keepalive {connections};
        keepalive_timeout 300s;
    }}
    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://txgrace;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def freePort() -> int:
    """
    A loopback port that was free a moment ago: nginx cannot listen on port
    0, so the caller retries if another process takes it first.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as skt:
        skt.bind((HOST, 0))
        return int(skt.getsockname()[1])


class Nginx:
    """
    An nginx child process proxying to a txgrace server on
    C{upstreamPort}, keeping up to C{connections} idle upstream connections.

    @ivar port: The port nginx listens on, once L{start} returned.
    """

    def __init__(self, binary: str, directory: str, upstreamPort: int, connections: int = 8) -> None:
        self._binary = binary
        self._directory = directory
        self._upstreamPort = upstreamPort
        self._connections = connections
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def errorLog(self) -> str:
        """
        The text of nginx's error log so far.
        """
        try:
            with open(os.path.join(self._directory, "error.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def start(self, attempts: int = 5, timeout: float = 15.0) -> int:
        """
        Start nginx on a free port, trying another if that one was taken.

        @return: The port it listens on.
        @raise RuntimeError: If it does not listen.
        """
        for _ in range(attempts):
            port = freePort()
            configuration = os.path.join(self._directory, "nginx.conf")
            with open(configuration, "w") as f:
                f.write(
                    CONFIGURATION.format(
                        directory=self._directory,
                        host=HOST,
                        port=port,
                        upstreamPort=self._upstreamPort,
                        connections=self._connections,
                    )
                )
            process = subprocess.Popen(
                [
                    self._binary,
                    "-p", self._directory,
                    "-e", os.path.join(self._directory, "error.log"),
                    "-c", configuration,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self._process = process
            if waitUntil(lambda: process.poll() is not None or self._listening(port), timeout):
                if process.poll() is None:
                    self.port = port
                    return port
            else:
                self.stop()
                break
            if "Address already in use" not in self.errorLog:
                break
        raise RuntimeError(f"nginx did not start; its error log:\n{self.errorLog}")

    def _listening(self, port: int) -> bool:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """
        Stop nginx (SIGTERM to its pid; SIGKILL if it lingers) and reap it.
        """
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Answers:
    """
    What requests through nginx to C{/peer} got.

    @ivar peers: The upstream peer port of each answer, with the number of
        restarts begun before its request was sent.
    @ivar pids: The pid that answered each request.
    @ivar failures: Each non-200 status or failed request.
    """

    peers: list[tuple[int, int]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    restarts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, port: int, path: str) -> None:
        """
        One request through nginx on C{port}, recorded.
        """
        restarts = self.restarts
        try:
            status, body = slowRequest(HOST, port, path, timeout=30)
        except (RequestFailed, OSError) as e:
            with self._lock:
                self.failures.append(getattr(e, "kind", type(e).__name__))
            return
        words = body.split()
        with self._lock:
            if status != 200 or len(words) != 5 or words[0] != b"peer":
                self.failures.append(f"{status} {body[:200]!r}")
                return
            self.peers.append((restarts, int(words[1])))
            self.pids.append(int(words[4]))

    def burst(self, port: int, count: int, duration: float) -> None:
        """
        C{count} requests at once, each answered after C{duration} seconds,
        so that nginx uses C{count} upstream connections.
        """
        threads = [
            threading.Thread(target=self.get, args=(port, f"/peer?duration={duration}"))
            for _ in range(count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    def peersAfter(self, restarts: int) -> set[int]:
        """
        The upstream peer ports of requests sent once C{restarts} restarts
        had begun.
        """
        with self._lock:
            return {port for began, port in self.peers if began >= restarts}

    def peersBefore(self, restarts: int) -> set[int]:
        """
        The upstream peer ports of requests sent before C{restarts} restarts
        had begun.
        """
        with self._lock:
            return {port for began, port in self.peers if began < restarts}


class Steady:
    """
    One request through nginx every C{interval} seconds, in a thread, until
    L{stop}.
    """

    def __init__(self, answers: Answers, port: int, interval: float) -> None:
        self._answers = answers
        self._port = port
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Steady:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(60)

    def _run(self) -> None:
        for _ in range(100_000):
            if self._stopping.wait(self._interval):
                return
            self._answers.get(self._port, "/peer")


class NginxTests(TestCase):
    """
    nginx with upstream keep-alive in front of a txgrace server that
    restarts.
    """

    if NGINX is None:
        skip = "nginx is not installed (Debian package nginx-light)"

    CONNECTIONS = 8

    def startNginx(self, upstreamPort: int) -> Nginx:
        """
        Start nginx in a private directory, in front of C{upstreamPort}; it
        is stopped after the test.
        """
        assert NGINX is not None
        nginx = Nginx(NGINX, shortTemporaryDirectory(self), upstreamPort, self.CONNECTIONS)
        self.addCleanup(nginx.stop)
        nginx.start()
        return nginx

    def restarts(self, *serverArguments: str) -> tuple[Answers, Nginx, list[int]]:
        """
        Start a server with C{serverArguments} and nginx in front of it;
        open nginx's upstream connections with a burst, then send a request
        every 0.5 s through nginx across 10 restarts, and after each
        restart a burst that uses all the upstream connections but one (the
        steady client may hold that one).

        @return: The answers, nginx, and the pid of each generation.
        """
        server, serving = startServer(self, *serverArguments)
        nginx = self.startNginx(serving.port())
        answers = Answers()
        answers.burst(nginx.port, self.CONNECTIONS, 1.5)
        steady = Steady(answers, nginx.port, 0.5).start()
        pids = [serving.pid]
        try:
            time.sleep(1)
            for i in range(10):
                answers.restarts = i + 1
                serving = restart(server, serving)
                pids.append(serving.pid)
                answers.burst(nginx.port, self.CONNECTIONS - 1, 0.5)
            time.sleep(1)
        finally:
            steady.stop()
        return answers, nginx, pids

    def test_keepaliveAcrossRestarts(self) -> None:
        """
        About 2 requests/s through nginx across 10 restarts: every request
        is answered with 200 (no 502), every generation answers, and every
        upstream connection txgrace sees after the first restart is one of
        the 8 nginx had opened before it: nginx never reconnected.
        """
        answers, nginx, pids = self.restarts()
        context = f"nginx error log:\n{nginx.errorLog}"
        self.assertEqual(answers.failures, [], context)
        before, after = answers.peersBefore(1), answers.peersAfter(1)
        self.assertEqual(len(before), self.CONNECTIONS, context)
        self.assertTrue(after)
        self.assertEqual(after - before, set(), f"new upstream connections; {context}")
        self.assertEqual(set(pids) - set(answers.pids), set())
        self.assertGreater(len(answers.pids), 10 * (self.CONNECTIONS - 1) + 20)
