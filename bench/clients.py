"""
Client cases across restarts for txgrace (prints figures; not a pass/fail
test): the table of issue 13, measured for txgrace on plain TCP
(C{grace:tcp}) and on TLS (C{grace:ssl}, a fresh self-signed certificate;
the clients do not verify it).  Each cell is answered/sent, and how many
connections the server ended (a C{Connection: close} response, or an EOF or
a reset where a response was due).

Restart rows, all at once across the same restarts (SIGHUP of the serving
process; the next restart once the old process has exited):

  early      connected before the trigger, first request at +1.5 s
  late       connected before the trigger, first request once the old
             process has exited (or at +15 s if it is still alive)
  mid        connected at +0.3 s, first request at +1.5 s
  keep-alive one connection each, a GET every 0.3 s, 1.1 s and 2.0 s, for the
             whole run (counted over the whole run)
  pipelined  one connection, 3 pipelined GETs at a time in a loop, the first
             /sleep?duration=0.5 (so a batch is in flight most of the time),
             for the whole run; every response counts
  stream     a /stream?duration=2 (chunked) started before the trigger, and
             a GET on the same connection as soon as its last chunk arrived

SIGTERM rows, on a server of their own per run:

  backlog    the server is stopped (SIGSTOP, by pid), 50 connections are made
             (the kernel completes them and queues them on the listening
             socket; /proc/net/tcp shows the queue) and each sends a GET (on
             TLS: starts its handshake), then SIGTERM and SIGCONT: every
             queued connection should be accepted and answered
  idle       50 connections accepted (the server holds 50 more sockets), no
             request yet; SIGTERM, then a GET on each at +1.5 s

Run from the repository root (the grace: endpoint plugin is found from
there):

    PYTHONPATH=. .venv/bin/python bench/clients.py [--runs 2]
        [--restarts 10] [--transports tcp,tls] [--json FILE]

The server is C{twist txgrace --app txgrace.test._apps.site} with its
defaults (probation 5 s, idle grace 5 s, handoff on).  Everything listens on
127.0.0.1 only; every server process is started here and killed by pid
(ServerProcess.kill) at the end of its run.  Each loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    APP,
    HOST,
    ROOT,
    eventsMatching,
    machineInfo,
    printMachineInfo,
    writeJSON,
)

from txgrace.testing import (  # noqa: E402
    PacedClient,
    RequestFailed,
    ServerProcess,
    _PID,
    _Reader,
    _readResponse,
    isAlive,
    waitUntil,
    writeSelfSignedCertificate,
)

ROWS = [
    ("early", "connected before the trigger, first request at +1.5 s"),
    ("late", "the same, first request after the old process exited (or at +15 s)"),
    ("mid", "connected at +0.3 s, first request at +1.5 s"),
    ("keepalive-0.3", "keep-alive, one GET every 0.3 s"),
    ("keepalive-1.1", "keep-alive, one GET every 1.1 s"),
    ("keepalive-2.0", "keep-alive, one GET every 2.0 s"),
    ("pipelined", "3 pipelined GETs across the handover"),
    ("stream", "GET on the same connection right after a chunked stream ended"),
    ("backlog", "SIGTERM with 50 connections queued in the backlog"),
    ("idle", "SIGTERM with 50 accepted idle connections, requests at +1.5 s"),
]
INTERVALS = (0.3, 1.1, 2.0)

# Failure kinds that mean the server ended the connection where a response
# was due: an EOF, a reset, or (TLS) an EOF while sending.
ENDED_KINDS = {
    "keepalive_race",
    "eof_before_response",
    "partial",
    "reset",
    "ConnectionResetError",
    "BrokenPipeError",
    "SSLEOFError",
    "SSLZeroReturnError",
}


def raiseFileLimit(needed: int) -> tuple[int, int]:
    """
    Raise RLIMIT_NOFILE to the hard limit, so that the server (a child)
    inherits it too (as bench/drain.py does).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(needed, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Row:
    """
    What the clients of one row saw: requests answered (status 200 with a
    pid) and sent, failures by kind, and the connections the server ended
    (C{Connection: close} responses, and EOFs or resets).
    """

    def __init__(self) -> None:
        self.answered = 0
        self.sent = 0
        self.failures: Counter[str] = Counter()
        self.closes = 0
        self.ended = 0
        self.pids: Counter[int] = Counter()
        self.reconnects = 0
        """
        New connections a long-running client had to open (keep-alive rows,
        pipelined).
        """

    def fail(self, kind: str, count: int = 1) -> None:
        if count <= 0:
            return
        self.sent += count
        self.failures[kind] += count

    def answer(self, pid: int, close: bool) -> None:
        self.sent += 1
        self.answered += 1
        self.pids[pid] += 1
        if close:
            self.closes += 1

    def addPaced(self, client: PacedClient) -> None:
        self.answered += len(client.pids)
        self.sent += len(client.pids) + len(client.failures)
        self.failures.update(client.failures)
        self.pids.update(client.pids)
        self.closes += client.closes
        self.ended += sum(1 for kind in client.failures if kind in ENDED_KINDS)

    def cell(self) -> str:
        return f"{self.answered}/{self.sent}"

    def closedByServer(self) -> int:
        return self.closes + self.ended

    def asDict(self) -> dict[str, Any]:
        return {
            "answered": self.answered,
            "sent": self.sent,
            "failures": dict(self.failures),
            "connection_close_responses": self.closes,
            "eof_or_reset": self.ended,
            "closed_by_server": self.closedByServer(),
            "distinct_pids": len(self.pids),
            "reconnects": self.reconnects,
        }


class Transport:
    """
    How to reach the server: plain TCP, or TLS with a fresh self-signed
    certificate that the clients do not verify.
    """

    def __init__(self, name: str, directory: str) -> None:
        self.name = name
        self.context: ssl.SSLContext | None = None
        if name == "tls":
            key, cert = writeSelfSignedCertificate(directory)
            self.endpoint = f"grace:ssl:0:interface={HOST}:privateKey={key}:certKey={cert}"
            self.context = ssl.create_default_context()
            self.context.check_hostname = False
            self.context.verify_mode = ssl.CERT_NONE
        else:
            self.endpoint = f"grace:tcp:0:interface={HOST}"

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        skt = socket.create_connection((HOST, port), timeout=timeout)
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.context is not None:
            skt = self.context.wrap_socket(skt)
        return skt

    def paced(
        self, row: Row, port: int, interval: float = 1.0, firstAfter: float | None = None,
        count: int = 10_000,
    ) -> PacedClient | None:
        """
        A L{PacedClient} (connected, not started), or L{None} if it could not
        connect: then one failed request is counted in C{row}.
        """
        try:
            return PacedClient(
                HOST, port, interval=interval, firstAfter=firstAfter, count=count,
                context=self.context,
            )
        except OSError as e:
            row.fail("connect_" + type(e).__name__)
            return None


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode("ascii")


def pidOf(body: bytes) -> int | None:
    match = _PID.search(body)
    return int(match.group(1)) if match else None


def failureKind(e: BaseException) -> str:
    return e.kind if isinstance(e, RequestFailed) else type(e).__name__


class PipelinedClient:
    """
    One connection; in a loop, three pipelined GETs (the first
    C{/sleep?duration=0.5}) and their three responses.  A connection the
    server ends is replaced; a response that did not come is a failure.
    """

    def __init__(self, transport: Transport, port: int, row: Row, maxBatches: int = 100_000) -> None:
        self._transport = transport
        self._port = port
        self._row = row
        self._maxBatches = maxBatches
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.localPorts: list[int] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PipelinedClient:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(30)

    def _run(self) -> None:
        batch = request("/sleep?duration=0.5") + request("/") * 2
        skt: socket.socket | None = None
        for _ in range(self._maxBatches):
            if self._stopping.is_set():
                break
            if skt is None:
                try:
                    skt = self._transport.connect(self._port)
                except OSError as e:
                    with self._lock:
                        self._row.fail("connect_" + type(e).__name__)
                    self._stopping.wait(0.1)
                    continue
                self.localPorts.append(skt.getsockname()[1])
            try:
                skt.sendall(batch)
            except OSError as e:
                kind = type(e).__name__
                with self._lock:
                    self._row.fail(kind, 3)
                    if kind in ENDED_KINDS:
                        self._row.ended += 1
                skt.close()
                skt = None
                continue
            reader = _Reader(skt)
            for i in range(3):
                try:
                    status, body, close = _readResponse(skt, True, reader)
                    pid = pidOf(body)
                    if status != 200 or pid is None:
                        raise RequestFailed("bad_status")
                except (RequestFailed, OSError) as e:
                    kind = failureKind(e)
                    with self._lock:
                        self._row.fail(kind)
                        self._row.fail("unanswered_behind_it", 2 - i)
                        if kind in ENDED_KINDS:
                            self._row.ended += 1
                    skt.close()
                    skt = None
                    break
                with self._lock:
                    self._row.answer(pid, close)
                if close:
                    with self._lock:
                        self._row.fail("unanswered_after_close", 2 - i)
                    skt.close()
                    skt = None
                    break
        if skt is not None:
            skt.close()


def streamThenGet(transport: Transport, port: int, duration: float, out: dict[str, Any]) -> None:
    """
    A chunked stream of C{duration} seconds, then at once a GET on the same
    connection; what happened goes into C{out}.
    """
    out["stream"] = out["get"] = None
    try:
        skt = transport.connect(port, timeout=duration + 15)
    except OSError as e:
        out["stream"] = "connect_" + type(e).__name__
        return
    try:
        skt.sendall(request(f"/stream?duration={duration}"))
        reader = _Reader(skt)
        try:
            status, body, close = _readResponse(skt, False, reader)
            out["stream"] = (status, close, pidOf(body))
        except (RequestFailed, OSError) as e:
            out["stream"] = failureKind(e)
            return
        out["streamEndedAt"] = time.monotonic()
        try:
            skt.sendall(request("/"))
            status, body, close = _readResponse(skt, True, reader)
            pid = pidOf(body)
            out["get"] = ("ok", pid, close) if status == 200 and pid else "bad_status"
        except (RequestFailed, OSError) as e:
            out["get"] = failureKind(e)
    finally:
        skt.close()


def startServer(transport: Transport, *extra: str) -> tuple[ServerProcess, Any]:
    server = ServerProcess(
        ["--endpoint", transport.endpoint, "--app", APP, *extra], cwd=ROOT
    )
    try:
        serving = server.waitServing(1, timeout=60)
    except BaseException:
        server.kill()
        raise
    return server, serving


def oneRestart(
    server: ServerProcess, serving: Any, transport: Transport, rows: dict[str, Row],
    streamDuration: float,
) -> tuple[Any, dict[str, Any]]:
    """
    One SIGHUP with the early, mid, late and stream clients around it.

    @return: The successor's L{Serving} and this restart's timings.
    """
    port = serving.port()
    early = transport.paced(rows["early"], port, firstAfter=1.5, count=1)
    late = transport.paced(rows["late"], port, firstAfter=0, count=1)
    streamed: dict[str, Any] = {}
    since = server.eventCount()
    streamer = threading.Thread(
        target=streamThenGet, args=(transport, port, streamDuration, streamed), daemon=True
    )
    streamer.start()
    server.waitForMessage(rf"streaming {streamDuration}", timeout=15, since=since)

    triggerAt = time.monotonic()
    server.signal(signal.SIGHUP, serving.pid)
    if early is not None:
        early.start()
    time.sleep(max(0.0, triggerAt + 0.3 - time.monotonic()))
    mid = transport.paced(
        rows["mid"], port, firstAfter=max(0.0, triggerAt + 1.5 - time.monotonic()), count=1
    )
    if mid is not None:
        mid.start()
    successor = server.waitServing(serving.generation + 1, timeout=60)
    readyAt = time.monotonic()
    waitUntil(lambda: not isAlive(serving.pid), max(0.0, triggerAt + 15 - time.monotonic()), 0.005)
    oldExited = not isAlive(serving.pid)
    lateAt = time.monotonic()
    if late is not None:
        late.start()
    for client, name in ((early, "early"), (mid, "mid"), (late, "late")):
        if client is None:
            continue
        if not client.wait(30):
            rows[name].fail("client_did_not_finish")
        client.stop()
        rows[name].addPaced(client)
    streamer.join(streamDuration + 30)
    row = rows["stream"]
    get = streamed.get("get")
    if streamed.get("stream") is None or isinstance(streamed.get("stream"), str):
        # The stream itself failed: the GET was never sent; count it failed.
        row.fail("stream_" + str(streamed.get("stream")))
    elif isinstance(get, tuple):
        row.answer(get[1], get[2])
    else:
        kind = str(get)
        row.fail(kind)
        if kind in ENDED_KINDS:
            row.ended += 1
    if not oldExited:
        waitUntil(lambda: not isAlive(serving.pid), 30)
    timings = {
        "ready_s": readyAt - triggerAt,
        "old_exited_s": (lateAt - triggerAt) if oldExited else None,
        "stream_ended_s": (
            streamed["streamEndedAt"] - triggerAt if "streamEndedAt" in streamed else None
        ),
        "stream_get": get if not isinstance(get, tuple) else "ok",
    }
    return successor, timings


def restartRun(
    transport: Transport, rows: dict[str, Row], restarts: int, streamDuration: float,
    pause: float, label: str,
) -> dict[str, Any]:
    server, serving = startServer(transport)
    firstPid = serving.pid
    port = serving.port()
    keepAlive: dict[str, PacedClient] = {}
    pipelined: PipelinedClient | None = None
    timings: list[dict[str, Any]] = []
    try:
        for interval in INTERVALS:
            name = f"keepalive-{interval}"
            client = transport.paced(rows[name], port, interval=interval)
            if client is not None:
                keepAlive[name] = client.start()
        pipelined = PipelinedClient(transport, port, rows["pipelined"]).start()
        time.sleep(1.0)
        for i in range(restarts):
            serving, timing = oneRestart(server, serving, transport, rows, streamDuration)
            timings.append(timing)
            print(
                f"    {label} restart {i + 1:2}: ready +{timing['ready_s']:.2f} s, "
                + (
                    f"old exited +{timing['old_exited_s']:.2f} s"
                    if timing["old_exited_s"] is not None
                    else "old still alive at +15 s"
                )
                + (
                    f", stream ended +{timing['stream_ended_s']:.2f} s"
                    if timing["stream_ended_s"] is not None
                    else ""
                )
                + f", GET after it: {timing['stream_get']}"
            )
            sys.stdout.flush()
            time.sleep(pause)
    finally:
        for name, client in keepAlive.items():
            client.stop()
            rows[name].addPaced(client)
            rows[name].reconnects += len(client.localPorts) - 1
        if pipelined is not None:
            pipelined.stop()
            rows["pipelined"].reconnects += max(0, len(pipelined.localPorts) - 1)
        reports = eventsMatching(server, "txgrace.report", "handedOff") or [
            e for e in list(server.events) if "handedOff" in e and "drained" in e
        ]
        server.kill()
    return {
        "first_pid": firstPid,
        "restarts": timings,
        "reports": [
            {k: r.get(k) for k in ("oldPid", "successor", "handedOff", "drained", "aborted",
                                   "requestsInFlight", "triggerToReady", "readyToExit",
                                   "listenDropped")}
            for r in reports
        ],
    }


def listenQueue(port: int) -> int | None:
    """
    How many connections wait in the accept queue of the listening socket on
    C{HOST}:C{port} (the rx_queue of a LISTEN entry of /proc/net/tcp).
    """
    local = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1] == local and fields[3] == "0A":
                    return int(fields[4].split(":")[1], 16)
    except OSError:
        pass
    return None


def sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def backlogRun(transport: Transport, row: Row, count: int) -> dict[str, Any]:
    """
    SIGTERM while C{count} connections wait in the accept queue of a
    stopped server, each with its request sent (TLS: its ClientHello).
    """
    server, serving = startServer(transport)
    pid, port = serving.pid, serving.port()
    stopped = False
    info: dict[str, Any] = {}
    lock = threading.Lock()
    try:
        server.signal(signal.SIGSTOP, pid)
        stopped = True
        waitUntil(lambda: _state(pid) == "T", 5, 0.005)
        connected: list[socket.socket] = []
        t0 = time.monotonic()
        for _ in range(count):
            try:
                skt = socket.create_connection((HOST, port), timeout=30)
            except OSError as e:
                row.fail("connect_" + type(e).__name__)
                continue
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connected.append(skt)
        info["connect_seconds"] = time.monotonic() - t0
        info["queued_before_sigterm"] = listenQueue(port)

        def finish(skt: socket.socket) -> None:
            try:
                if transport.context is not None:
                    skt = transport.context.wrap_socket(skt)
                skt.sendall(request("/"))
                status, body, close = _readResponse(skt, False)
                pid = pidOf(body)
                if status != 200 or pid is None:
                    raise RequestFailed("bad_status")
            except (RequestFailed, OSError) as e:
                kind = failureKind(e)
                with lock:
                    row.fail(kind)
                    if kind in ENDED_KINDS:
                        row.ended += 1
            else:
                with lock:
                    row.answer(pid, close)
            finally:
                skt.close()

        threads = [threading.Thread(target=finish, args=(s,), daemon=True) for s in connected]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # every request (ClientHello) is in the kernel
        server.signal(signal.SIGTERM, pid)
        server.signal(signal.SIGCONT, pid)
        stopped = False
        for thread in threads:
            thread.join(40)
        try:
            info["exit_status"] = server.waitFirst(30)
        except Exception:
            info["exit_status"] = None
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        server.kill()
    return info


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "?"


