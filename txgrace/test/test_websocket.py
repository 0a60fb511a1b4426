"""
Websockets across a restart and a stop, with real processes and a raw
client (wsproto): every client gets close code 1001 from the old process,
none is cut, and every one reconnects to the successor; closes are paced.
Twisted's own websockets, autobahn as a plain factory and autobahn through
C{twisted.web}, over TCP and behind TLS.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.test.test_process import LOCAL
from txgrace.testing import (
    ServerProcess,
    isAlive,
    waitUntil,
    writeSelfSignedCertificate,
)

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
    @ivar reconnectedAt: When the successor accepted the reconnection (its
        handshake answer arrived; monotonic seconds).
    @ivar tls: Whether to speak TLS (any certificate is accepted).
    """

    port: int
    path: str
    reconnect: bool = True
    tls: bool = False
    pids: list[int] = field(default_factory=list)
    closeCode: int | None = None
    closedAt: float | None = None
    reconnectedAt: float | None = None
    error: str | None = None
    connected: threading.Event = field(default_factory=threading.Event)

    def _open(self) -> tuple[socket.socket, Any]:
        skt = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        if self.tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            skt = context.wrap_socket(skt, server_hostname="localhost")
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
                        self.reconnectedAt = time.monotonic()
                        break
                    except ConnectionError:
                        time.sleep(0.1)  # The next generation is not ready.
                self._exchange(skt, ws)
                skt.sendall(ws.send(CloseConnection(code=1000)))
                skt.close()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self.connected.set()


def startClients(
    port: int, path: str, count: int, reconnect: bool = True, tls: bool = False
) -> tuple[list[WebSocketClient], list[threading.Thread]]:
    clients = [WebSocketClient(port, path, reconnect, tls) for _ in range(count)]
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


def needTwistedWebSockets() -> None:
    try:
        import twisted.web.websocket  # noqa: F401
    except ImportError:
        raise SkipTest("twisted.web.websocket needs wsproto")


def needAutobahn() -> None:
    try:
        import autobahn.twisted.resource  # noqa: F401
    except ImportError:
        raise SkipTest("autobahn is not installed (pip install 'txgrace[autobahn]')")


def mostInAnySecond(times: list[float]) -> int:
    """
    The largest number of C{times} that fall in any one-second window.
    """
    times = sorted(times)
    most = first = 0
    for last, t in enumerate(times):
        while t - times[first] >= 1.0:
            first += 1
        most = max(most, last - first + 1)
    return most


