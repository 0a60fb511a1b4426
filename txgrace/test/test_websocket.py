"""
Websockets across a restart and a stop, with real processes and a raw
client (wsproto): every client gets close code 1001 from the old process,
none is cut, and every one reconnects to the successor; closes are paced.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.test.test_process import LOCAL
from txgrace.testing import ServerProcess, isAlive, waitUntil

try:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection,
        CloseConnection,
        Request,
        TextMessage,
    )
except ImportError:  # pragma: no cover
    WSConnection = None  # type: ignore[assignment,misc]


@dataclass
class WebSocketClient:
    """
    One client: connect and exchange a message, wait for the server to close,
    then (if asked) reconnect and exchange a message again.

    @ivar pids: The pid that answered each exchange.
    @ivar closeCode: The close code the server sent, or L{None} if the
        connection ended without a close frame.
    @ivar closedAt: When the close frame arrived (monotonic seconds).
    """

    port: int
    path: str
    reconnect: bool = True
    pids: list[int] = field(default_factory=list)
    closeCode: int | None = None
    closedAt: float | None = None
    error: str | None = None
    connected: threading.Event = field(default_factory=threading.Event)

    def _open(self) -> tuple[socket.socket, Any]:
        skt = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        ws = WSConnection(ConnectionType.CLIENT)
        skt.sendall(ws.send(Request(host="127.0.0.1", target=self.path)))
        self._expect(skt, ws, AcceptConnection)
        return skt, ws

    def _events(self, skt: socket.socket, ws: Any) -> Any:
        while True:
            for event in ws.events():
                yield event
            data = skt.recv(65536)
            if not data:
                yield None
                return
            ws.receive_data(data)

    def _expect(self, skt: socket.socket, ws: Any, kind: type) -> Any:
        for event in self._events(skt, ws):
            if event is None or isinstance(event, CloseConnection):
                raise ConnectionError(f"closed while waiting for {kind.__name__}")
            if isinstance(event, kind):
                return event

    def _exchange(self, skt: socket.socket, ws: Any) -> None:
        skt.sendall(ws.send(TextMessage(data="hello")))
        message = ""
        for event in self._events(skt, ws):
            if event is None or isinstance(event, CloseConnection):
                raise ConnectionError("closed before the echo")
            if isinstance(event, TextMessage):
                message += event.data
                if event.message_finished:
                    break
        self.pids.append(int(message.rsplit(" ", 1)[1]))

    def run(self) -> None:
        try:
            skt, ws = self._open()
            self._exchange(skt, ws)
            self.connected.set()
            for event in self._events(skt, ws):
                if event is None:
                    break
                if isinstance(event, CloseConnection):
                    self.closeCode = event.code
                    self.closedAt = time.monotonic()
                    try:
                        skt.sendall(ws.send(event.response()))
                    except OSError:
                        pass
                    break
            skt.close()
            if self.reconnect:
                for attempt in range(50):
                    try:
                        skt, ws = self._open()
                        break
                    except ConnectionError:
                        time.sleep(0.1)  # The next generation is not ready.
                self._exchange(skt, ws)
                skt.sendall(ws.send(CloseConnection(code=1000)))
                skt.close()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.connected.set()


def startClients(port: int, path: str, count: int, reconnect: bool = True) -> tuple[list[WebSocketClient], list[threading.Thread]]:
    clients = [WebSocketClient(port, path, reconnect) for _ in range(count)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    for thread in threads:
        thread.start()
    for client in clients:
        assert client.connected.wait(60), "a client never connected"
    return clients, threads


def joinAll(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a client did not finish"


class WebSocketDrainTests(TestCase):
    def setUp(self) -> None:
        if WSConnection is None:
            raise SkipTest("wsproto is not installed")

    def serve(self, app: str, *extra: str) -> tuple[ServerProcess, int, int]:
        server = ServerProcess(["--endpoint", LOCAL, "--app", app, *extra])
        self.addCleanup(server.kill)
        serving = server.waitServing(1)
        return server, serving.pid, serving.port(0)

    def acrossRestart(self, app: str, path: str, count: int) -> None:
        server, first, port = self.serve(app)
        clients, threads = startClients(port, path, count)
        self.assertEqual({c.error for c in clients}, {None})
        self.assertEqual({c.pids[0] for c in clients}, {first})
        os.kill(first, signal.SIGHUP)
        second = server.waitServing(2).pid
        joinAll(threads)
        self.assertEqual([c.error for c in clients if c.error], [])
        self.assertEqual(Counter(c.closeCode for c in clients), Counter({1001: count}))
        self.assertEqual(Counter(c.pids[1] for c in clients), Counter({second: count}))
        self.assertEqual(server.process.wait(60), 0)
        os.kill(second, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(second), 30))

    def test_twistedWebSocketsAcrossRestart(self) -> None:
        """
        200 clients of Twisted's C{WebSocketResource} across a HUP.
        """
        try:
            import twisted.web.websocket  # noqa: F401
        except ImportError:
            raise SkipTest("twisted.web.websocket needs wsproto")
        self.acrossRestart("txgrace.test._apps.webSocketSite", "/ws", 200)

    def test_autobahnAcrossRestart(self) -> None:
        """
        Autobahn's C{WebSocketServerProtocol} as a plain factory, across a
        HUP.
        """
        try:
            import autobahn  # noqa: F401
        except ImportError:
            raise SkipTest("autobahn is not installed")
        self.acrossRestart("txgrace.test._apps.autobahnFactory", "/", 50)

    def test_acrossStop(self) -> None:
        """
        SIGTERM: every client gets 1001, and the process exits 0 (no hammer).
        """
        server, first, port = self.serve(
            "txgrace.test._apps.webSocketSite", "--hammer-timeout", "30"
        )
        clients, threads = startClients(port, "/ws", 50, reconnect=False)
        os.kill(first, signal.SIGTERM)
        joinAll(threads)
        self.assertEqual(Counter(c.closeCode for c in clients), Counter({1001: 50}))
        self.assertEqual(server.process.wait(60), 0)

    def test_pacedCloses(self) -> None:
        """
        With --drain-rate 200, 500 clients are closed over about 2.5 s, no
        more than about 200 in any second.
        """
        server, first, port = self.serve(
            "txgrace.test._apps.webSocketSite", "--drain-rate", "200"
        )
        clients, threads = startClients(port, "/ws", 500, reconnect=False)
        os.kill(first, signal.SIGTERM)
        joinAll(threads)
        self.assertEqual(Counter(c.closeCode for c in clients), Counter({1001: 500}))
        times = sorted(c.closedAt for c in clients if c.closedAt is not None)
        span = times[-1] - times[0]
        self.assertGreater(span, 1.8)
        perSecond = Counter(int(t - times[0]) for t in times)
        self.assertLessEqual(max(perSecond.values()), 260, perSecond)
        self.assertEqual(server.process.wait(60), 0)