def idleRun(transport: Transport, row: Row, count: int) -> dict[str, Any]:
    """
    SIGTERM with C{count} accepted idle connections; a GET on each at +1.5 s.
    """
    server, serving = startServer(transport)
    info: dict[str, Any] = {}
    try:
        baseline = sockets(serving.pid)
        clients = [transport.paced(row, serving.port(), firstAfter=1.5, count=1) for _ in range(count)]
        info["accepted"] = waitUntil(lambda: sockets(serving.pid) >= baseline + count, 15)
        server.signal(signal.SIGTERM, serving.pid)
        for client in clients:
            if client is not None:
                client.start()
        for client in clients:
            if client is None:
                continue
            if not client.wait(30):
                row.fail("client_did_not_finish")
            client.stop()
            row.addPaced(client)
        try:
            info["exit_status"] = server.waitFirst(30)
        except Exception:
            info["exit_status"] = None
    finally:
        server.kill()
    return info


def printTable(results: dict[str, dict[str, Row]], runs: int, restarts: int) -> None:
    names = list(results)
    title = {"tcp": "TCP", "tls": "TLS"}
    print(f"\nanswered/sent (connections the server closed: Connection: close + EOF/reset)")
    header = f"| client case ({runs} runs x {restarts} restarts) | " + " | ".join(
        title.get(n, n) for n in names
    ) + " |"
    print(header)
    print("|---|" + "---|" * len(names))
    for key, text in ROWS:
        cells = []
        for name in names:
            row = results[name][key]
            cells.append(
                f"{row.cell()} (closed {row.closedByServer()}: {row.closes} + {row.ended})"
            )
        print(f"| {text} | " + " | ".join(cells) + " |")
    print("\nfailures by kind:")
    for key, _ in ROWS:
        for name in names:
            row = results[name][key]
            if row.failures:
                print(f"    {title.get(name, name)} {key}: {dict(row.failures)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--restarts", type=int, default=10, help="restarts per run")
    parser.add_argument("--transports", default="tcp,tls", help="tcp, tls or both")
    parser.add_argument("--connections", type=int, default=50,
                        help="connections of the SIGTERM rows")
    parser.add_argument("--stream-duration", type=float, default=2.0)
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds between an old process's exit and the next restart")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()

    raiseFileLimit(1000)
    info = machineInfo()
    printMachineInfo(info)
    print(
        f"server: twist txgrace --app {APP} (defaults: probation 5 s, idle grace 5 s, "
        f"handoff on); {options.runs} runs x {options.restarts} restarts per transport"
    )
    figures: dict[str, Any] = {"machine": info, "options": vars(options), "transports": {}}
    results: dict[str, dict[str, Row]] = {}
    directory = tempfile.mkdtemp(prefix="txgrace-clients-")
    try:
        for name in options.transports.split(","):
            name = name.strip()
            transport = Transport(name, directory)
            rows = {key: Row() for key, _ in ROWS}
            results[name] = rows
            details: dict[str, Any] = {"runs": [], "backlog": [], "idle": []}
            print(f"\n{name}: {transport.endpoint.split(':privateKey')[0]}")
            for run in range(options.runs):
                label = f"{name} run {run + 1}"
                details["runs"].append(
                    restartRun(transport, rows, options.restarts, options.stream_duration,
                               options.pause, label)
                )
                backlog = backlogRun(transport, rows["backlog"], options.connections)
                details["backlog"].append(backlog)
                print(
                    f"    {label} backlog: {options.connections} connects in "
                    f"{backlog['connect_seconds'] * 1000:.0f} ms while stopped, "
                    f"accept queue {backlog['queued_before_sigterm']} before SIGTERM, "
                    f"exit status {backlog['exit_status']}"
                )
                idle = idleRun(transport, rows["idle"], options.connections)
                details["idle"].append(idle)
                print(
                    f"    {label} idle: all {options.connections} accepted before SIGTERM: "
                    f"{idle['accepted']}, exit status {idle['exit_status']}"
                )
            reports = [r for run in details["runs"] for r in run["reports"]]
            if reports:
                print(
                    f"    restart reports: {len(reports)}; connections handed off "
                    f"{sum(r['handedOff'] or 0 for r in reports)}, drained "
                    f"{sum(r['drained'] or 0 for r in reports)}, aborted "
                    f"{sum(r['aborted'] or 0 for r in reports)}; ready -> old exit median "
                    f"{statistics.median(r['readyToExit'] for r in reports):.2f} s"
                )
            keepAliveReconnects = {
                key: rows[key].reconnects
                for key in ("keepalive-0.3", "keepalive-1.1", "keepalive-2.0", "pipelined")
            }
            print(f"    new connections the long-running clients had to open: {keepAliveReconnects}")
            details["rows"] = {key: rows[key].asDict() for key, _ in ROWS}
            details["reconnects"] = keepAliveReconnects
            figures["transports"][name] = details
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    printTable(results, options.runs, options.restarts)
    writeJSON(options.json, figures)


if __name__ == "__main__":
    main()
