"""
Helpers to test an application's restart behaviour for real: run it under
C{twist txgrace} on loopback, signal it, and load it with HTTP clients that
never retry and say exactly how each failed request failed.

These helpers block (they use threads and subprocesses); call them from
synchronous tests.  The exception is L{get}, an asynchronous request made
with treq, for tests that run in the reactor (C{async def} trial tests).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from twisted.web.iweb import IAgent


@dataclass(frozen=True)
class Serving:
    """
    A process announced that it is ready.

    @ivar pid: Its pid.
    @ivar generation: 1 for the first process, 2 for its successor, ...
    @ivar addresses: What it listens on, as C{("tcp", "127.0.0.1", 8080)} or
        C{("unix", "/path", None)}.
    """

    pid: int
    generation: int
    addresses: tuple[tuple[str, str, int | None], ...]

    def port(self, index: int = 0) -> int:
        """
        The TCP port of the C{index}th address.
        """
        port = self.addresses[index][2]
        assert port is not None
        return port


def _parseAddresses(text: str) -> tuple[tuple[str, str, int | None], ...]:
    parsed: list[tuple[str, str, int | None]] = []
    for item in text.split(", "):
        kind, _, rest = item.partition(":")
        if kind == "unix":
            parsed.append((kind, rest, None))
        else:
            host, _, port = rest.rpartition(":")
            parsed.append((kind, host.strip("[]"), int(port)))
    return tuple(parsed)


def _isServing(event: dict[str, Any]) -> bool:
    """
    Whether C{event} is a C{Serving ... with pid N (generation G)}
    announcement, from whichever C{txgrace} module logs it.
    """
    return (
        str(event.get("log_namespace", "")).startswith("txgrace.")
        and "addresses" in event
        and isinstance(event.get("pid"), int)
        and isinstance(event.get("generation"), int)
    )


def _isMaster(event: dict[str, Any]) -> bool:
    """
    Whether C{event} is a master's C{Master pid N serving ...} announcement:
    addresses and the workers' pids, but no generation.
    """
    return (
        str(event.get("log_namespace", "")).startswith("txgrace.")
        and "addresses" in event
        and "pids" in event
        and "generation" not in event
    )


def _serving(event: dict[str, Any]) -> Serving:
    return Serving(
        event["pid"], event["generation"], _parseAddresses(event["addresses"])
    )


class ServerProcess:
    """
    An application under C{python -m twisted --log-format json txgrace ...}
    (or C{command}, which must log JSON to stdout) and every successor it
    starts; they all share one stdout, read here as log events.  C{passFDs}
    are descriptors the first process inherits.

    @ivar events: Every JSON log event so far, from every generation.
    @ivar lines: Every other line written to stdout or stderr.
    @ivar readError: What went wrong in the thread that reads the output,
        or L{None}.  L{waitFor} reports it, and L{close} raises it.
    """

    def __init__(
        self,
        arguments: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        twistArguments: Sequence[str] = (),
        command: Sequence[str] | None = None,
        passFDs: Sequence[int] = (),
    ) -> None:
        self.arguments = list(arguments)
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.readError: BaseException | None = None
        self._condition = threading.Condition()
        environment = dict(os.environ if env is None else env)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        if command is None:
            command = [
                sys.executable,
                "-m",
                "twisted",
                "--log-format",
                "json",
                *twistArguments,
                "txgrace",
                *self.arguments,
            ]
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=cwd,
            pass_fds=tuple(passFDs),
        )
        self._startTime = _startTime(self.process.pid)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """
        Read the output until its end, in the reader thread, which alone
        reads and closes it: closing a file while another thread reads it
        makes that read fail (C{ValueError}), and a reader that died that
        way would hide every later event.
        """
        output = self.process.stdout
        assert output is not None
        try:
            for raw in output:
                line = raw.decode("utf-8", "replace").strip("\x1e\n")
                with self._condition:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        self.lines.append(line)
                    else:
                        if isinstance(event, dict):
                            self.events.append(event)
                        else:
                            self.lines.append(line)
                    self._condition.notify_all()
        except BaseException as e:
            self.readError = e
        finally:
            output.close()
            with self._condition:
                self._condition.notify_all()

    @property
    def pid(self) -> int:
        """
        The pid of the first process.
        """
        return self.process.pid

    def messages(self) -> list[str]:
        """
        Every log event formatted as text, then every other line.
        """
        from twisted.logger import formatEvent

        with self._condition:
            events = list(self.events)
            lines = list(self.lines)
        return [formatEvent(event) for event in events] + lines

    def waitFor(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        since: int = 0,
    ) -> dict[str, Any]:
        """
        Wait for a log event that satisfies C{predicate}, among the events
        from index C{since} on (see L{eventCount}).

        @raise AssertionError: If none comes within C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        with self._condition:
            seen = since
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not self._reader.is_alive() and seen == len(self.events):
                    break
                self._condition.wait(min(remaining, 0.5))
        if self.readError is not None:
            raise AssertionError(
                "reading the output failed: %r" % (self.readError,)
            ) from self.readError
        raise AssertionError(
            "no matching log event within %ss; output:\n%s"
            % (
                timeout,
                "\n".join(
                    m for m in self.messages() if not m.startswith('"')
                )[-6000:],
            )
        )

    def waitForMessage(
        self, pattern: str, timeout: float = 30.0, since: int = 0
    ) -> dict[str, Any]:
        """
        Wait for a log event whose text matches the regular expression
        C{pattern}.
        """
        from twisted.logger import formatEvent

        compiled = re.compile(pattern)
        return self.waitFor(
            lambda e: bool(compiled.search(formatEvent(e))), timeout, since
        )

    def eventCount(self) -> int:
        """
        How many log events have been read so far.
        """
        with self._condition:
            return len(self.events)

    def serving(self) -> list[Serving]:
        """
        Every C{Serving ... with pid N (generation G)} announcement so far,
        oldest first.
        """
        with self._condition:
            events = list(self.events)
        return [_serving(e) for e in events if _isServing(e)]

    def waitServing(self, generation: int = 1, timeout: float = 30.0) -> Serving:
        """
        Wait until generation C{generation} is ready.
        """
        event = self.waitFor(
            lambda e: _isServing(e) and e["generation"] == generation, timeout
        )
        return _serving(event)

    def servingPid(self) -> int:
        """
        The pid of the process that serves now: the newest generation that
        announced it is ready, or the first process before any announcement.
        In master mode (C{--workers}) the master keeps its pid for its whole
        life, and that is the first process.
        """
        with self._condition:
            events = list(self.events)
        if any(_isMaster(e) for e in events):
            return self.process.pid
        announced = [_serving(e) for e in events if _isServing(e)]
        if not announced:
            return self.process.pid
        return max(announced, key=lambda s: s.generation).pid

    def pids(self) -> set[int]:
        """
        Every pid this server has had: the first process, every successor it
        announced or started.  A pid that a live process older than the
        first one holds is left out: it was logged from another pid
        namespace (a server under C{unshare --pid}) and names someone else.
        """
        with self._condition:
            events = list(self.events)
        pids = {self.process.pid}
        for event in events:
            for key in ("pid", "successor"):
                value = event.get(key)
                if isinstance(value, int) and event.get("log_namespace", "").startswith(
                    "txgrace."
                ):
                    pids.add(value)
        first = self._startTime
        if first is None:
            return pids
        return {p for p in pids if (_startTime(p) or first) >= first}

    def signal(self, signum: int, pid: int | None = None) -> None:
        """
        Send C{signum} to C{pid} (default: the process that serves now, see
        L{servingPid}).
        """
        os.kill(self.servingPid() if pid is None else pid, signum)

    def wait(self, timeout: float = 30.0) -> int | None:
        """
        Wait for the process that serves now (see L{servingPid}) to exit.

        @return: Its exit status (negative for a signal) if it is the first
            process; L{None} if it is a successor, which is not our child,
            so its status cannot be known.
        @raise subprocess.TimeoutExpired: If it is still alive after
            C{timeout} seconds.
        """
        pid = self.servingPid()
        if pid == self.process.pid:
            return self.waitFirst(timeout)
        if not waitUntil(lambda: not isAlive(pid), timeout):
            raise subprocess.TimeoutExpired([str(pid)], timeout)
        return None

    def waitFirst(self, timeout: float = 30.0) -> int:
        """
        Wait for the first process to exit, whichever process serves.

        @return: Its exit status (negative for a signal).
        @raise subprocess.TimeoutExpired: If it is still alive after
            C{timeout} seconds.
        """
        return self.process.wait(timeout)

    def kill(self) -> None:
        """
        SIGKILL every process of this server that is still alive, by pid,
        then let the reader finish the output (see L{close}).

        @raise AssertionError: If a process outlives SIGKILL, or if reading
            the output failed.
        """
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.pids() - {self.process.pid}:
            if isAlive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not waitUntil(lambda: not any(isAlive(p) for p in self.pids()), 10.0):
            raise AssertionError(
                "still alive after SIGKILL: %r" % [p for p in self.pids() if isAlive(p)]
            )
        self.close()

    def close(self, timeout: float = 10.0) -> bool:
        """
        Wait up to C{timeout} seconds for the reader thread to read the
        output to its end (every process that writes it has exited), which
        closes it.  The output is never closed from here: the reader
        thread may be reading it.

        @return: Whether the output is closed; if not, a process still
            holds it, and the reader closes it once that process is gone.
        @raise AssertionError: If reading the output failed.
        """
        self._reader.join(timeout)
        if self.readError is not None:
            raise AssertionError(
                "reading the output failed: %r" % (self.readError,)
            ) from self.readError
        return not self._reader.is_alive()


