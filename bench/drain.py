"""
Drain benchmark for txgrace (prints figures; not a pass/fail test).

  (a) 10,000 idle keep-alive HTTP/1.1 connections, each quiet for longer
      than the drain's idle grace (5 s; quieter ones are kept until then):
      the time from SIGTERM until the server process exits (target < 1 s),
      and how many clients saw a clean EOF.
  (b) One in-flight request (/sleep?duration=2) when SIGTERM arrives: the
      time from the client receiving the complete response (T) until the
      process exits (target <= 50 ms), repeated and summarised.

Run from the repository root:

    .venv/bin/python bench/drain.py [--connections 10000]
        [--repeats 5] [--json FILE]

Everything listens on 127.0.0.1 only; every server process is started here
and killed by pid (ServerProcess.kill) if it is still alive at the end.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import selectors
import signal
import socket
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    APP,
    HOST,
    cpuSeconds,
    ROOT,
    ExitWatch,
    eventsMatching,
    machineInfo,
    printMachineInfo,
    summary,
    writeJSON,
)

from txgrace.testing import ServerProcess  # noqa: E402


def raiseFileLimit(needed: int) -> tuple[int, int]:
    """
    Raise RLIMIT_NOFILE to the hard limit, so that the server (a child)
    inherits it too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(needed, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def startServer(hammerTimeout: float) -> tuple[ServerProcess, int, int]:
    server = ServerProcess(
        [
            "--endpoint",
            f"grace:tcp:0:interface={HOST}",
            "--app",
            APP,
            "--hammer-timeout",
            str(hammerTimeout),
        ],
        cwd=ROOT,
    )
    serving = server.waitServing(1, timeout=60)
    return server, serving.pid, serving.port()


class ResponseParser:
    """
    Incremental HTTP/1.1 response reader: Content-Length or chunked bodies.
    """

    def __init__(self) -> None:
        self.data = b""
        self.status: int | None = None
        self.close = False

    def feed(self, chunk: bytes) -> bool:
        """
        Add bytes; return whether the response is complete.
        """
        self.data += chunk
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return False
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self.close = headers.get(b"connection", b"").lower() == b"close"
        if b"content-length" in headers:
            return len(body) >= int(headers[b"content-length"])
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            rest = body
            while True:
                size, sep, rest = rest.partition(b"\r\n")
                if not sep:
                    return False
                length = int(size.split(b";")[0], 16)
                if length == 0:
                    return rest.startswith(b"\r\n") or b"\r\n\r\n" in rest
                if len(rest) < length + 2:
                    return False
                rest = rest[length + 2 :]
        return False  # until EOF: the caller decides


# (a) idle keep-alive connections


def openIdleConnections(
    port: int, count: int, window: int, timeout: float
) -> tuple[list[socket.socket], dict[str, int]]:
    """
    Open C{count} connections, at most C{window} in progress at a time, and
    make one keep-alive request on each, reading its whole response.

    @return: The idle connections and counts of the failures.
    """
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode("ascii")
    selector = selectors.DefaultSelector()
    done: list[socket.socket] = []
    failures: dict[str, int] = {}
    started = 0
    inProgress = 0
    deadline = time.monotonic() + timeout

    def fail(skt: socket.socket, kind: str) -> None:
        nonlocal inProgress
        failures[kind] = failures.get(kind, 0) + 1
        selector.unregister(skt)
        skt.close()
        inProgress -= 1

    while len(done) + sum(failures.values()) < count:
        if time.monotonic() > deadline:
            failures["setup_timeout"] = count - len(done) - sum(failures.values())
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
            break
        while started < count and inProgress < window:
            skt = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            skt.setblocking(False)
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = skt.connect_ex((HOST, port))
            if code not in (0, errno.EINPROGRESS):
                failures["connect_" + errno.errorcode.get(code, str(code))] = (
                    failures.get("connect_" + errno.errorcode.get(code, str(code)), 0)
                    + 1
                )
                skt.close()
                started += 1
                continue
            selector.register(skt, selectors.EVENT_WRITE, ["connecting", None])
            started += 1
            inProgress += 1
        for key, _ in selector.select(timeout=0.5):
            skt = key.fileobj  # type: ignore[assignment]
            state = key.data
            if state[0] == "connecting":
                code = skt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(skt, "connect_" + errno.errorcode.get(code, str(code)))
                    continue
                try:
                    sent = skt.send(request)
                except OSError:
                    fail(skt, "send")
                    continue
                if sent != len(request):
                    fail(skt, "short_send")
                    continue
                state[0], state[1] = "reading", ResponseParser()
                selector.modify(skt, selectors.EVENT_READ, state)
            else:
                try:
                    chunk = skt.recv(65536)
                except OSError:
                    fail(skt, "reset")
                    continue
                if not chunk:
                    fail(skt, "eof_before_response")
                    continue
                parser: ResponseParser = state[1]
                if parser.feed(chunk):
                    if parser.status != 200 or parser.close:
                        fail(skt, "bad_response")
                        continue
                    selector.unregister(skt)
                    inProgress -= 1
                    done.append(skt)
    selector.close()
    return done, failures


def benchIdle(count: int, quiet: float, window: int) -> dict[str, Any]:
    print(f"\n(a) {count} idle keep-alive connections, quiet {quiet} s, then SIGTERM")
    server, pid, port = startServer(hammerTimeout=30)
    try:
        t0 = time.monotonic()
        connections, failures = openIdleConnections(port, count, window, 120)
        setup = time.monotonic() - t0
        print(
            f"    opened {len(connections)} connections with one request each in "
            f"{setup:.2f} s (setup failures: {failures or 'none'})"
        )
        serverFDs = len(os.listdir(f"/proc/{pid}/fd"))
        print(f"    server pid {pid} has {serverFDs} fds open")
        time.sleep(quiet)

        selector = selectors.DefaultSelector()
        for skt in connections:
            selector.register(skt, selectors.EVENT_READ)
        watch = ExitWatch(server.process)
        exitFD = watch.fileno()
        if exitFD is not None:
            # The exit is noted as soon as it happens, even mid-EOFs.
            selector.register(exitFD, selectors.EVENT_READ, "exit")
        outcome = {"eof": 0, "reset": 0, "unexpected_data": 0, "still_open": 0}
        lastClose = None
        cpuBefore = cpuSeconds(pid)
        termWall = time.time()
        termAt = time.monotonic()
        server.signal(signal.SIGTERM, pid)
        deadline = termAt + 60
        remaining = len(connections)
        exitedAt = None
        while (remaining or exitedAt is None) and time.monotonic() < deadline:
            if exitedAt is None:
                exitedAt = watch.wait(0)
            if not remaining:
                exitedAt = watch.wait(max(0.0, deadline - time.monotonic()))
                break
            for key, _ in selector.select(timeout=0.05):
                if key.data == "exit":
                    selector.unregister(key.fileobj)
                    exitedAt = watch.wait(0)
                    continue
                skt = key.fileobj
                try:
                    chunk = skt.recv(65536)  # type: ignore[union-attr]
                except ConnectionResetError:
                    kind = "reset"
                else:
                    kind = "eof" if not chunk else "unexpected_data"
                outcome[kind] += 1
                selector.unregister(skt)
                skt.close()  # type: ignore[union-attr]
                remaining -= 1
                lastClose = time.monotonic()
        outcome["still_open"] = remaining
        for key in list(selector.get_map().values()):
            if key.data == "exit":
                selector.unregister(key.fileobj)
            else:
                key.fileobj.close()  # type: ignore[union-attr]
        selector.close()
        if exitedAt is None:
            exitedAt = watch.wait(1)
        status = server.process.poll()
        exitSeconds = None if exitedAt is None else exitedAt - termAt

        draining = eventsMatching(server, "txgrace.drain", "count")
        drained = eventsMatching(server, "txgrace.drain", "opened")
        breakdown = {}
        if draining:
            breakdown["sigterm_to_drain_start_ms"] = (
                draining[-1]["log_time"] - termWall
            ) * 1000
        if drained:
            breakdown["drain_logged_seconds"] = drained[-1]["seconds"]
            breakdown["sigterm_to_drained_ms"] = (
                drained[-1]["log_time"] - termWall
            ) * 1000
            if exitSeconds is not None:
                breakdown["drained_to_exit_ms"] = (
                    exitSeconds * 1000 - breakdown["sigterm_to_drained_ms"]
                )
        shutdownCPU = None
        if watch.cpuSeconds is not None and cpuBefore is not None:
            shutdownCPU = watch.cpuSeconds - cpuBefore
        result = {
            "connections": count,
            "server_cpu_sigterm_to_exit_seconds": shutdownCPU,
            "opened": len(connections),
            "setup_failures": failures,
            "setup_seconds": setup,
            "server_fds_before": serverFDs,
            "sigterm_to_exit_seconds": exitSeconds,
            "last_client_close_after_sigterm_seconds": (
                None if lastClose is None else lastClose - termAt
            ),
            "client_outcomes": outcome,
            "exit_status": status,
            "server_log": breakdown,
            "target_seconds": 1.0,
            "met": exitSeconds is not None and exitSeconds < 1.0,
        }
        if draining:
            print(f"    server: Draining {draining[-1]['count']} connections")
        if drained:
            print(
                f"    server: Drained {drained[-1]['opened']} connections in "
                f"{drained[-1]['seconds']}s, aborted {drained[-1]['aborted']}"
            )
        if breakdown:
            print(
                "    from the server's log timestamps: SIGTERM -> 'Draining' "
                f"{breakdown.get('sigterm_to_drain_start_ms', float('nan')):.0f} ms, "
                f"SIGTERM -> 'Drained' {breakdown.get('sigterm_to_drained_ms', float('nan')):.0f} ms, "
                f"'Drained' -> process exit {breakdown.get('drained_to_exit_ms', float('nan')):.0f} ms"
            )
        print(
            f"    client outcomes: {outcome['eof']} clean EOF, {outcome['reset']} "
            f"reset, {outcome['unexpected_data']} unexpected data, "
            f"{outcome['still_open']} still open"
        )
        if lastClose is not None:
            print(f"    last client EOF after SIGTERM: {(lastClose - termAt) * 1000:.0f} ms")
        print(f"    exit status: {status}")
        if shutdownCPU is not None:
            print(
                f"    server CPU time (user+sys) from SIGTERM to exit: "
                f"{shutdownCPU * 1000:.0f} ms (10 ms resolution)"
            )
        if exitSeconds is None:
            print("    SIGTERM -> process exit: did not exit within 60 s")
        else:
            print(
                f"    SIGTERM -> process exit: {exitSeconds * 1000:.0f} ms "
                f"(target < 1000 ms: {'met' if result['met'] else 'MISSED'})"
            )
        return result
    finally:
        server.kill()


# (b) one in-flight request


def benchInFlight(sleep: float, after: float) -> dict[str, Any]:
    server, pid, port = startServer(hammerTimeout=30)
    try:
        skt = socket.create_connection((HOST, port), timeout=30)
        skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        watch = ExitWatch(server.process)
        requestAt = time.monotonic()
        skt.sendall(
            f"GET /sleep?duration={sleep} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
        )
        time.sleep(after)
        termAt = time.monotonic()
        server.signal(signal.SIGTERM, pid)
        parser = ResponseParser()
        completeAt = completeWall = eofAt = None
        deadline = time.monotonic() + sleep + 30
        while time.monotonic() < deadline:
            chunk = skt.recv(65536)
            now = time.monotonic()
            if not chunk:
                eofAt = now
                break
            if completeAt is None and parser.feed(chunk):
                completeAt, completeWall = now, time.time()
        skt.close()
        exitedAt = watch.wait(30)
        drained = eventsMatching(server, "txgrace.drain", "opened")
        result: dict[str, Any] = {
            "status": parser.status,
            "connection_close": parser.close,
            "sigterm_after_request_s": termAt - requestAt,
            "response_after_sigterm_s": None if completeAt is None else completeAt - termAt,
            "eof_after_T_ms": None
            if eofAt is None or completeAt is None
            else (eofAt - completeAt) * 1000,
            "exit_after_T_ms": None
            if exitedAt is None or completeAt is None
            else (exitedAt - completeAt) * 1000,
            "exit_status": server.process.poll(),
        }
        if drained and completeWall is not None:
            result["drained_logged_after_T_ms"] = (
                drained[-1]["log_time"] - completeWall
            ) * 1000
        return result
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--quiet", type=float, default=5.5,
                        help="seconds the connections stay idle before SIGTERM")
    parser.add_argument("--window", type=int, default=40,
                        help="connections in progress at once while opening")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-inflight", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()

    limit = raiseFileLimit(options.connections + 1000)
    info = machineInfo()
    printMachineInfo(info)
    if limit[0] < options.connections + 200:
        sys.exit(f"RLIMIT_NOFILE {limit} is too low for {options.connections} connections")
    figures: dict[str, Any] = {"machine": info}

    if not options.skip_idle:
        figures["idle"] = benchIdle(options.connections, options.quiet, options.window)

    if not options.skip_inflight:
        print(
            f"\n(b) one in-flight /sleep?duration=2, SIGTERM after 0.5 s; "
            f"T = complete response at the client; {options.repeats} runs"
        )
        runs = []
        for i in range(options.repeats):
            run = benchInFlight(2.0, 0.5)
            runs.append(run)
            extra = ""
            if "drained_logged_after_T_ms" in run:
                extra = f", 'Drained' logged at T{run['drained_logged_after_T_ms']:+.1f} ms"
            print(
                f"    run {i + 1}: status {run['status']}"
                f"{' (Connection: close)' if run['connection_close'] else ''}, "
                f"response {run['response_after_sigterm_s']:.3f} s after SIGTERM, "
                f"EOF at T+{run['eof_after_T_ms']:.1f} ms{extra}, "
                f"exit at T+{run['exit_after_T_ms']:.1f} ms, exit status {run['exit_status']}"
            )
        values = [r["exit_after_T_ms"] for r in runs if r["exit_after_T_ms"] is not None]
        stats = summary(values) if values else {}
        met = bool(values) and stats["median"] <= 50
        if values:
            print(
                f"    exit - T: median {stats['median']:.1f} ms, min {stats['min']:.1f}, "
                f"max {stats['max']:.1f} (target <= 50 ms: {'met' if met else 'MISSED'}"
                f"{'' if max(values) <= 50 else '; max over target'})"
            )
        figures["inflight"] = {
            "runs": runs,
            "exit_after_T_ms": stats,
            "target_ms": 50,
            "met": met,
        }
    writeJSON(options.json, figures)


if __name__ == "__main__":
    main()
