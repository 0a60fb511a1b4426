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

MAX_STREAM_ID = 2**31 - 1


def _h2Connect(port: int) -> tuple[ssl.SSLSocket, Any]:
    """
    An HTTP/2 connection over TLS to 127.0.0.1:C{port}, and an h2 client
    connection (used only to write frames: its state machine stops at the
    first GOAWAY, which RFC 9113 does not ask of clients, so the server's
    frames are read with L{_FrameReader}).
    """
    import h2.config
    import h2.connection

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "h2"
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return tls, conn


def _get(conn: Any, streamID: int, path: str) -> None:
    conn.send_headers(
        streamID,
        [
            (":method", "GET"),
            (":path", path),
            (":scheme", "https"),
            (":authority", "localhost"),
        ],
        end_stream=True,
    )


class _FrameReader:
    """
    Reads HTTP/2 frames off a socket, noting every GOAWAY and each stream's
    status, body and end.
    """

    def __init__(self, tls: ssl.SSLSocket) -> None:
        import hpack

        self.tls = tls
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.goAways: list[tuple[int, int]] = []
        self.status: dict[int, str] = {}
        self.body: dict[int, bytes] = {}
        self.ended: set[int] = set()

    def next(self) -> Any:
        """
        The next frame, or L{None} at EOF.
        """
        from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame

        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    self.buffer = self.buffer[9 + length :]
                    break
            data = self.tls.recv(65536)
            if not data:
                return None
            self.buffer += data
        if isinstance(frame, GoAwayFrame):
            self.goAways.append((frame.error_code, frame.last_stream_id))
        elif isinstance(frame, HeadersFrame):
            headers = dict(self.decoder.decode(frame.data))
            self.status[frame.stream_id] = headers[":status"]
        elif isinstance(frame, DataFrame):
            self.body[frame.stream_id] = self.body.get(frame.stream_id, b"") + frame.data
        if "END_STREAM" in frame.flags:
            self.ended.add(frame.stream_id)
        return frame

    def untilEOF(self) -> None:
        """
        Read every frame until the server closes the connection.
        """
        while self.next() is not None:
            pass


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
                    seen.setdefault("goaways", []).append(
                        (frame.error_code, frame.last_stream_id)
                    )
                    seen["goaway"] = seen["goaways"][0]
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
        sees GOAWAY(NO_ERROR, largest stream id), then, after the grace
        window, GOAWAY(NO_ERROR, last stream 1), then the whole response.
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
        self.assertEqual(seen.get("goaways"), [(0, MAX_STREAM_ID), (0, 1)])
        self.assertEqual(seen.get("status"), "200")
        self.assertTrue(seen.get("ended"))
        self.assertIn(f"from pid {serving.pid}".encode(), seen["body"])
        self.assertEqual(server.wait(), 0)


    def test_streamSentAfterGoAwayServed(self) -> None:
        """
        A client whose connection is idle when SIGTERM arrives, and that
        opens a stream right after the server sends its first GOAWAY (as a
        client does that has not read it yet), gets that stream answered in
        full; the second GOAWAY names it as the last stream, and then the
        server closes the connection and exits.
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
        tls, conn = _h2Connect(serving.port())
        with tls:
            reader = _FrameReader(tls)
            _get(conn, 1, "/")
            tls.sendall(conn.data_to_send())
            while 1 not in reader.ended:
                self.assertIsNotNone(reader.next())
            server.signal(signal.SIGTERM)
            while not reader.goAways:
                self.assertIsNotNone(reader.next())
            _get(conn, 3, "/")
            tls.sendall(conn.data_to_send())
            reader.untilEOF()
        self.assertEqual(reader.goAways, [(0, MAX_STREAM_ID), (0, 3)])
        self.assertEqual(reader.status.get(3), "200")
        self.assertIn(3, reader.ended)
        self.assertIn(f"hello from pid {serving.pid}".encode(), reader.body[3])
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