def _startTime(pid: int) -> int | None:
    """
    When C{pid} started, in clock ticks since boot, or L{None} if it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def isAlive(pid: int) -> bool:
    """
    Whether C{pid} is a live process (not a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def waitUntil(condition: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    """
    Poll C{condition} until it holds or C{timeout} seconds pass.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return condition()


def openFDs(pid: int) -> int:
    """
    How many descriptors C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


# Load


class RequestFailed(Exception):
    """
    A request got no complete response.

    @ivar kind: How it failed, one of the kinds of L{LoadResult.failures}.
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


_PID = re.compile(rb"pid (\d+)")
_HEX = re.compile(rb"[0-9A-Fa-f]+")


class _Reader:
    """
    Reads an HTTP/1.1 response from a socket, byte-exactly: an EOF or a
    reset says where it came.
    """

    def __init__(self, skt: socket.socket) -> None:
        self._socket = skt
        self._pending = b""
        self.received = 0

    def _fill(self) -> None:
        chunk = self._socket.recv(65536)
        if not chunk:
            raise EOFError()
        self.received += len(chunk)
        self._pending += chunk

    def until(self, delimiter: bytes) -> bytes:
        """
        Everything up to C{delimiter}, which is consumed too.
        """
        while delimiter not in self._pending:
            self._fill()
        data, _, self._pending = self._pending.partition(delimiter)
        return data

    def exactly(self, length: int) -> bytes:
        """
        The next C{length} bytes.
        """
        while len(self._pending) < length:
            self._fill()
        data, self._pending = self._pending[:length], self._pending[length:]
        return data

    def rest(self) -> bytes:
        """
        Everything until the peer closes.
        """
        try:
            while True:
                self._fill()
        except EOFError:
            pass
        data, self._pending = self._pending, b""
        return data


def _readChunked(reader: _Reader) -> bytes:
    """
    A C{Transfer-Encoding: chunked} body, trailers skipped.

    @raise RequestFailed: C{malformed} if a chunk size is not hexadecimal or a
        chunk does not end with CRLF.
    """
    body = b""
    while True:
        sizeLine = reader.until(b"\r\n").split(b";", 1)[0].strip()
        if _HEX.fullmatch(sizeLine) is None:
            raise RequestFailed("malformed")
        size = int(sizeLine, 16)
        if size == 0:
            while reader.until(b"\r\n"):
                pass
            return body
        body += reader.exactly(size)
        if reader.exactly(2) != b"\r\n":
            raise RequestFailed("malformed")


def _readResponse(
    skt: socket.socket, reused: bool, reader: _Reader | None = None
) -> tuple[int, bytes, bool]:
    """
    Read one HTTP/1.1 response, framed by C{Content-Length}, by
    C{Transfer-Encoding: chunked}, or by the end of the connection.

    @param reader: The reader of C{skt} to read with, which keeps what it
        read past this response (pipelined responses); by default a new one.
    @return: status, body, and whether the server will close the connection.
    @raise RequestFailed: Saying how it failed.
    """
    if reader is None:
        reader = _Reader(skt)
    reader.received = 0
    try:
        head = reader.until(b"\r\n\r\n")
    except EOFError:
        if reader.received:
            raise RequestFailed("partial") from None
        raise RequestFailed("keepalive_race" if reused else "eof_before_response") from None
    except ConnectionResetError:
        raise RequestFailed(
            "keepalive_race" if reused and not reader.received else "reset"
        ) from None
    except socket.timeout:
        raise RequestFailed("timeout") from None
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise RequestFailed("malformed") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    close = headers.get(b"connection", b"").lower() == b"close"
    try:
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = _readChunked(reader)
        elif b"content-length" in headers:
            try:
                length = int(headers[b"content-length"])
            except ValueError:
                raise RequestFailed("malformed") from None
            body = reader.exactly(length)
        elif close and status not in (204, 304) and not 100 <= status < 200:
            body = reader.rest()
        else:
            body = b""
    except EOFError:
        raise RequestFailed("partial") from None
    except ConnectionResetError:
        raise RequestFailed("reset") from None
    except socket.timeout:
        raise RequestFailed("timeout") from None
    return status, body, close


@dataclass
class LoadResult:
    """
    What an L{HTTPLoad} saw.

    @ivar ok: Requests answered with status 200.
    @ivar failures: Failed requests by kind: C{refused}, C{reset},
        C{eof_before_response}, C{keepalive_race}, C{partial}, C{timeout},
        C{malformed} (a response that is not valid HTTP/1.1 framing),
        C{bad_status}.
    @ivar pids: How many requests each pid answered.
    @ivar closedByServer: How often a keep-alive client's connection was
        ended by the server after a response (C{Connection: close}).
    """

    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    pids: Counter[int] = field(default_factory=Counter)
    firstResponseAfter: dict[int, float] = field(default_factory=dict)
    closedByServer: int = 0

    @property
    def failed(self) -> int:
        """
        How many requests failed, of any kind.
        """
        return sum(self.failures.values())


class HTTPLoad:
    """
    Closed-loop HTTP/1.1 clients on a loopback port: half open a new
    connection per request, half keep one alive.  They never retry.  Each
    client stops after C{maxRequests} requests or when L{stop} is called, and
    each socket operation times out after C{timeout} seconds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        clients: int = 8,
        path: str = "/",
        maxRequests: int = 100_000,
        timeout: float = 10.0,
    ) -> None:
        self._address = (host, port)
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode("ascii")
        )
        self._maxRequests = maxRequests
        self._timeout = timeout
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.result = LoadResult()
        self._threads = [
            threading.Thread(target=self._client, args=(i % 2 == 0,), daemon=True)
            for i in range(clients)
        ]

    def start(self) -> HTTPLoad:
        """
        Start the clients.
        """
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> LoadResult:
        """
        Stop the clients and wait for them.
        """
        self._stopping.set()
        for thread in self._threads:
            thread.join(self._timeout + 5)
        return self.result

    def _count(self, status: int | None, body: bytes, kind: str | None) -> None:
        with self._lock:
            if kind is not None:
                self.result.failures[kind] += 1
            elif status != 200:
                self.result.failures["bad_status"] += 1
            else:
                self.result.ok += 1
                match = _PID.search(body)
                if match:
                    pid = int(match.group(1))
                    if pid not in self.result.firstResponseAfter:
                        self.result.firstResponseAfter[pid] = time.monotonic()
                    self.result.pids[pid] += 1

    def _connect(self) -> socket.socket:
        skt = socket.create_connection(self._address, timeout=self._timeout)
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return skt

    def _client(self, keepAlive: bool) -> None:
        skt: socket.socket | None = None
        reused = False
        for _ in range(self._maxRequests):
            if self._stopping.is_set():
                break
            try:
                if skt is None:
                    try:
                        skt = self._connect()
                    except ConnectionRefusedError:
                        raise RequestFailed("refused") from None
                    except socket.timeout:
                        raise RequestFailed("timeout") from None
                    reused = False
                try:
                    skt.sendall(self._request)
                except (BrokenPipeError, ConnectionResetError):
                    raise RequestFailed("keepalive_race" if reused else "reset") from None
                status, body, close = _readResponse(skt, reused)
                self._count(status, body, None)
                if close and keepAlive:
                    with self._lock:
                        self.result.closedByServer += 1
                if close or not keepAlive:
                    skt.close()
                    skt = None
                else:
                    reused = True
            except RequestFailed as failure:
                self._count(None, b"", failure.kind)
                if skt is not None:
                    skt.close()
                skt = None
        if skt is not None:
            skt.close()


