"""
The drain with real processes: HTTP/2 GOAWAY with a real HTTP/2 client, an
L{IDrainable} long-lived protocol (the demo's ticker), the listen backlog on a
final stop, and the access log during a drain.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.testing import writeSelfSignedCertificate
from txgrace.test.test_install import _sourceTree
from txgrace.test.test_process import _Background, startServer
from txgrace.testing import ServerProcess, isAlive, waitUntil


def _h2Exchange(port: int, server: ServerProcess) -> dict[str, Any]:
    """
    Open an HTTP/2 connection over TLS, start a 1.5 s request on stream 1,
    SIGTERM the server once the request is in, and read until the
    connection closes.

    @return: What the client saw: the GOAWAY's error code and last stream
        id, stream 1's status and body, and whether stream 1 ended after
        the GOAWAY.
    """
    import h2.config
    import h2.connection
    import hpack
    from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(
            1,
            [
                (":method", "GET"),
                (":path", "/sleep?duration=1.5"),
                (":scheme", "https"),
                (":authority", "localhost"),
            ],
            end_stream=True,
        )
        tls.sendall(conn.data_to_send())
        server.waitForMessage("sleeping 1.5")
        server.signal(signal.SIGTERM)
        # Read the server's frames off the wire: h2's own client state machine
        # stops at the first GOAWAY, which RFC 9113 does not ask of clients.
        seen: dict[str, Any] = {"body": b""}
        decoder = hpack.Decoder()
        buffer = b""
        while True:
            data = tls.recv(65536)
            if not data:
                break
            buffer += data
            while len(buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                if len(buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(buffer[9 : 9 + length]))
                buffer = buffer[9 + length :]
                if isinstance(frame, GoAwayFrame):
                    seen["goaway"] = (frame.error_code, frame.last_stream_id)
                elif isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                    seen["status"] = dict(decoder.decode(frame.data))[":status"]
                elif isinstance(frame, DataFrame) and frame.stream_id == 1:
                    seen["body"] += frame.data
                if frame.stream_id == 1 and "END_STREAM" in frame.flags:
                    seen["ended"] = "goaway" in seen
    return seen


class HTTP2DrainTests(TestCase):
    """
    HTTP/2 connections get a GOAWAY and their open streams finish.
    """

    def test_goAwayAndStreamCompletes(self) -> None:
        """
        A real HTTP/2 client with a stream in flight when SIGTERM arrives
        sees GOAWAY(NO_ERROR, last stream 1), then the whole response.
        """
        try:
            import h2  # noqa: F401
        except ImportError:
            raise SkipTest("h2 is not installed")
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        key, cert = writeSelfSignedCertificate(directory)
        server, serving = startServer(
            self,
            "--endpoint",
            f"grace:ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}",
        )
        self.assertEqual(serving.addresses[0][0], "ssl")
        seen = _h2Exchange(serving.port(), server)
        self.assertEqual(seen.get("goaway"), (0, 1))
        self.assertEqual(seen.get("status"), "200")
        self.assertTrue(seen.get("ended"))
        self.assertIn(f"from pid {serving.pid}".encode(), seen["body"])
        self.assertEqual(server.wait(), 0)


class DrainableTests(TestCase):
    """
    The demo's ticker provides L{IDrainable}: a restart tells it to go.
    """

    def test_tickerSaysGoodbye(self) -> None:
        """
        On a restart the old process's ticker connection is told the server
        is going away and closed; a new connection ticks from the new pid.
        """
        source = _sourceTree()
        server, serving = startServer(
            self, "--app", "demo.ticker.factory", cwd=source
        )
        with socket.create_connection(("127.0.0.1", serving.port()), timeout=30) as c:
            reader = c.makefile("rb")
            self.assertIn(f"from pid {serving.pid}".encode(), reader.readline())
            server.signal(signal.SIGHUP)
            successor = server.waitServing(2)
            rest = reader.read()
        self.assertIn(f"going away: pid {serving.pid} is draining".encode(), rest)
        self.assertTrue(waitUntil(lambda: not isAlive(serving.pid), 30))
        with socket.create_connection(("127.0.0.1", serving.port()), timeout=30) as c:
            line = c.makefile("rb").readline()
        self.assertIn(f"from pid {successor.pid}".encode(), line)


class BacklogTests(TestCase):
    """
    On a final stop, connections already queued in the listen backlog are
    accepted and served, not reset.
    """

    def test_queuedConnectionsServed(self) -> None:
        """
        With the server stopped (SIGSTOP), 20 clients connect (the kernel
        queues them) and send a request; SIGTERM then SIGCONT: every one gets
        a full 200 response.
        """
        server, serving = startServer(self)
        clients = []
        server.signal(signal.SIGSTOP)
        try:
            for _ in range(20):
                c = socket.create_connection(("127.0.0.1", serving.port()), timeout=30)
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                clients.append(c)
            server.signal(signal.SIGTERM)
        finally:
            server.signal(signal.SIGCONT)
        answers = []
        for c in clients:
            with c:
                data = b""
                while True:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                answers.append(data)
        for data in answers:
            self.assertTrue(data.startswith(b"HTTP/1.1 200"), data)
            self.assertIn(f"hello from pid {serving.pid}".encode(), data)
        self.assertEqual(server.wait(), 0)


class AccessLogTests(TestCase):
    """
    A request that finishes during the drain is still in the access log.
    """

    def test_drainedRequestLogged(self) -> None:
        """
        The slow request finishing after SIGTERM is written to the Site's
        log.
        """
        server, serving = startServer(self)
        slow = _Background(
            lambda: __import__("txgrace.testing").testing.slowRequest(
                "127.0.0.1", serving.port(), "/sleep?duration=1"
            )
        )
        server.waitForMessage("sleeping 1")
        server.signal(signal.SIGTERM)
        server.waitForMessage("Draining 1 connections")
        self.assertEqual(slow.join()[0], 200)
        self.assertEqual(server.wait(), 0)
        server.waitForMessage(r'"GET /sleep\?duration=1 HTTP/1.1" 200')
