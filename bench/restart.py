#!/usr/bin/env python3
"""
Benchmark zero-downtime restarts of the gracedemo under C{twist txgrace}.

Run it from the repository root (so that C{demo} is importable) with the
virtualenv's python:

    .venv/bin/python bench/restart.py [--restarts 50] [--json out.json]

What it does, in one run:

  1. Starts C{twist --log-format json txgrace --endpoint
     grace:tcp:0:interface=127.0.0.1 --app demo.gracedemo.site}, logging to
     a file that a thread tails (so a server never blocks on its log).
  2. Without load, alternately: C{--cold-starts} cold starts of the same
     command (fresh, on a port of its own: spawn -> first successful
     response) and C{--quiet-restarts} restarts seen by a light probe.
  3. Loads the server with closed-loop asyncio clients in this process (half
     keep-alive, half a new connection per request; no retries; every socket
     operation bounded by a timeout; C{Connection: close} honoured) and
     restarts it with SIGHUP C{--restarts} times: each time it waits for the
     successor's C{Serving} event and for the old pid to exit (pidfd), then
     pauses.  Every C{--slow-every}th restart a C{/sleep/} request is started
     on the old pid just before the signal; it must complete with status
     200.  After every C{--loaded-cold-every}th restart, a cold start under
     the same load.
  4. Prints failed requests by kind, the pids that served, per-restart
     timings (from the old process's log, the successor's log, the clients
     and pidfd) and a summary; C{--json FILE} writes everything.

handover overhead = median(SIGHUP -> first response by the new pid)
                    - median(cold start, idle)

On a small machine the load competes with the successor's start-up for the
CPUs, and other processes add noise that drifts: the summary also gives the
cold start under the same load, restart-minus-cold-start pairs taken back to
back, and "txgrace's part" (everything but the successor's Python start-up
and imports), with the CPU share of other processes during the run.

It prints figures; it is not a test.  Only 127.0.0.1 is used, and only the
processes this benchmark started are signalled, by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from _common import ROOT as REPO
from _common import machineInfo

from txgrace.testing import isAlive  # noqa: E402

HOST = "127.0.0.1"
APP = "demo.gracedemo.site"
KINDS = (
    "refused",
    "reset",
    "eof_before_response",
    "keepalive_race",
    "partial",
    "timeout",
    "bad_status",
)
_PID = re.compile(rb"from pid (\d+)")


# ---------------------------------------------------------------------------
# The asyncio load generator


class _Failed(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


def _chunkedBody(data: bytes) -> bytes | None:
    """
    Decode a complete chunked body, or return None if more is needed.
    """
    body = b""
    position = 0
    while True:
        end = data.find(b"\r\n", position)
        if end < 0:
            return None
        size = int(data[position:end].split(b";")[0].strip() or b"0", 16)
        position = end + 2
        if size == 0:
            # Trailers end with an empty line.
            if data.find(b"\r\n", position) == position:
                return body
            if data.find(b"\r\n\r\n", position) >= 0:
                return body
            return None
        if len(data) < position + size + 2:
            return None
        body += data[position : position + size]
        position += size + 2


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    @property
    def close(self) -> bool:
        return self.headers.get(b"connection", b"").lower() == b"close"


async def readResponse(
    reader: asyncio.StreamReader, reused: bool, timeout: float
) -> Response:
    """
    Read one HTTP/1.1 response (Content-Length, chunked, or until EOF).

    @raise _Failed: Saying exactly how it failed.
    """
    data = b""
    head: tuple[int, dict[bytes, bytes]] | None = None
    bodyStart = 0
    try:
        while True:
            if head is None:
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    lines = data[:end].split(b"\r\n")
                    status = int(lines[0].split()[1])
                    headers: dict[bytes, bytes] = {}
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        headers[name.strip().lower()] = value.strip()
                    head = (status, headers)
                    bodyStart = end + 4
            if head is not None:
                status, headers = head
                rest = data[bodyStart:]
                if b"content-length" in headers:
                    length = int(headers[b"content-length"])
                    if len(rest) >= length:
                        return Response(status, headers, rest[:length])
                elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    body = _chunkedBody(rest)
                    if body is not None:
                        return Response(status, headers, body)
                elif status in (204, 304):
                    return Response(status, headers, b"")
            async with asyncio.timeout(timeout):
                chunk = await reader.read(65536)
            if not chunk:
                if not data:
                    raise _Failed(
                        "keepalive_race" if reused else "eof_before_response", "EOF"
                    )
                if head is not None and not (
                    b"content-length" in head[1]
                    or b"transfer-encoding" in head[1]
                ):
                    return Response(head[0], head[1], data[bodyStart:])
                raise _Failed("partial", f"EOF after {len(data)} bytes")
            data += chunk
    except (ConnectionResetError, BrokenPipeError) as e:
        if data:
            raise _Failed("partial", f"{type(e).__name__} after {len(data)} bytes")
        raise _Failed("keepalive_race" if reused else "reset", type(e).__name__)
    except TimeoutError:
        raise _Failed(
            "timeout", f"reading, {len(data)} bytes so far"
        ) from None


@dataclass
class LoadStats:
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    failureEvents: list[dict[str, Any]] = field(default_factory=list)
    pids: Counter[int] = field(default_factory=Counter)
    firstResponse: dict[int, float] = field(default_factory=dict)
    connections: int = 0
    closeHeaders: int = 0
    # (monotonic time the request ended, latency in seconds)
    samples: list[tuple[float, float]] = field(default_factory=list)


class AsyncLoad:
    """
    Closed-loop HTTP/1.1 clients in an asyncio loop on their own thread: half
    keep a connection alive (and reconnect only after C{Connection: close}),
    half open a new connection per request.  They never retry.
    """

    def __init__(
        self,
        port: int,
        connections: int,
        keepAliveFraction: float,
        timeout: float,
        path: str = "/",
        think: float = 0.0,
    ) -> None:
        self.port = port
        self.think = think
        self.timeout = timeout
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode("ascii")
        )
        keepAlive = round(connections * keepAliveFraction)
        self.modes = [i < keepAlive for i in range(connections)]
        self.stats = LoadStats()
        self.loop = asyncio.new_event_loop()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()
        self.startedAt = 0.0
        self.stoppedAt = 0.0

    # lifecycle

    def start(self) -> AsyncLoad:
        self._thread.start()
        self._started.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self.startedAt = time.monotonic()
        self._tasks = [
            asyncio.ensure_future(self._client(i, keepAlive))
            for i, keepAlive in enumerate(self.modes)
        ]
        self._started.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.stoppedAt = time.monotonic()

    def stop(self) -> LoadStats:
        def flag() -> None:
            self._stopping = True

        self.loop.call_soon_threadsafe(flag)
        self._thread.join(self.timeout * 3 + 10)
        return self.stats

    def submit(self, coroutine: Any) -> Any:
        """
        Run C{coroutine} in the load's loop; returns a concurrent Future.
        """
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    # clients

    def _fail(
        self, failure: _Failed, client: int, keepAlive: bool, reused: bool,
        lastPid: int | None, started: float, requestsOnConnection: int,
    ) -> None:
        self.stats.failures[failure.kind] += 1
        self.stats.failureEvents.append(
            {
                "time": time.monotonic(),
                "started": started,
                "kind": failure.kind,
                "detail": failure.detail,
                "client": client,
                "mode": "keep-alive" if keepAlive else "new-connection",
                "reused": reused,
                "requestsOnConnection": requestsOnConnection,
                "lastPid": lastPid,
            }
        )

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(HOST, self.port)
        except ConnectionRefusedError:
            raise _Failed("refused", "connect") from None
        except ConnectionResetError:
            raise _Failed("reset", "connect") from None
        except TimeoutError:
            raise _Failed("timeout", "connect") from None
        self.stats.connections += 1
        return reader, writer

    async def _client(self, client: int, keepAlive: bool) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        reused = False
        lastPid: int | None = None
        onConnection = 0
        stats = self.stats
        try:
            while not self._stopping:
                started = time.monotonic()
                try:
                    if writer is None:
                        reader, writer = await self._connect()
                        reused = False
                        onConnection = 0
                    assert reader is not None
                    try:
                        writer.write(self.request)
                        async with asyncio.timeout(self.timeout):
                            await writer.drain()
                    except (BrokenPipeError, ConnectionResetError) as e:
                        raise _Failed(
                            "keepalive_race" if reused else "reset",
                            f"send: {type(e).__name__}",
                        ) from None
                    except TimeoutError:
                        raise _Failed("timeout", "send") from None
                    response = await readResponse(reader, reused, self.timeout)
                    onConnection += 1
                    now = time.monotonic()
                    if response.status != 200:
                        raise _Failed("bad_status", str(response.status))
                    stats.ok += 1
                    stats.samples.append((now, now - started))
                    match = _PID.search(response.body)
                    if match:
                        pid = int(match.group(1))
                        lastPid = pid
                        if pid not in stats.firstResponse:
                            stats.firstResponse[pid] = now
                        stats.pids[pid] += 1
                    if response.close:
                        stats.closeHeaders += 1
                    if response.close or not keepAlive:
                        writer.close()
                        writer = reader = None
                    else:
                        reused = True
                    if self.think:
                        await asyncio.sleep(self.think)
                except _Failed as failure:
                    self._fail(
                        failure, client, keepAlive, reused, lastPid, started,
                        onConnection,
                    )
                    if writer is not None:
                        writer.close()
                    writer = reader = None
        finally:
            if writer is not None:
                writer.close()

    async def slowRequest(self, path: str) -> dict[str, Any]:
        """
        One request on its own connection; never raises.
        """
        started = time.monotonic()
        try:
            reader, writer = await self._connect()
        except _Failed as f:
            return {"ok": False, "kind": f.kind, "detail": f.detail}
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n\r\n".encode()
            )
            await writer.drain()
            response = await readResponse(reader, False, self.timeout)
        except _Failed as f:
            return {"ok": False, "kind": f.kind, "detail": f.detail}
        except (BrokenPipeError, ConnectionResetError) as e:
            return {"ok": False, "kind": "reset", "detail": type(e).__name__}
        finally:
            writer.close()
        match = _PID.search(response.body)
        return {
            "ok": response.status == 200,
            "kind": None if response.status == 200 else "bad_status",
            "status": response.status,
            "pid": int(match.group(1)) if match else None,
            "seconds": time.monotonic() - started,
            "close": response.close,
        }


# ---------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Serving:
    pid: int
    generation: int
    port: int
    event: dict[str, Any]


class LoggedServer:
    """
    C{twist --log-format json txgrace ...} and every successor it starts, all
    writing to one log file that a thread tails and parses.  (A file rather
    than a pipe: a server must never block on its log because this process
    is busy.)  The access log (one event per request) is only counted.
    """

    def __init__(self, command: list[str], logPath: str) -> None:
        self.command = command
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self.accessLines = 0
        self._condition = threading.Condition()
        self._log = open(logPath, "wb")
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=serverEnvironment(),
            cwd=REPO,
        )
        self.spawned = time.monotonic()
        self._stopReading = False
        self._reader = threading.Thread(target=self._read, args=(logPath,), daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, path: str) -> None:
        with open(path, "rb") as f:
            pending = b""
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    if self._stopReading:
                        break
                    time.sleep(0.002)
                    continue
                pending += chunk
                *complete, pending = pending.split(b"\n")
                events = []
                lines = []
                access = 0
                for raw in complete:
                    raw = raw.strip(b"\x1e\r")
                    if not raw:
                        continue
                    if raw.startswith(b'{"log_io": "\\"'):
                        access += 1
                        continue
                    try:
                        event = json.loads(raw)
                    except ValueError:
                        lines.append(raw.decode("utf-8", "replace"))
                        continue
                    if isinstance(event, dict):
                        events.append(event)
                    else:
                        lines.append(raw.decode("utf-8", "replace"))
                with self._condition:
                    self.events.extend(events)
                    self.lines.extend(lines)
                    self.accessLines += access
                    self._condition.notify_all()

    def waitFor(self, predicate: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._condition:
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"no matching log event within {timeout}s; last events:\n"
                        + "\n".join(formatEvents(self.events[-30:]) + self.lines[-10:])
                    )
                self._condition.wait(min(remaining, 0.5))

    def waitServing(self, generation: int, timeout: float) -> Serving:
        event = self.waitFor(
            lambda e: e.get("log_namespace") == "txgrace.lifecycle"
            and "addresses" in e
            and e.get("generation") == generation,
            timeout,
        )
        port = int(str(event["addresses"]).split(", ")[0].rsplit(":", 1)[1])
        return Serving(event["pid"], event["generation"], port, event)

    def pids(self) -> set[int]:
        with self._condition:
            events = list(self.events)
        pids = {self.process.pid}
        for event in events:
            if str(event.get("log_namespace", "")).startswith("txgrace."):
                for key in ("pid", "successor"):
                    if isinstance(event.get(key), int):
                        pids.add(event[key])
        return pids

    def stop(self, pids: set[int] | None = None) -> None:
        """
        SIGTERM every live pid of this server (they are all ours), wait, then
        SIGKILL what is left; stop reading the log.
        """
        live = [p for p in (self.pids() if pids is None else pids) if isAlive(p)]
        for pid in live:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(isAlive(p) for p in live):
            time.sleep(0.005)
        for pid in live:
            if isAlive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.05)
        self._stopReading = True
        self._reader.join(5)
        self._log.close()


def formatEvents(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def serverCommand(launcher: str, endpoint: str) -> list[str]:
    twistArgs = ["--log-format", "json", "txgrace", "--endpoint", endpoint, "--app", APP]
    if launcher == "twist":
        twist = os.path.join(os.path.dirname(sys.executable), "twist")
        if os.path.exists(twist):
            return [twist, *twistArgs]
    return [sys.executable, "-m", "twisted", *twistArgs]


def serverEnvironment() -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(("LISTEN_", "TXGRACE_")) or name == "NOTIFY_SOCKET":
            del env[name]
    env["PYTHONUNBUFFERED"] = "1"
    return env


def freePort() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpuMs(pid: int) -> float | None:
    """
    CPU time (user + system) that C{pid} has used so far, in ms.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def waitExit(pid: int, fd: int | None, timeout: float) -> float | None:
    """
    Wait for C{pid} to exit (pidfd, else /proc every 2 ms); return the
    monotonic time it was seen gone.
    """
    deadline = time.monotonic() + timeout
    if fd is not None:
        readable, _, _ = select.select([fd], [], [], timeout)
        return time.monotonic() if readable else None
    while time.monotonic() < deadline:
        if not isAlive(pid):
            return time.monotonic()
        time.sleep(0.002)
    return None