class WebSocketDrainTests(TestCase):
    def setUp(self) -> None:
        if WSConnection is None:
            raise SkipTest("wsproto is not installed")

    def tlsEndpoint(self) -> str:
        """
        A C{grace:ssl:} endpoint on loopback with a fresh self-signed
        certificate.
        """
        directory = os.path.abspath(self.mktemp())
        key, cert = writeSelfSignedCertificate(directory)
        return f"grace:ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"

    def serve(
        self, app: str, *extra: str, endpoint: str = LOCAL
    ) -> tuple[ServerProcess, int, int]:
        server = ServerProcess(["--endpoint", endpoint, "--app", app, *extra])
        self.addCleanup(server.kill)
        serving = server.waitServing(1)
        return server, serving.pid, serving.port(0)

    def acrossRestart(
        self, app: str, path: str, count: int, endpoint: str = LOCAL, tls: bool = False
    ) -> None:
        """
        C{count} clients connected across a HUP: each gets 1001 from the old
        process, reconnects to the successor and exchanges a message; the
        old process exits 0.
        """
        server, first, port = self.serve(app, endpoint=endpoint)
        clients, threads = startClients(port, path, count, tls=tls)
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

    def acrossStop(
        self, app: str, path: str, count: int, endpoint: str = LOCAL, tls: bool = False
    ) -> None:
        """
        SIGTERM with C{count} clients connected: each gets 1001, none is
        aborted, and the process exits 0 well before the hammer.
        """
        server, first, port = self.serve(
            app, "--hammer-timeout", "30", endpoint=endpoint
        )
        clients, threads = startClients(port, path, count, reconnect=False, tls=tls)
        self.assertEqual({c.error for c in clients}, {None})
        os.kill(first, signal.SIGTERM)
        joinAll(threads)
        self.assertEqual([c.error for c in clients if c.error], [])
        self.assertEqual(Counter(c.closeCode for c in clients), Counter({1001: count}))
        self.assertEqual(server.process.wait(60), 0)
        self.assertNotIn("Hammer", "\n".join(server.messages()))

    def test_twistedWebSocketsAcrossRestart(self) -> None:
        """
        200 clients of Twisted's C{WebSocketResource} across a HUP.
        """
        needTwistedWebSockets()
        self.acrossRestart("txgrace.test._apps.webSocketSite", "/ws", 200)

    def test_twistedWebSocketsAcrossStop(self) -> None:
        """
        200 clients of Twisted's C{WebSocketResource} across SIGTERM.
        """
        needTwistedWebSockets()
        self.acrossStop("txgrace.test._apps.webSocketSite", "/ws", 200)

    def test_twistedWebSocketsOverTLSAcrossRestart(self) -> None:
        """
        Twisted's C{WebSocketResource} behind C{grace:ssl:}, across a HUP:
        the websocket is found below the TLS layer and the upgraded
        C{HTTPChannel}.
        """
        needTwistedWebSockets()
        self.acrossRestart(
            "txgrace.test._apps.webSocketSite", "/ws", 100,
            endpoint=self.tlsEndpoint(), tls=True,
        )

    def test_twistedWebSocketsOverTLSAcrossStop(self) -> None:
        """
        Twisted's C{WebSocketResource} behind C{grace:ssl:}, across SIGTERM.
        """
        needTwistedWebSockets()
        self.acrossStop(
            "txgrace.test._apps.webSocketSite", "/ws", 100,
            endpoint=self.tlsEndpoint(), tls=True,
        )

    def test_autobahnAcrossRestart(self) -> None:
        """
        Autobahn's C{WebSocketServerProtocol} as a plain factory, across a
        HUP.
        """
        needAutobahn()
        self.acrossRestart("txgrace.test._apps.autobahnFactory", "/", 200)

    def test_autobahnAcrossStop(self) -> None:
        """
        Autobahn's C{WebSocketServerProtocol} as a plain factory, across
        SIGTERM.
        """
        needAutobahn()
        self.acrossStop("txgrace.test._apps.autobahnFactory", "/", 200)

    def test_autobahnResourceAcrossRestart(self) -> None:
        """
        Autobahn served through C{twisted.web} (its C{WebSocketResource}
        takes the transport over from the C{HTTPChannel}), across a HUP.
        """
        needAutobahn()
        self.acrossRestart("txgrace.test._apps.autobahnSite", "/ws", 200)

    def test_autobahnResourceAcrossStop(self) -> None:
        """
        Autobahn served through C{twisted.web}, across SIGTERM.
        """
        needAutobahn()
        self.acrossStop("txgrace.test._apps.autobahnSite", "/ws", 200)

    def test_autobahnResourceOverTLSAcrossRestart(self) -> None:
        """
        Autobahn through C{twisted.web} behind C{grace:ssl:}, across a HUP:
        autobahn's protocol replaces the TLS layer's wrapped protocol.
        """
        needAutobahn()
        self.acrossRestart(
            "txgrace.test._apps.autobahnSite", "/ws", 100,
            endpoint=self.tlsEndpoint(), tls=True,
        )

    def test_autobahnResourceOverTLSAcrossStop(self) -> None:
        """
        Autobahn through C{twisted.web} behind C{grace:ssl:}, across
        SIGTERM.
        """
        needAutobahn()
        self.acrossStop(
            "txgrace.test._apps.autobahnSite", "/ws", 100,
            endpoint=self.tlsEndpoint(), tls=True,
        )

    def test_pacedReconnects(self) -> None:
        """
        With C{--drain-rate 200}, 500 clients across a HUP: the successor
        accepts no more than about 200 of their reconnections in any second
        (at most 1.5 times the rate), and the old process's drain takes about
        500 / 200 = 2.5 s (between 0.6 and 3 times that), as does the spread
        of the reconnections.  Bounds are generous: this is about behaviour
        (paced, neither a storm nor a crawl), not milliseconds.
        """
        needTwistedWebSockets()
        rate, count = 200, 500
        expected = count / rate
        server, first, port = self.serve(
            "txgrace.test._apps.webSocketSite", "--drain-rate", str(rate),
            "--hammer-timeout", "60",
        )
        clients, threads = startClients(port, "/ws", count)
        self.assertEqual({c.error for c in clients}, {None})
        os.kill(first, signal.SIGHUP)
        second = server.waitServing(2).pid
        joinAll(threads)
        self.assertEqual([c.error for c in clients if c.error], [])
        self.assertEqual(Counter(c.closeCode for c in clients), Counter({1001: count}))
        self.assertEqual(Counter(c.pids[1] for c in clients), Counter({second: count}))
        accepted = sorted(c.reconnectedAt for c in clients if c.reconnectedAt is not None)
        self.assertEqual(len(accepted), count)
        self.assertLessEqual(mostInAnySecond(accepted), 1.5 * rate, accepted)
        spread = accepted[-1] - accepted[0]
        self.assertGreater(spread, 0.6 * expected)
        self.assertLess(spread, 3 * expected)
        drained = server.waitFor(
            lambda e: e.get("log_namespace") == "txgrace.drain"
            and "opened" in e and "seconds" in e
        )
        self.assertGreaterEqual(drained["opened"], count)
        self.assertGreater(drained["seconds"], 0.6 * expected)
        self.assertLess(drained["seconds"], 3 * expected)
        self.assertEqual(drained["aborted"], 0)
        self.assertEqual(server.process.wait(60), 0)
        os.kill(second, signal.SIGTERM)
        self.assertTrue(waitUntil(lambda: not isAlive(second), 30))

    def test_unpacedDrainIsShort(self) -> None:
        """
        The other way round, so that the lower bound above means something:
        with C{--drain-rate 0} the same 500 are closed in far less than the
        paced drain's lower bound.  (The per-second count is not asserted
        here: how fast 500 client threads reconnect depends on the
        machine's load.)
        """
        needTwistedWebSockets()
        rate, count = 200, 500
        server, first, port = self.serve(
            "txgrace.test._apps.webSocketSite", "--drain-rate", "0"
        )
        clients, threads = startClients(port, "/ws", count)
        os.kill(first, signal.SIGHUP)
        server.waitServing(2)
        joinAll(threads)
        self.assertEqual([c.error for c in clients if c.error], [])
        self.assertEqual(
            Counter(c.closeCode for c in clients), Counter({1001: count})
        )
        drained = server.waitFor(
            lambda e: e.get("log_namespace") == "txgrace.drain" and "seconds" in e
        )
        self.assertLess(drained["seconds"], 0.6 * count / rate)
        self.assertEqual(server.process.wait(60), 0)
        server.signal(signal.SIGTERM)
        self.assertIsNone(server.wait(30))
