"""
L{txgrace.testing}'s HTTP clients read every framing HTTP/1.1 allows, byte
for byte, against real servers on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txgrace import testing
from txgrace.testing import (
    HTTPLoad,
    LoadResult,
    RequestFailed,
    ServerProcess,
    isAlive,
    slowRequest,
    waitUntil,
)

PIECES = [b"first piece, ", b"x" * 70000, b", from pid %d\n" % os.getpid()]


class Pieces(Resource):
    """
    Writes L{PIECES} one C{write} at a time, with no C{Content-Length}, so
    that twisted.web frames the response with C{Transfer-Encoding: chunked}.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        for piece in PIECES:
            request.write(piece)
        request.finish()
        return NOT_DONE_YET


class ChunkedFromTwistedTests(TestCase):
    """
    A chunked response from twisted.web, in this process's reactor.
    """

    def setUp(self) -> None:
        port = reactor.listenTCP(0, Site(Pieces()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    def test_isChunked(self) -> None:
        """
        The response really is chunked, so the other tests here read chunks.
        """

        def head() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += c.recv(65536)
            return data.split(b"\r\n\r\n", 1)[0]

        d = deferToThread(head)
        d.addCallback(lambda h: self.assertIn(b"\r\nTransfer-Encoding: chunked", h))
        return d

    def test_slowRequest(self) -> None:
        """
        L{slowRequest} returns the decoded body of a chunked response.
        """
        d = deferToThread(slowRequest, "127.0.0.1", self.port, "/", 10)
        d.addCallback(self.assertEqual, (200, b"".join(PIECES)))
        return d

    def test_keepAlive(self) -> None:
        """
        L{HTTPLoad}'s keep-alive client reads each chunked response to its
        end, so the next response on the same connection parses too.
        """

        def load() -> tuple[bool, LoadResult]:
            running = HTTPLoad("127.0.0.1", self.port, clients=1, maxRequests=3)
            running.start()
            done = waitUntil(lambda: running.result.ok + running.result.failed >= 3, 10)
            return done, running.stop()

        def check(outcome: tuple[bool, LoadResult]) -> None:
            done, result = outcome
            self.assertTrue(done)
            self.assertEqual(dict(result.failures), {})
            self.assertEqual(result.ok, 3)
            self.assertEqual(dict(result.pids), {os.getpid(): 3})

        return deferToThread(load).addCallback(check)

    @inlineCallbacks
    def test_sameBodyAsTreq(self) -> Deferred[None]:
        """
        treq, as the reference client, reads the same body as
        L{slowRequest} does.
        """
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        response = yield treq.get(f"http://127.0.0.1:{self.port}/", pool=pool)
        body = yield treq.content(response)
        status, ours = yield deferToThread(slowRequest, "127.0.0.1", self.port, "/", 10)
        self.assertEqual((status, ours), (response.code, body))


class GetTests(TestCase):
    """
    L{txgrace.testing.get}: one request with treq, in the reactor.
    """

    async def test_chunkedBodyAndPid(self) -> None:
        """
        The status, the whole (chunked) body, and the pid it names.
        """
        port = reactor.listenTCP(0, Site(Pieces()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = await testing.get(f"http://127.0.0.1:{port.getHost().port}/")
        self.assertEqual(
            response, testing.Response(200, b"".join(PIECES), os.getpid())
        )

    async def test_whichProcessServed(self) -> None:
        """
        Against a real server, C{pid} says which generation answered: the
        first, then its successor after a restart.
        """
        from txgrace.test.test_process import startServer
        from txgrace.test.test_restart import restart

        server, serving = startServer(self)
        url = f"http://127.0.0.1:{serving.port()}/"
        first = await testing.get(url)
        self.assertEqual((first.status, first.pid), (200, serving.pid))
        successor = await deferToThread(restart, server, serving)
        second = await testing.get(url)
        self.assertEqual((second.status, second.pid), (200, successor.pid))


def cannedServer(test: SynchronousTestCase, response: bytes) -> int:
    """
    A loopback server that reads one request, answers C{response} byte for
    byte, and closes.

    @return: Its port.
    """
    listening = socket.socket()
    test.addCleanup(listening.close)
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    listening.settimeout(10)

    def serve() -> None:
        connection, _ = listening.accept()
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                request += connection.recv(65536)
            connection.sendall(response)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    test.addCleanup(thread.join, 10)
    return listening.getsockname()[1]


class FramingTests(SynchronousTestCase):
    """
    L{slowRequest} against responses written byte for byte.
    """

    def request(self, response: bytes) -> tuple[int, bytes]:
        """
        L{slowRequest} to a server that answers C{response}.
        """
        return slowRequest("127.0.0.1", cannedServer(self, response), "/", 10)

    def failure(self, response: bytes) -> str:
        """
        How L{slowRequest} fails when the server answers C{response}.
        """
        return self.assertRaises(RequestFailed, self.request, response).kind

    def test_chunkExtensionsAndTrailers(self) -> None:
        """
        Chunk extensions are ignored, sizes are hexadecimal in either case,
        and trailers are skipped.
        """
        response = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n"
            b"A\r\n, 10 bytes\r\n"
            b"c\r\n and 12 more\r\n"
            b"0\r\nExpires: never\r\n\r\n"
        )
        self.assertEqual(self.request(response), (200, b"hello, 10 bytes and 12 more"))

    def test_contentLength(self) -> None:
        """
        A C{Content-Length} body is read to its length, even in pieces.
        """
        response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope"
        self.assertEqual(self.request(response), (404, b"nope"))

    def test_untilClose(self) -> None:
        """
        With neither length nor chunks, C{Connection: close} means the body
        runs to the end of the connection.
        """
        response = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
        self.assertEqual(self.request(response), (200, b"all of it"))

    def test_endInChunk(self) -> None:
        """
        A connection that ends inside a chunk is a C{partial} response.
        """
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort"
        self.assertEqual(self.failure(response), "partial")

    def test_endBeforeLastChunk(self) -> None:
        """
        A connection that ends after a whole chunk but before the last
        (empty) one is a C{partial} response.
        """
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"
        self.assertEqual(self.failure(response), "partial")

    def test_badChunkSize(self) -> None:
        """
        A chunk size that is not hexadecimal (C{int()} would take C{0x10},
        C{-1} or C{1_0}) is C{malformed}.
        """
        for size in (b"zz", b"0x10", b"-1", b"1_0", b""):
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            self.assertEqual(
                self.failure(head + size + b"\r\nabc\r\n0\r\n\r\n"), "malformed", size
            )

    def test_chunkWithoutCRLF(self) -> None:
        """
        A chunk whose data runs past its size is C{malformed}.
        """
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n"
        self.assertEqual(self.failure(response), "malformed")

    def test_nothing(self) -> None:
        """
        A connection closed before any byte of the response is
        C{eof_before_response}.
        """
        self.assertEqual(self.failure(b""), "eof_before_response")


class ServingPidTests(SynchronousTestCase):
    """
    L{ServerProcess.servingPid} follows the generations a server announces.
    """

    def server(self, *events: str) -> ServerProcess:
        """
        A L{ServerProcess} whose command prints C{events} (JSON lines) and
        exits.  Their pids are made up, so the test must not call
        L{ServerProcess.kill}, which would signal them.
        """
        script = "import sys\nfor line in sys.argv[1:]:\n    print(line)\n"
        process = ServerProcess([], command=[sys.executable, "-c", script, *events])
        self.addCleanup(lambda: self.assertTrue(process.close()))
        self.assertEqual(process.waitFirst(30), 0)
        self.assertTrue(waitUntil(lambda: process.eventCount() == len(events), 10))
        return process

    def test_newestGeneration(self) -> None:
        """
        The pid of the newest generation that announced it serves, from
        any C{txgrace.} namespace; events without a generation do not count.
        """
        process = self.server(
            '{"log_namespace": "txgrace.service", "addresses": "tcp:127.0.0.1:1",'
            ' "pid": 11, "generation": 1}',
            '{"log_namespace": "txgrace.lifecycle", "addresses": "tcp:127.0.0.1:1",'
            ' "pid": 22, "generation": 2}',
            '{"log_namespace": "txgrace.restart", "pid": 33}',
            '{"log_namespace": "other", "addresses": "tcp:127.0.0.1:1",'
            ' "pid": 44, "generation": 3}',
        )
        self.assertEqual([s.pid for s in process.serving()], [11, 22])
        self.assertEqual(process.servingPid(), 22)

    def test_master(self) -> None:
        """
        Once a master announced it serves, the master (the first process)
        serves, whatever its workers announce.
        """
        process = self.server(
            '{"log_namespace": "txgrace.service", "addresses": "tcp:127.0.0.1:1",'
            ' "pid": 11, "generation": 2}',
            '{"log_namespace": "txgrace.master", "addresses": "tcp:127.0.0.1:1",'
            ' "pid": 1, "pids": "11"}',
        )
        self.assertEqual(process.servingPid(), process.pid)

    def test_otherNamespace(self) -> None:
        """
        Pids logged from inside another pid namespace (the master as pid 1)
        name older processes here: L{ServerProcess.pids} leaves them out,
        so that L{ServerProcess.kill} never signals them.
        """
        process = self.server(
            '{"log_namespace": "txgrace.master", "addresses": "tcp:127.0.0.1:1",'
            ' "pid": 1, "pids": "2, 3"}',
        )
        self.assertEqual(process.pids(), {process.pid})

    def test_beforeAnyAnnouncement(self) -> None:
        """
        Before any announcement, the first process is the one to signal.
        """
        process = self.server()
        self.assertEqual(process.servingPid(), process.pid)


class FollowsGenerationsTests(TestCase):
    """
    L{ServerProcess.signal} and L{ServerProcess.wait} act on the process that
    serves, with real C{twist txgrace} processes.
    """

    def test_restartThenStop(self) -> None:
        """
        After a restart, C{signal(SIGTERM)} stops the successor, and
        C{wait()} returns once it has exited (with no status: it is not our
        child); C{waitFirst()} gives the first process's status.
        """
        from txgrace.test.test_process import startServer
        from txgrace.test.test_restart import restart

        server, serving = startServer(self)
        successor = restart(server, serving)
        self.assertEqual(server.servingPid(), successor.pid)
        self.assertEqual(server.waitFirst(), 0)
        server.signal(signal.SIGTERM)
        self.assertIsNone(server.wait())
        self.assertFalse(isAlive(successor.pid))


class ReaderTests(SynchronousTestCase):
    """
    L{ServerProcess} reads its processes' output in a thread that nothing
    else closes under it.
    """

    def test_killWhileReading(self) -> None:
        """
        L{ServerProcess.kill} while the reader thread is busy with a flood of
        output: the reader reaches the end of the output, nothing raises in
        it, and the output is closed.
        """
        errors: list[Any] = []
        self.patch(threading, "excepthook", errors.append)
        flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 4000 + '\\n')\n"
        for _ in range(20):
            server = ServerProcess([], command=[sys.executable, "-c", flood])
            self.assertTrue(waitUntil(lambda: len(server.lines) > 50, 30))
            server.kill()
            self.assertTrue(server.close())
            assert server.process.stdout is not None
            self.assertTrue(server.process.stdout.closed)
            self.assertIsNone(server.readError)
        self.assertEqual([e.exc_value for e in errors], [])

    def test_readErrorReported(self) -> None:
        """
        A reader thread that fails does not pass for the end of the output:
        L{ServerProcess.waitFor} and L{ServerProcess.close} raise, naming
        what went wrong.
        """
        server = ServerProcess([], command=[sys.executable, "-c", "print('{}')"])
        self.addCleanup(server.kill)
        self.assertTrue(server.close())
        server.readError = ValueError("the reader broke")
        error = self.assertRaises(AssertionError, server.waitFor, lambda e: False, 1)
        self.assertIn("reading the output failed: ValueError('the reader broke')", str(error))
        error = self.assertRaises(AssertionError, server.close)
        self.assertIn("the reader broke", str(error))
        server.readError = None