def blockingGet(port: int, timeout: float) -> tuple[int, bytes]:
    with socket.create_connection((HOST, port), timeout=timeout) as skt:
        skt.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = skt.recv(65536)
            if not chunk:
                raise ConnectionError("EOF")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b"\r\n")[0].split()[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = skt.recv(65536)
            if not chunk:
                raise ConnectionError("partial")
            body += chunk
        return status, body


def coldStart(launcher: str, logDir: str, label: str, timeout: float) -> dict[str, Any]:
    """
    Spawn the same command fresh on a port of its own; time spawn -> port
    accepting -> first successful response, and spawn -> its Serving event.
    """
    port = freePort()
    command = serverCommand(launcher, f"grace:tcp:{port}:interface={HOST}")
    wall = time.time()
    spawned = time.monotonic()
    server = LoggedServer(command, os.path.join(logDir, f"cold-{label}-{port}.log"))
    result: dict[str, Any] = {"port": port, "pid": server.pid, "label": label}
    try:
        deadline = spawned + timeout
        accepting = None
        while time.monotonic() < deadline:
            try:
                probe = socket.create_connection((HOST, port), timeout=timeout)
            except ConnectionRefusedError:
                time.sleep(0.001)
                continue
            accepting = time.monotonic()
            probe.close()
            break
        # The port listens before the reactor runs: this request waits in the
        # backlog until the process serves.
        status, body = blockingGet(port, timeout)
        answered = time.monotonic()
        result["cpuMs"] = cpuMs(server.pid)
        serving = server.waitServing(1, timeout)
        with server._condition:
            firstLog = min(e["log_time"] for e in server.events)
        result.update(
            firstLogMs=(firstLog - wall) * 1000,
            status=status,
            listenMs=None if accepting is None else (accepting - spawned) * 1000,
            firstResponseMs=(answered - spawned) * 1000,
            servingMs=(serving.event["log_time"] - wall) * 1000,
        )
    finally:
        server.stop({server.pid})
    return result


class CPUSampler:
    """
    Every 0.1 s: how busy the machine was, and how much of that was
    this benchmark (this process and every server pid it started).
    """

    def __init__(self, ourPids: Any) -> None:
        self._ourPids = ourPids
        self._stop = threading.Event()
        self.busy = 0.0
        self.ours = 0.0
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ticks = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _machine() -> tuple[float, float]:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    def _pidTicks(self, pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            return float(fields[11]) + float(fields[12])
        except (OSError, IndexError):
            return -1.0

    def _run(self) -> None:
        busy0, total0 = self._machine()
        last: dict[int, float] = {}
        while not self._stop.wait(0.1):
            pids = set(self._ourPids()) | {os.getpid()}
            ours = 0.0
            for pid in pids:
                ticks = self._pidTicks(pid)
                if ticks < 0:
                    continue
                ours += ticks - last.get(pid, 0.0 if pid != os.getpid() else ticks)
                last[pid] = ticks
            busy1, total1 = self._machine()
            self.busy += busy1 - busy0
            self.elapsed += total1 - total0
            self.ours += ours
            busy0, total0 = busy1, total1

    def start(self) -> CPUSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        cpus = os.cpu_count() or 1
        if not self.elapsed:
            return {}
        return {
            "machineBusyPct": 100 * self.busy / self.elapsed,
            "oursPct": 100 * min(self.ours, self.busy) / self.elapsed,
            "othersPct": 100 * max(self.busy - self.ours, 0) / self.elapsed,
            "cpus": cpus,
        }


# ---------------------------------------------------------------------------
# Reporting helpers


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(value: float | None, width: int = 8) -> str:
    return ("-" if value is None else f"{value:.1f}").rjust(width)


def logLevel(event: dict[str, Any]) -> str:
    level = event.get("log_level")
    if isinstance(level, dict):
        return str(level.get("name", "?"))
    return str(level)


# ---------------------------------------------------------------------------
# The benchmark


def restartOnce(
    server: LoggedServer,
    old: Serving,
    load: AsyncLoad,
    index: int,
    slowPath: str | None,
    timeout: float,
) -> tuple[dict[str, Any], Serving]:
    """
    SIGHUP C{old}; wait for its successor's Serving event and for C{old} to
    exit.  With C{slowPath}, a slow request is started on C{old} just before.
    """
    record: dict[str, Any] = {"index": index, "oldPid": old.pid}
    fd = pidfd(old.pid)
    slow = None
    if slowPath is not None:
        slow = load.submit(load.slowRequest(slowPath))
        time.sleep(0.05)
    eventsBefore = len(server.events)
    signalWall = time.time()
    signalMono = time.monotonic()
    os.kill(old.pid, signal.SIGHUP)
    new = server.waitServing(old.generation + 1, timeout=60)
    record["successorCpuMs"] = cpuMs(new.pid)
    exited = waitExit(old.pid, fd, 60)
    if fd is not None:
        os.close(fd)
    record.update(
        newPid=new.pid,
        generation=new.generation,
        signalMono=signalMono,
        signalWall=signalWall,
        readyMs=(new.event["log_time"] - signalWall) * 1000,
        oldExitMs=None if exited is None else (exited - signalMono) * 1000,
        exitMono=exited,
    )
    if slow is not None:
        record["slow"] = slow.result(timeout + 10)
    time.sleep(0.02)  # the old pid's last log lines
    with server._condition:
        restartEvents = server.events[eventsBefore:]
    handedOver = False
    for event in restartEvents:
        text = str(event.get("log_format", ""))
        rel = (event["log_time"] - signalWall) * 1000
        if text.startswith("Started successor") or (
            text.startswith("Started") and event.get("pid") == new.pid
        ):
            record.setdefault("spawnedMs", rel)
        elif "spawnedMs" in record and "successorLogMs" not in record:
            # Between "Started successor" and its readiness the old process
            # logs nothing but the access log: this is the successor's first
            # event, once Python has started and the imports are done.
            record["successorLogMs"] = rel
        if "hands over" in text:
            record["handOverMs"] = rel
            handedOver = True
        elif handedOver and text.startswith("Drained"):
            record.setdefault("drainedMs", rel)
            record.setdefault("drainOpened", event.get("opened"))
            record.setdefault("drainAborted", event.get("aborted"))
        elif handedOver and text.startswith("Main loop terminated"):
            record.setdefault("mainLoopEndMs", rel)
    record["events"] = [
        [round((e["log_time"] - signalWall) * 1000, 1), line]
        for e, line in zip(restartEvents, formatEvents(restartEvents))
    ]
    return record, new


def firstResponses(records: list[dict[str, Any]], stats: LoadStats) -> None:
    for record in records:
        seen = stats.firstResponse.get(record["newPid"])
        record["newFirstResponseMs"] = (
            None if seen is None else (seen - record["signalMono"]) * 1000
        )


def libraryFingerprint() -> str:
    """
    A hash of the txgrace modules the servers will import: the successors
    import them afresh, so a reinstall during the run changes what runs.
    """
    import hashlib

    import txgrace

    digest = hashlib.sha256()
    directory = os.path.dirname(txgrace.__file__)
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--keepalive-fraction", type=float, default=0.5,
        help="fraction of connections that keep alive (default 0.5)",
    )
    parser.add_argument(
        "--think", type=float, default=0.0,
        help="seconds each client waits between its requests (default 0)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="per socket op")
    parser.add_argument("--pause", type=float, default=0.2, help="after each restart")
    parser.add_argument("--warmup", type=float, default=1.0, help="load before restart 1")
    parser.add_argument(
        "--cold-starts", type=int, default=5,
        help="idle cold starts, alternating with the restarts without load (default 5)",
    )
    parser.add_argument(
        "--loaded-cold-every", type=int, default=5,
        help="a cold start under load after every Nth restart (default 5; 0: none)",
    )
    parser.add_argument(
        "--quiet-restarts", type=int, default=5,
        help="extra restarts before the load, with only a light probe (default 5)",
    )
    parser.add_argument("--probe-interval", type=float, default=0.002)
    parser.add_argument("--slow-every", type=int, default=10, help="0: none")
    parser.add_argument("--slow-duration", default="0.5s")
    parser.add_argument(
        "--launcher", choices=("twist", "module"), default="twist",
        help="the twist script (default) or python -m twisted",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    sys.setswitchinterval(0.001)

    import tempfile

    logDir = tempfile.mkdtemp(prefix="txgrace-restart-bench-")
    info = machineInfo()
    info["libraryFingerprint"] = libraryFingerprint()
    command = serverCommand(args.launcher, f"grace:tcp:0:interface={HOST}")
    keepAlive = round(args.connections * args.keepalive_fraction)
    slowText = (
        f"a /sleep/?duration={args.slow_duration} request just before every "
        f"{args.slow_every}th" if args.slow_every else "no slow requests"
    )
    print("== txgrace restart benchmark")
    print(f"benchmark : {shlex.join([sys.executable, *sys.argv])}  (cwd {os.getcwd()})")
    print(f"server    : {shlex.join(command)}  (cwd {REPO})")
    print(
        f"machine   : nproc {info['nproc']}, {info['cpu']}, Linux {info['kernel']}, "
        f"loadavg {info['loadavg'][0]:.2f} at start"
    )
    print(
        f"versions  : Python {info['python']}, Twisted {info['twisted']}, "
        f"txgrace {info['txgrace']} from {info['txgracePath']} "
        f"(fingerprint {info['libraryFingerprint']})"
    )
    print(
        f"load      : {args.connections} closed-loop asyncio clients in this process "
        f"({keepAlive} keep-alive, {args.connections - keepAlive} new connection "
        f"per request), no retries, {args.timeout:g}s timeout per socket op"
        + (f", {args.think:g}s think time" if args.think else "")
    )
    print(
        f"restarts  : {args.restarts} x SIGHUP, each waits for the successor's "
        f"Serving event and the old pid's exit (pidfd), then {args.pause:g}s; {slowText}"
    )
    print(f"logs      : {logDir}")
    print(flush=True)

    server = LoggedServer(command, os.path.join(logDir, "server.log"))
    coldPids: set[int] = set()
    sampler = CPUSampler(lambda: server.pids() | coldPids)
    load: AsyncLoad | None = None
    report: dict[str, Any] = {
        "machine": info, "command": command, "argv": sys.argv, "options": vars(args),
    }
    restarts: list[dict[str, Any]] = []
    coldIdle: list[dict[str, Any]] = []
    coldLoaded: list[dict[str, Any]] = []
    quiet: list[dict[str, Any]] = []
    probeStats: LoadStats | None = None
    started = time.monotonic()

    def cold(label: str) -> dict[str, Any]:
        result = coldStart(args.launcher, logDir, label, 60)
        coldPids.add(result["pid"])
        return result

    # Under-load cold starts go in the pauses after these restarts.
    coldAfter = (
        set(range(args.loaded_cold_every, args.restarts + 1, args.loaded_cold_every))
        if args.loaded_cold_every > 0 else set()
    )
    try:
        first = server.waitServing(1, timeout=60)
        port = first.port
        sampler.start()
        print(f"server pid {first.pid} serving on {HOST}:{port}")
        # Without load, alternately: an idle cold start, then a restart with
        # only a probe (one new-connection request every --probe-interval,
        # running only during the restart) to see the new pid's first
        # response.  Alternating pairs them in time: this machine's noise
        # drifts.
        print(
            f"without load: {args.cold_starts} cold starts (idle) alternating with "
            f"{args.quiet_restarts} restarts (probe: one request per "
            f"{args.probe_interval * 1000:g} ms on a new connection) ...",
            flush=True,
        )
        current = first
        probeStats = LoadStats()
        for index in range(1, max(args.cold_starts, args.quiet_restarts) + 1):
            if index <= args.cold_starts:
                coldIdle.append(cold("idle"))
                coldIdle[-1]["beforeQuietRestart"] = index
                time.sleep(args.pause)
            if index <= args.quiet_restarts:
                probe = AsyncLoad(port, 1, 0.0, args.timeout, think=args.probe_interval)
                probe.start()
                time.sleep(0.1)
                record, current = restartOnce(server, current, probe, index, None, args.timeout)
                time.sleep(0.05)
                one = probe.stop()
                firstResponses([record], one)
                probeStats.ok += one.ok
                probeStats.failures.update(one.failures)
                probeStats.failureEvents += one.failureEvents
                quiet.append(record)
                time.sleep(args.pause)

        load = AsyncLoad(
            port, args.connections, args.keepalive_fraction, args.timeout, think=args.think
        )
        load.start()
        time.sleep(args.warmup)
        print(
            f"load started; {args.restarts} restarts, with a cold start under load "
            f"after every {args.loaded_cold_every}th ...",
            flush=True,
        )
        for index in range(1, args.restarts + 1):
            slowPath = (
                f"/sleep/?duration={args.slow_duration}"
                if args.slow_every and index % args.slow_every == 0 else None
            )
            record, current = restartOnce(server, current, load, index, slowPath, args.timeout)
            restarts.append(record)
            time.sleep(args.pause)
            if index in coldAfter:
                coldLoaded.append(cold("loaded"))
                coldLoaded[-1]["afterRestart"] = index

        # The last successor's first response.
        deadline = time.monotonic() + 5
        while current.pid not in load.stats.firstResponse and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = load.stop()
        load = None
    finally:
        if load is not None:
            load.stop()
        cpu = sampler.stop() if sampler._thread.is_alive() else {}
        server.stop()
    elapsed = time.monotonic() - started
    info["loadavgEnd"] = os.getloadavg()
    info["libraryFingerprintEnd"] = libraryFingerprint()
    libraryChanged = info["libraryFingerprintEnd"] != info["libraryFingerprint"]
    report["cpu"] = cpu

    # -----------------------------------------------------------------------
    # Figures

    firstResponses(restarts, stats)
    for record in quiet + restarts:
        if record["exitMono"] is not None and "mainLoopEndMs" in record:
            record["exitAfterMainLoopMs"] = record["oldExitMs"] - record["mainLoopEndMs"]
    for record in restarts:
        window = (record["signalMono"], record["exitMono"] or record["signalMono"])
        inWindow = [lat for t, lat in stats.samples if window[0] <= t <= window[1]]
        record["maxLatencyMs"] = max(inWindow) * 1000 if inWindow else None
        record["failures"] = 0

    # Attribute each failure to the last restart signalled before it.
    for failure in stats.failureEvents:
        owner = None
        for record in restarts:
            if record["signalMono"] <= failure["time"]:
                owner = record
        if owner is not None:
            owner["failures"] += 1
            failure["restart"] = owner["index"]
            failure["afterSignalMs"] = (failure["time"] - owner["signalMono"]) * 1000
            if owner["exitMono"] is not None:
                failure["afterOldExitMs"] = (failure["time"] - owner["exitMono"]) * 1000

    def table(title: str, records: list[dict[str, Any]]) -> None:
        print()
        print(title)
        print(
            "   #  old pid  new pid spawned    ready 1st resp hand over  drained loop end"
            "  old exit  max lat  fail  slow request"
        )
        for r in records:
            slow = r.get("slow")
            slowText = ""
            if slow is not None:
                slowText = (
                    f"{slow.get('status')} in {slow['seconds'] * 1000:.0f} ms from pid "
                    f"{slow.get('pid')} "
                    f"{'(old)' if slow.get('pid') == r['oldPid'] else '(NOT old)'}"
                    if slow["ok"] else f"FAILED {slow['kind']} {slow['detail']}"
                )
            print(
                f"{r['index']:4d} {r['oldPid']:8d} {r['newPid']:8d}"
                f"{ms(r.get('spawnedMs'))} {ms(r['readyMs'])} {ms(r['newFirstResponseMs'])}"
                f"  {ms(r.get('handOverMs'))} {ms(r.get('drainedMs'))}"
                f" {ms(r.get('mainLoopEndMs'))}  {ms(r['oldExitMs'])}"
                f" {ms(r.get('maxLatencyMs'))}  {r.get('failures', 0):4d}  {slowText}"
            )

    print()
    print("Times are ms after the SIGHUP: spawned, hand over, drained and loop end")
    print("(\"Main loop terminated\") from the old process's log; ready = the successor's")
    print("Serving event; 1st resp = first response by the new pid seen by the clients;")
    print("old exit by pidfd; max lat = slowest request that ended between SIGHUP and old exit.")
    if quiet:
        table(f"restarts without load ({len(quiet)}, light probe)", quiet)
    table(f"restarts under load ({len(restarts)})", restarts)

    if stats.failureEvents:
        print()
        print(f"failed requests ({len(stats.failureEvents)}; first 60):")
        for f in stats.failureEvents[:60]:
            print(
                f"  restart {f.get('restart', '-')}, {ms(f.get('afterSignalMs'), 0)} ms "
                f"after SIGHUP, {ms(f.get('afterOldExitMs'), 0)} ms after old exit: "
                f"{f['kind']} ({f['detail']}) client {f['client']} {f['mode']} "
                f"reused={f['reused']} requests on connection={f['requestsOnConnection']} "
                f"last pid={f['lastPid']}"
            )

    serverProblems = [
        e for e in server.events if logLevel(e) in ("warn", "error", "critical")
    ]
    if serverProblems:
        print()
        print(f"server warnings/errors ({len(serverProblems)}; first 20):")
        for e, line in list(zip(serverProblems, formatEvents(serverProblems)))[:20]:
            print(f"  [{logLevel(e)}] {line}")
    if server.lines:
        print()
        print(f"server non-JSON output ({len(server.lines)} lines; first 20):")
        for line in server.lines[:20]:
            print("  " + line)

    duration = stats.samples[-1][0] - stats.samples[0][0] if stats.samples else 0.0
    latencies = [lat * 1000 for _, lat in stats.samples]

    def column(records: list[dict[str, Any]], key: str) -> list[float]:
        return [r[key] for r in records if r.get(key) is not None]

    def between(records: list[dict[str, Any]], start: str, end: str) -> list[float]:
        return [
            r[end] - r[start] for r in records
            if r.get(start) is not None and r.get(end) is not None
        ]

    newFirst = column(restarts, "newFirstResponseMs")
    quietFirst = column(quiet, "newFirstResponseMs")
    coldIdleMs = [c["firstResponseMs"] for c in coldIdle]
    coldLoadedMs = [c["firstResponseMs"] for c in coldLoaded]
    expectedPids = {r["oldPid"] for r in restarts} | {r["newPid"] for r in restarts}
    servedPids = set(stats.pids)
    slows = [r["slow"] for r in restarts if "slow" in r]
    slowFailed = [s for s in slows if not s["ok"]]
    slowWrongPid = [
        (r["index"], r["slow"].get("pid")) for r in restarts
        if "slow" in r and r["slow"]["ok"] and r["slow"].get("pid") != r["oldPid"]
    ]
    totalFailed = sum(stats.failures.values())
    probeFailed = sum(probeStats.failures.values()) if probeStats else 0

    def overhead(first: list[float], cold: list[float]) -> float | None:
        if not first or not cold:
            return None
        return median(first) - median(cold)  # type: ignore[operator]

    byIndex = {r["index"]: r for r in restarts}
    paired = [
        byIndex[c["afterRestart"]]["newFirstResponseMs"] - c["firstResponseMs"]
        for c in coldLoaded
        if byIndex.get(c["afterRestart"], {}).get("newFirstResponseMs") is not None
    ]
    quietByIndex = {r["index"]: r for r in quiet}
    pairedQuiet = [
        quietByIndex[c["beforeQuietRestart"]]["newFirstResponseMs"] - c["firstResponseMs"]
        for c in coldIdle
        if quietByIndex.get(c.get("beforeQuietRestart"), {}).get("newFirstResponseMs")
        is not None
    ]
    overheadIdle = overhead(newFirst, coldIdleMs)
    overheadLoaded = overhead(newFirst, coldLoadedMs)
    overheadQuiet = overhead(quietFirst, coldIdleMs)
    aborted = sum(r.get("drainAborted") or 0 for r in quiet + restarts)

    def dist(values: list[float]) -> str:
        if not values:
            return "-"
        return (
            f"median {median(values):7.1f}  p90 {percentile(values, 90):7.1f}  "
            f"min {min(values):7.1f}  max {max(values):7.1f}"
        )

    def ownPart(records: list[dict[str, Any]]) -> list[float]:
        return [
            r["spawnedMs"] + r["newFirstResponseMs"] - r["successorLogMs"]
            for r in records
            if None not in (
                r.get("spawnedMs"), r.get("successorLogMs"), r.get("newFirstResponseMs")
            )
        ]

    def timings(records: list[dict[str, Any]], prefix: str) -> list[tuple[str, str]]:
        return [
            (f"{prefix}SIGHUP->successor spawned ms", dist(column(records, "spawnedMs"))),
            (f"{prefix}  spawned->successor's 1st log ms",
             dist(between(records, "spawnedMs", "successorLogMs"))),
            (f"{prefix}  successor's 1st log->ready ms",
             dist(between(records, "successorLogMs", "readyMs"))),
            (f"{prefix}SIGHUP->successor ready ms", dist(column(records, "readyMs"))),
            (f"{prefix}SIGHUP->new pid 1st resp ms", dist(column(records, "newFirstResponseMs"))),
            (f"{prefix}  ready->new pid 1st resp ms",
             dist(between(records, "readyMs", "newFirstResponseMs"))),
            (f"{prefix}  successor CPU at ready ms", dist(column(records, "successorCpuMs"))),
            (f"{prefix}  txgrace's part ms", dist(ownPart(records))
             + "   (SIGHUP->spawned + 1st log->ready + ready->1st resp: all but"
             " the successor's Python start and imports)"),
            (f"{prefix}  ready->old hands over ms", dist(between(records, "readyMs", "handOverMs"))),
            (f"{prefix}  old drain ms", dist(between(records, "handOverMs", "drainedMs"))),
            (f"{prefix}  old loop end->exit ms", dist(column(records, "exitAfterMainLoopMs"))),
            (f"{prefix}SIGHUP->old pid exit ms", dist(column(records, "oldExitMs"))),
        ]

    print()
    print("== summary")
    rows = [
        ("requests ok", f"{stats.ok} in {duration:.1f}s ({stats.ok / max(duration, 1e-9):.0f}/s); "
         f"{stats.connections} connections; {stats.closeHeaders} Connection: close honoured"),
        ("failed requests", f"{totalFailed}   (target 0)  {'PASS' if totalFailed == 0 else 'FAIL'}"),
    ]
    rows += [(f"  {kind}", str(stats.failures.get(kind, 0))) for kind in KINDS]
    rows += [
        ("slow requests", f"{len(slows) - len(slowFailed)}/{len(slows)} completed with 200"
         + (f"; not from the old pid: {slowWrongPid}" if slowWrongPid else
            (" from the old pid" if slows else ""))),
        ("distinct pids served", f"{len(servedPids)} (expected {args.restarts + 1}); "
         f"pids that never served: {sorted(expectedPids - servedPids) or 'none'}"),
        ("connections aborted", f"{aborted} (hammer, per the old processes' Drained logs)"),
        ("request latency ms", dist(latencies)),
    ]
    rows += timings(restarts, "")
    rows += [
        ("cold start ms (idle)", f"{dist(coldIdleMs)}   "
         f"[{', '.join(f'{v:.0f}' for v in coldIdleMs)}]"),
        ("  spawn->port listening", dist([c["listenMs"] for c in coldIdle if c["listenMs"]])),
        ("  spawn->1st log", dist([c["firstLogMs"] for c in coldIdle])),
        ("  1st log->Serving log", dist([c["servingMs"] - c["firstLogMs"] for c in coldIdle])),
        ("  spawn->Serving log", dist([c["servingMs"] for c in coldIdle])),
        ("  server CPU at 1st resp ms", dist([c["cpuMs"] for c in coldIdle if c.get("cpuMs")])),
        ("cold start ms (under load)", f"{dist(coldLoadedMs)}   "
         f"[{', '.join(f'{v:.0f}' for v in coldLoadedMs)}]"),
        ("handover overhead ms",
         f"{ms(overheadIdle, 0)} = median(SIGHUP->new pid 1st resp) {ms(median(newFirst), 0)}"
         f" - median(cold start, idle) {ms(median(coldIdleMs), 0)}   (target <= 20)  "
         f"{'PASS' if overheadIdle is not None and overheadIdle <= 20 else 'FAIL'}"),
        ("  server CPU at 1st resp ms",
         dist([c["cpuMs"] for c in coldLoaded if c.get("cpuMs")])),
        ("  same, vs cold start under load",
         f"{ms(overheadLoaded, 0)} = {ms(median(newFirst), 0)} - {ms(median(coldLoadedMs), 0)}"),
        ("  paired: restart - next cold start",
         f"{dist(paired)}   (each cold start under load minus the restart just before it)"),
    ]
    if quiet:
        rows += [
            (f"without load ({len(quiet)} restarts)",
             f"probe: {probeStats.ok if probeStats else 0} ok, {probeFailed} failed"
             + (f" {dict(probeStats.failures)}" if probeFailed and probeStats else "")),
        ]
        rows += timings(quiet, "  ")
        rows += [
            ("  handover overhead ms",
             f"{ms(overheadQuiet, 0)} = median(SIGHUP->new pid 1st resp) "
             f"{ms(median(quietFirst), 0)} - median(cold start, idle) "
             f"{ms(median(coldIdleMs), 0)}   (target <= 20)  "
             f"{'PASS' if overheadQuiet is not None and overheadQuiet <= 20 else 'FAIL'}"),
            ("  paired: restart - cold start", f"{dist(pairedQuiet)}   (each restart minus "
             "the idle cold start just before it)"),
        ]
    rows += [
        ("CPU during the run",
         f"machine {cpu.get('machineBusyPct', 0):.0f}% busy of {info['nproc']} cpus: "
         f"this benchmark + its servers {cpu.get('oursPct', 0):.0f}%, other processes "
         f"{cpu.get('othersPct', 0):.0f}%; loadavg {info['loadavg'][0]:.2f} -> "
         f"{info['loadavgEnd'][0]:.2f}; run took {elapsed:.0f}s" if cpu else "-"),
    ]
    if libraryChanged:
        rows.append((
            "WARNING",
            f"the installed txgrace changed during the run ({info['libraryFingerprint']}"
            f" -> {info['libraryFingerprintEnd']}): later successors ran other code",
        ))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")

    if args.json:
        report.update(
            restarts=restarts,
            quietRestarts=quiet,
            probe=None if probeStats is None else {
                "ok": probeStats.ok, "failures": dict(probeStats.failures),
                "failureEvents": probeStats.failureEvents,
            },
            handoverOverheadWithoutLoadMs=overheadQuiet,
            pairedWithoutLoadMs=pairedQuiet,
            pairedUnderLoadMs=paired,
            txgracePartMs={"underLoad": median(ownPart(restarts)),
                           "withoutLoad": median(ownPart(quiet))},
            coldStartIdle=coldIdle,
            coldStartLoaded=coldLoaded,
            ok=stats.ok,
            durationSeconds=duration,
            failures={kind: stats.failures.get(kind, 0) for kind in KINDS},
            failureEvents=stats.failureEvents,
            pids={str(p): n for p, n in stats.pids.items()},
            distinctPids=len(servedPids),
            slowRequests=slows,
            latencyMs={"median": median(latencies), "p99": percentile(latencies, 99),
                       "max": max(latencies) if latencies else None},
            handoverOverheadMs=overheadIdle,
            handoverOverheadVsLoadedColdStartMs=overheadLoaded,
            serverWarnings=formatEvents(serverProblems),
            serverAccessLogLines=server.accessLines,
            logDir=logDir,
        )
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0 if totalFailed == 0 and not slowFailed and not probeFailed else 1


if __name__ == "__main__":
    sys.exit(main())