class PacedClient:
    """
    One HTTP/1.1 client that connects at once and sends a GET every
    C{interval} seconds on the same connection, the first after
    C{firstAfter} seconds (default: C{interval}); it opens a new connection
    only when the server ended the last one.  It stops after C{count}
    requests or when L{stop} is called.

    @ivar pids: The pid that answered each request, in order.
    @ivar failures: How each failed request failed (L{RequestFailed} kinds).
    @ivar localPorts: The local port of each connection it opened, in
        order: one entry when the server never ended its connection.
    @ivar closes: Responses that said C{Connection: close}.
    """

    def __init__(
        self,
        host: str,
        port: int,
        interval: float,
        firstAfter: float | None = None,
        count: int = 10_000,
        path: str = "/",
        timeout: float = 10.0,
        context: Any = None,
    ) -> None:
        self._address = (host, port)
        self._interval = interval
        self._firstAfter = interval if firstAfter is None else firstAfter
        self._count = count
        self._timeout = timeout
        self._context = context
        self._request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")
        self._stopping = threading.Event()
        self.pids: list[int] = []
        self.failures: list[str] = []
        self.localPorts: list[int] = []
        self.closes = 0
        self._socket: socket.socket | None = self._connect()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> socket.socket:
        skt = socket.create_connection(self._address, timeout=self._timeout)
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.localPorts.append(skt.getsockname()[1])
        if self._context is not None:
            skt = self._context.wrap_socket(skt)
        return skt

    def start(self) -> PacedClient:
        """
        Start sending.
        """
        self._thread.start()
        return self

    def wait(self, timeout: float = 60.0) -> bool:
        """
        Wait until it has sent all C{count} requests.

        @return: Whether it has.
        """
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> PacedClient:
        """
        Stop (after the request in flight, if any) and close the connection.
        """
        self._stopping.set()
        self._thread.join(self._timeout + 5)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        return self

    def _run(self) -> None:
        delay = self._firstAfter
        for _ in range(self._count):
            if self._stopping.wait(delay):
                return
            delay = self._interval
            reused = True
            try:
                if self._socket is None:
                    try:
                        self._socket = self._connect()
                    except ConnectionRefusedError:
                        raise RequestFailed("refused") from None
                    reused = False
                try:
                    self._socket.sendall(self._request)
                except (BrokenPipeError, ConnectionResetError):
                    raise RequestFailed("keepalive_race" if reused else "reset") from None
                status, body, close = _readResponse(self._socket, reused)
                match = _PID.search(body)
                if status != 200 or match is None:
                    raise RequestFailed("bad_status")
                self.pids.append(int(match.group(1)))
                if close:
                    self.closes += 1
                    self._socket.close()
                    self._socket = None
            except (RequestFailed, OSError) as failure:
                kind = failure.kind if isinstance(failure, RequestFailed) else type(failure).__name__
                self.failures.append(kind)
                if self._socket is not None:
                    self._socket.close()
                self._socket = None

