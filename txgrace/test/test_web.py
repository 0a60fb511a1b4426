"""
L{txgrace.web}: the health check in each state, and held-open requests
(server-sent events, a long poll) that end cleanly when the drain begins;
the process tests run C{demo/sse.py} for real.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

import txgrace
from txgrace import lifecycle as lifecycleModule
from txgrace.adopt import SocketRegistry
from txgrace.lifecycle import (
    HANDED_OVER,
    RESTARTING,
    SERVING,
    STARTING,
    ProcessLifecycle,
    lifecycleFor,
)
from txgrace.test.test_install import _sourceTree
from txgrace.test.test_process import LOCAL, _Background
from txgrace.testing import ServerProcess, isAlive, waitUntil
from txgrace.web import HealthResource, finishOnDrain, lastEvent


def rawGet(port: int, path: str, timeout: float = 30) -> bytes:
    """
    Everything the server sends for one request, until it closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as skt:
        skt.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = skt.recv(65536)
            if not chunk:
                return data
            data += chunk


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


class HealthTests(SynchronousTestCase):
    def answer(self, lifecycle: ProcessLifecycle) -> tuple[int, bytes]:
        request = DummyRequest([b""])
        body = HealthResource(lifecycle).render_GET(request)
        return request.responseCode or 200, body

    def test_states(self) -> None:
        """
        503 while starting, 200 while serving or restarting, 503 once a stop
        begins (during the shutdown delay too) and after the handover.
        """
        lifecycle = ProcessLifecycle(MemoryReactorClock(), SocketRegistry(lambda: []))
        lifecycle.state = STARTING
        self.assertEqual(self.answer(lifecycle), (503, b"starting\n"))
        lifecycle.state = SERVING
        self.assertEqual(self.answer(lifecycle), (200, b"ok\n"))
        lifecycle.state = RESTARTING
        self.assertEqual(self.answer(lifecycle), (200, b"ok\n"))
        lifecycle.state = SERVING
        lifecycle.stopBegun = True
        self.assertEqual(self.answer(lifecycle), (503, b"stopping\n"))
        lifecycle.state = HANDED_OVER
        self.assertEqual(self.answer(lifecycle), (503, b"handed over\n"))


class FinishOnDrainTests(SynchronousTestCase):
    def test_lastWordsThenFinish(self) -> None:
        lifecycle = ProcessLifecycle(MemoryReactorClock(), SocketRegistry(lambda: []))
        request = DummyRequest([b""])
        finishOnDrain(request, b"bye\n", lifecycle)
        self.assertEqual(request.finished, 0)
        lifecycle._startDrain()
        self.assertEqual(request.written, [b"bye\n"])
        self.assertEqual(request.finished, 1)

    def test_alreadyFinished(self) -> None:
        lifecycle = ProcessLifecycle(MemoryReactorClock(), SocketRegistry(lambda: []))
        request = DummyRequest([b""])
        finishOnDrain(request, b"bye\n", lifecycle)
        request.finish()
        lifecycle._startDrain()
        self.assertEqual(request.written, [])

    def test_lastEvent(self) -> None:
        self.assertEqual(
            lastEvent("going\naway", 500, "bye"),
            b"retry: 500\nevent: bye\ndata: going\ndata: away\n\n",
        )


class DrainNoticeTests(SynchronousTestCase):
    def test_whenDraining(self) -> None:
        """
        C{txgrace.whenDraining()} is this process's notice: each call gives a
        Deferred that has not fired while the process serves, every one of
        them fires when the drain begins, and one asked for after that has
        already fired.
        """
        self.patch(lifecycleModule, "processRegistry", SocketRegistry(lambda: []))
        lifecycle = lifecycleFor(reactor=MemoryReactorClock())
        self.assertIs(lifecycleFor(), lifecycle)
        first, second = txgrace.whenDraining(), txgrace.whenDraining()
        self.assertNoResult(first)
        self.assertNoResult(second)
        lifecycle._startDrain()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(txgrace.whenDraining()))


class DrainNoticeProcessTests(TestCase):
    def test_backgroundWorkStops(self) -> None:
        """
        Background work (a L{LoopingCall}) that waits on
        C{txgrace.whenDraining()} stops in the old process after a HUP,
        while its successor's goes on; on SIGTERM with C{--shutdown-delay}
        it goes on through the delay and stops when the drain begins.
        """
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "txgrace.test._apps.backgroundSite",
             "--shutdown-delay", "2"]
        )
        self.addCleanup(server.kill)
        first = server.waitServing(1).pid
        server.waitForMessage(rf"background tick in pid {first}$")
        os.kill(first, signal.SIGHUP)
        second = server.waitServing(2).pid
        stopped = server.waitForMessage(rf"background work stopped in pid {first}$")
        self.assertEqual(server.waitFirst(30), 0)
        since = server.eventCount()
        server.waitForMessage(rf"background tick in pid {second}$", since=since)
        self.assertEqual(
            [m for m in server.messages() if f"stopped in pid {second}" in m], []
        )
        self.assertNotIn(
            f"background tick in pid {first}",
            "\n".join(server.messages()[server.events.index(stopped) + 1:]),
        )

        os.kill(second, signal.SIGTERM)
        delay = server.waitForMessage(r"Serving 2.0s more before stopping")
        server.waitForMessage(
            rf"background tick in pid {second}$", since=server.events.index(delay) + 1
        )
        server.waitForMessage(rf"background work stopped in pid {second}$")
        self.assertTrue(waitUntil(lambda: not isAlive(second), 30))


class DemoTests(TestCase):
    def test_streamsEndCleanlyAndHealthFails(self) -> None:
        """
        With C{--health} and C{--shutdown-delay}: SIGTERM makes the health
        check answer 503 at once while the server still serves; at the end
        of the delay the SSE stream gets its last event with a retry hint and
        ends cleanly, and the long poll is answered; the process exits 0.
        """
        server = ServerProcess(
            ["--endpoint", LOCAL, "--app", "demo.sse.site", "--health", "/healthz",
             "--shutdown-delay", "2"],
            cwd=_sourceTree(),
        )
        self.addCleanup(server.kill)
        serving = server.waitServing(1)
        port = serving.port(0)
        self.assertEqual(status(rawGet(port, "/healthz")), 200)
        stream = _Background(rawGet, port, "/events")
        poll = _Background(rawGet, port, "/poll")
        time.sleep(1.2)
        os.kill(serving.pid, signal.SIGTERM)
        server.waitForMessage(r"Serving 2.0s more before stopping")
        health = rawGet(port, "/healthz")
        self.assertEqual(status(health), 503)
        self.assertTrue(health.endswith(b"stopping\n"))
        events = stream.join()
        self.assertIn(b"data: tick 1 from pid", events)
        self.assertIn(b"retry: 500\nevent: bye\n", events)
        self.assertIn(f"data: pid {serving.pid} is going away".encode(), events)
        self.assertTrue(events.endswith(b"0\r\n\r\n"), events[-80:])
        answer = poll.join()
        self.assertEqual(status(answer), 200)
        self.assertIn(b"draining: ask again\n", answer)
        self.assertTrue(answer.endswith(b"0\r\n\r\n"))
        self.assertEqual(server.process.wait(30), 0)

    def test_healthNeedsWeb(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "txgrace", "--endpoint", LOCAL,
             "--app", "demo.ticker.factory", "--health", "/healthz"],
            capture_output=True, text=True, timeout=60, cwd=_sourceTree(),
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.strip(),
            "twist txgrace: error: --health '/healthz': --app 'demo.ticker.factory' "
            "is not a twisted.web app",
        )
