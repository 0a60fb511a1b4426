"""
Websocket drain benchmark for txgrace (prints figures; not a pass/fail test).

10,000 idle websockets (Twisted's own C{WebSocketResource}, the app
C{txgrace.test._apps.webSocketSite}), then SIGTERM, twice: at the default
pace (C{--drain-rate} not given: 500 closes a second) and unpaced
(C{--drain-rate 0}).  For each: the time from SIGTERM until the server
process exits, how the close frames (code 1001) spread over time at the
clients, and the server's CPU time from SIGTERM to exit.

The clients are one non-blocking selector loop in this process: each
answers the server's close frame with its own at once, as a browser does,
and then waits for the server to close the TCP connection.

Run from the repository root:

    .venv/bin/python bench/websockets.py [--connections 10000] [--json FILE]

Everything listens on 127.0.0.1 only; every server process is started here
and killed by pid (ServerProcess.kill) if it is still alive at the end.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    HOST,
    ROOT,
    ExitWatch,
    cpuSeconds,
    eventsMatching,
    machineInfo,
    printMachineInfo,
    writeJSON,
)
from drain import raiseFileLimit  # noqa: E402

from txgrace.testing import ServerProcess  # noqa: E402

APP = "txgrace.test._apps.webSocketSite"
PATH = "/ws"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key; any will do.


@dataclass
class Client:
    """
    One websocket client's state.
    """

    skt: socket.socket
    state: str = "connecting"
    buffer: bytes = b""
    closeCode: int | None = None
    closedAt: float | None = None
    endedAt: float | None = None
    end: str | None = None
    extra: list[str] = field(default_factory=list)


def closeFrame(code: int) -> bytes:
    """
    A masked client close frame with C{code}.
    """
    mask = os.urandom(4)
    payload = code.to_bytes(2, "big")
    return bytes([0x88, 0x80 | len(payload)]) + mask + bytes(
        b ^ mask[i % 4] for i, b in enumerate(payload)
    )


def frames(client: Client) -> list[tuple[int, bytes]]:
    """
    Take the complete server frames (unmasked) out of C{client.buffer}.
    """
    found = []
    data = client.buffer
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            if len(data) < 4:
                break
            length, offset = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            if len(data) < 10:
                break
            length, offset = int.from_bytes(data[2:10], "big"), 10
        if len(data) < offset + length:
            break
        found.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    client.buffer = data
    return found


def openWebSockets(
    port: int, count: int, window: int, timeout: float
) -> tuple[list[Client], Counter[str]]:
    """
    Open C{count} websockets, at most C{window} handshakes at a time.

    @return: The open clients and counts of the failures.
    """
    request = (
        f"GET {PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode("ascii")
    selector = selectors.DefaultSelector()
    done: list[Client] = []
    failures: Counter[str] = Counter()
    started = inProgress = 0
    deadline = time.monotonic() + timeout

    def fail(client: Client, kind: str) -> None:
        nonlocal inProgress
        failures[kind] += 1
        selector.unregister(client.skt)
        client.skt.close()
        inProgress -= 1

    while len(done) + sum(failures.values()) < count:
        if time.monotonic() > deadline:
            failures["setup_timeout"] += count - len(done) - sum(failures.values())
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
                key.data.skt.close()
            break
        while started < count and inProgress < window:
            skt = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            skt.setblocking(False)
            skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = skt.connect_ex((HOST, port))
            started += 1
            if code not in (0, errno.EINPROGRESS):
                failures["connect_" + errno.errorcode.get(code, str(code))] += 1
                skt.close()
                continue
            selector.register(skt, selectors.EVENT_WRITE, Client(skt))
            inProgress += 1
        for key, _ in selector.select(timeout=0.5):
            client: Client = key.data
            if client.state == "connecting":
                code = client.skt.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(client, "connect_" + errno.errorcode.get(code, str(code)))
                    continue
                try:
                    client.skt.sendall(request)
                except OSError:
                    fail(client, "send")
                    continue
                client.state = "handshake"
                selector.modify(client.skt, selectors.EVENT_READ, client)
                continue
            try:
                chunk = client.skt.recv(65536)
            except OSError:
                fail(client, "reset")
                continue
            if not chunk:
                fail(client, "eof_before_handshake")
                continue
            client.buffer += chunk
            head, separator, rest = client.buffer.partition(b"\r\n\r\n")
            if not separator:
                continue
            if not head.startswith(b"HTTP/1.1 101"):
                fail(client, "no_upgrade")
                continue
            client.buffer, client.state = rest, "open"
            selector.unregister(client.skt)
            inProgress -= 1
            done.append(client)
    selector.close()
    return done, failures


def awaitCloses(
    clients: list[Client], watch: ExitWatch, deadline: float
) -> float | None:
    """
    Answer every server close frame with a close frame, note when each
    arrives and how each connection ends, until all have ended and the
    server has exited, or C{deadline}.

    @return: When the server exited (monotonic), or L{None}.
    """
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.skt, selectors.EVENT_READ, client)
    exitFD = watch.fileno()
    if exitFD is not None:
        selector.register(exitFD, selectors.EVENT_READ, None)
    remaining = len(clients)
    exitedAt = None
    while (remaining or exitedAt is None) and time.monotonic() < deadline:
        if exitedAt is None:
            exitedAt = watch.wait(0)
        if not remaining:
            exitedAt = watch.wait(max(0.0, deadline - time.monotonic()))
            break
        for key, _ in selector.select(timeout=0.05):
            client = key.data
            if client is None:
                selector.unregister(key.fileobj)
                exitedAt = watch.wait(0)
                continue
            now = time.monotonic()
            try:
                chunk = client.skt.recv(65536)
            except ConnectionResetError:
                chunk, client.end = b"", "reset"
            if chunk:
                client.buffer += chunk
                for opcode, payload in frames(client):
                    if opcode == 0x8 and client.closedAt is None:
                        client.closedAt = now
                        client.closeCode = (
                            int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                        )
                        try:
                            client.skt.sendall(closeFrame(client.closeCode or 1000))
                        except OSError:
                            pass
                    elif opcode != 0x8:
                        client.extra.append(hex(opcode))
                continue
            client.end = client.end or ("eof" if client.closedAt is not None else "eof_without_close")
            client.endedAt = now
            selector.unregister(client.skt)
            client.skt.close()
            remaining -= 1
    for key in list(selector.get_map().values()):
        if key.data is not None:
            key.data.end = "still_open"
            key.data.skt.close()
    selector.close()
    if exitedAt is None:
        exitedAt = watch.wait(1)
    return exitedAt


def benchDrain(count: int, drainRate: str | None, quiet: float, window: int) -> dict[str, Any]:
    pace = "default pace" if drainRate is None else f"--drain-rate {drainRate}"
    print(f"\n{count} idle websockets ({APP}), {pace}, then SIGTERM")
    arguments = [
        "--endpoint", f"grace:tcp:0:interface={HOST}", "--app", APP,
        "--hammer-timeout", "120",
    ]
    if drainRate is not None:
        arguments += ["--drain-rate", drainRate]
    server = ServerProcess(arguments, cwd=ROOT)
    try:
        serving = server.waitServing(1, timeout=60)
        pid, port = serving.pid, serving.port()
        t0 = time.monotonic()
        clients, failures = openWebSockets(port, count, window, 300)
        setup = time.monotonic() - t0
        print(
            f"    opened {len(clients)} websockets in {setup:.1f} s "
            f"(setup failures: {dict(failures) or 'none'})"
        )
        time.sleep(quiet)
        watch = ExitWatch(server.process)
        cpuBefore = cpuSeconds(pid)
        termWall = time.time()
        termAt = time.monotonic()
        server.signal(signal.SIGTERM, pid)
        exitedAt = awaitCloses(clients, watch, termAt + 180)
        status = server.process.poll()
        exitSeconds = None if exitedAt is None else exitedAt - termAt
        cpu = None
        if watch.cpuSeconds is not None and cpuBefore is not None:
            cpu = watch.cpuSeconds - cpuBefore
        codes = Counter(str(c.closeCode) for c in clients)
        ends = Counter(c.end for c in clients)
        closes = sorted(c.closedAt - termAt for c in clients if c.closedAt is not None)
        perSecond = Counter(int(t) for t in closes)
        drained = eventsMatching(server, "txgrace.drain", "opened")
        draining = eventsMatching(server, "txgrace.drain", "count")
        result: dict[str, Any] = {
            "connections": count,
            "drain_rate": drainRate or "default",
            "opened": len(clients),
            "setup_failures": dict(failures),
            "setup_seconds": setup,
            "sigterm_to_exit_seconds": exitSeconds,
            "exit_status": status,
            "server_cpu_sigterm_to_exit_seconds": cpu,
            "close_codes": dict(codes),
            "connection_ends": dict(ends),
            "first_close_after_sigterm_seconds": closes[0] if closes else None,
            "last_close_after_sigterm_seconds": closes[-1] if closes else None,
            "closes_per_second": {str(k): v for k, v in sorted(perSecond.items())},
            "most_closes_in_a_second": max(perSecond.values()) if perSecond else 0,
        }
        if draining:
            result["sigterm_to_drain_start_ms"] = (draining[-1]["log_time"] - termWall) * 1000
        if drained:
            result["drain_logged_seconds"] = drained[-1]["seconds"]
            result["drain_aborted"] = drained[-1]["aborted"]
        print(f"    close codes at the clients: {dict(codes)}; ends: {dict(ends)}")
        if closes:
            print(
                f"    close frames from {closes[0] * 1000:.0f} ms to "
                f"{closes[-1] * 1000:.0f} ms after SIGTERM; most in one second "
                f"(counted from SIGTERM): {result['most_closes_in_a_second']}"
            )
        if drained:
            print(
                f"    server: Drained {drained[-1]['opened']} connections in "
                f"{drained[-1]['seconds']}s, aborted {drained[-1]['aborted']}"
            )
        print(f"    exit status: {status}")
        if exitSeconds is None:
            print("    SIGTERM -> process exit: did not exit within 180 s")
        else:
            print(f"    SIGTERM -> process exit: {exitSeconds * 1000:.0f} ms")
        if cpu is not None and exitSeconds:
            print(
                f"    server CPU (user+sys) from SIGTERM to exit: {cpu * 1000:.0f} ms "
                f"({100 * cpu / exitSeconds:.0f}% of one core over the drain; "
                "10 ms resolution)"
            )
        return result
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--quiet", type=float, default=1.0,
                        help="seconds the websockets stay idle before SIGTERM")
    parser.add_argument("--window", type=int, default=40,
                        help="handshakes in progress at once while opening")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()

    limit = raiseFileLimit(options.connections + 1000)
    info = machineInfo()
    printMachineInfo(info)
    if limit[0] < options.connections + 200:
        sys.exit(f"RLIMIT_NOFILE {limit} is too low for {options.connections} connections")
    figures: dict[str, Any] = {"machine": info}
    figures["default_pace"] = benchDrain(options.connections, None, options.quiet, options.window)
    figures["unpaced"] = benchDrain(options.connections, "0", options.quiet, options.window)
    writeJSON(options.json, figures)


if __name__ == "__main__":
    main()