@dataclass(frozen=True)
class Response:
    """
    What L{get} received.

    @ivar status: The status code.
    @ivar body: The whole body.
    @ivar pid: The pid the body names (C{"... pid N ..."}, as the demo and
        the test apps answer), or L{None}: which process served.
    """

    status: int
    body: bytes
    pid: int | None


async def get(
    url: str, timeout: float = 10.0, agent: IAgent | None = None
) -> Response:
    """
    GET C{url} with treq, on a connection of its own that is closed
    afterwards (a kept-alive connection would pin later requests to the
    process that accepted it first), and read the whole body.

    @param agent: The L{IAgent} to send it with, such as one that connects
        through a UNIX or TLS client endpoint; by default an L{Agent} with
        no persistent connections.
    @raise twisted.internet.defer.CancelledError: If no response came
        within C{timeout} seconds.
    """
    # Imported here: importing treq imports twisted.internet.endpoints,
    # which reads and deletes LISTEN_FDS, and this module may be imported
    # by a process that has sockets to inherit.
    import treq
    from treq.client import HTTPClient
    from twisted.internet import reactor
    from twisted.web.client import Agent, HTTPConnectionPool

    if agent is None:
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = await HTTPClient(agent).get(url, timeout=timeout)
    body = await treq.content(response)
    match = _PID.search(body)
    return Response(response.code, body, int(match.group(1)) if match else None)


def slowRequest(host: str, port: int, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
    """
    One request on its own connection, blocking until the response is
    complete.

    @return: Status and body.
    @raise RequestFailed: If no complete response came.
    @raise OSError: If the connection could not be made.
    """
    with socket.create_connection((host, port), timeout=timeout) as skt:
        skt.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii"))
        status, body, _ = _readResponse(skt, False)
    return status, body


def writeSelfSignedCertificate(directory: str) -> tuple[str, str]:
    """
    Write a fresh self-signed certificate for C{localhost} and 127.0.0.1 and
    its key into C{directory}.

    @return: The paths of the key and of the certificate, both PEM.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    keyPath = os.path.join(directory, "key.pem")
    certPath = os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with open(certPath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath
