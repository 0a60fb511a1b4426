"""
Handoff benchmark for txgrace (prints figures; not a pass/fail test).

  (a) 1,000 and 10,000 idle keep-alive HTTP/1.1 connections at a restart:
      the time the old process takes to hand them all to the successor
      (from its "Successor pid N is ready; pid M hands over" event to its
      "Drained ... handed off N" event, and to its exit; goal: 10,000 in
      under 1 s), the successor's memory (VmRSS) before and after it took
      them, and whether each connection is then answered by the successor.
  (b) 50 restarts under load (closed-loop HTTPLoad clients, and keep-alive
      PacedClients sending every 0.3, 1.1 and 2.0 s): how many connections
      the server closed (responses with Connection: close to keep-alive
      clients, plus failed requests); goal: 0 on plain TCP.  The same again
      with --no-handoff, for comparison.

Run from the repository root:

    PYTHONPATH=. .venv/bin/python bench/handoff.py [--connections 1000,10000]
        [--restarts 50] [--skip-idle] [--skip-restarts] [--json FILE]

Everything listens on 127.0.0.1 only; every server process is started here
and killed by pid (ServerProcess.kill) if it is still alive at the end.
"""

from __future__ import annotations

import argparse
import os
import select
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    APP,
    HOST,
    ROOT,
    cpuSeconds,
    machineInfo,
    printMachineInfo,
    writeJSON,
)
from drain import ResponseParser, openIdleConnections, raiseFileLimit  # noqa: E402

from txgrace.testing import (  # noqa: E402
    HTTPLoad,
    PacedClient,
    ServerProcess,
    Serving,
    isAlive,
    waitUntil,
)

PACED_INTERVALS = (0.3, 1.1, 2.0)


def startServer(*extra: str) -> tuple[ServerProcess, Serving]:
    server = ServerProcess(
        [
            "--endpoint",
            f"grace:tcp:0:interface={HOST}",
            "--app",
            APP,
            "--hammer-timeout",
            "30",
            *extra,
        ],
        cwd=ROOT,
    )
    return server, server.waitServing(1, timeout=60)


def eventsSince(server: ServerProcess, since: int) -> list[dict[str, Any]]:
    """
    The log events of every generation since the C{since}th.
    """
    with server._condition:
        return list(server.events[since:])


def rssKilobytes(pid: int) -> int | None:
    """
    C{pid}'s resident set size (C{VmRSS} in C{/proc/PID/status}), in kB.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def restart(server: ServerProcess, current: Serving, timeout: float = 60.0) -> Serving:
    """
    SIGHUP the serving process; wait for its successor to be ready and for
    it to exit.
    """
    server.signal(signal.SIGHUP, current.pid)
    successor = server.waitServing(current.generation + 1, timeout)
    if not waitUntil(lambda: not isAlive(current.pid), timeout):
        raise RuntimeError(f"pid {current.pid} did not exit after the handover")
    return successor


class PidExit:
    """
    The wall-clock moment (C{time.time()}, as log events' C{log_time}) a
    process exits, not necessarily a child of this one: a pidfd (Linux 5.3+)
    becomes readable when it ends.  Falls back to polling every 5 ms.
    """

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass

    def wait(self, timeout: float) -> float | None:
        """
        @return: When it exited, or L{None} if it is still alive after
            C{timeout} seconds.
        """
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            ready = poller.poll(max(0, int(timeout * 1000)))
            at = time.time()
            os.close(self._pidfd)
            self._pidfd = None
            return at if ready else None
        if waitUntil(lambda: not isAlive(self._pid), timeout, step=0.005):
            return time.time()
        return None


def requestOnAll(connections: list[socket.socket], timeout: float) -> Counter[str]:
    """
    Send one GET on each connection at once and read the responses.

    @return: How many were answered by each pid (C{"pid N"}), closed
        (C{"eof"}, C{"reset"}), not answered in time (C{"timeout"}), or
        answered with C{Connection: close} (C{"close"}, counted on top).
    """
    request = f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode("ascii")
    outcome: Counter[str] = Counter()
    selector = selectors.DefaultSelector()
    for skt in connections:
        try:
            skt.setblocking(True)
            skt.sendall(request)
        except OSError:
            outcome["send failed"] += 1
            continue
        skt.setblocking(False)
        selector.register(skt, selectors.EVENT_READ, ResponseParser())
    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            skt = key.fileobj  # type: ignore[assignment]
            try:
                chunk = skt.recv(65536)
            except ConnectionResetError:
                outcome["reset"] += 1
                selector.unregister(skt)
                continue
            if not chunk:
                outcome["eof"] += 1
                selector.unregister(skt)
                continue
            parser: ResponseParser = key.data
            if parser.feed(chunk):
                selector.unregister(skt)
                body = parser.data.partition(b"\r\n\r\n")[2]
                words = body.split()
                outcome[f"pid {words[-1].decode()}" if parser.status == 200 else f"status {parser.status}"] += 1
                if parser.close:
                    outcome["close"] += 1
    outcome["timeout"] += len(selector.get_map())
    selector.close()
    return outcome


# (a) idle connections handed off


def benchIdle(count: int, window: int) -> dict[str, Any]:
    print(f"\n(a) {count} idle keep-alive connections, then SIGHUP")
    server, first = startServer()
    connections: list[socket.socket] = []
    try:
        # A successor that took nothing, to measure "before" on.
        empty = restart(server, first)
        time.sleep(0.5)
        rssBefore = rssKilobytes(empty.pid)
        cpuEmpty = cpuSeconds(empty.pid)
        t0 = time.monotonic()
        connections, failures = openIdleConnections(empty.port(), count, window, 180)
        print(
            f"    opened {len(connections)} connections with one request each in "
            f"{time.monotonic() - t0:.2f} s (setup failures: {failures or 'none'})"
        )
        time.sleep(0.5)
        rssOld = rssKilobytes(empty.pid)
        since = server.eventCount()
        oldExit = PidExit(empty.pid)
        signalled = time.time()
        server.signal(signal.SIGHUP, empty.pid)
        # The old process's CPU time, sampled until it exits: its last
        # sample is within 10 ms of the end.
        oldCPU = cpuSeconds(empty.pid)
        cpuOld: float | None = oldCPU
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sample = cpuSeconds(empty.pid)
            if sample is None or not isAlive(empty.pid):
                break
            cpuOld = sample
            time.sleep(0.01)
        successor = server.waitServing(empty.generation + 1, 60)
        exitedAt = oldExit.wait(60)
        rssAtExit = rssKilobytes(successor.pid)
        cpuSuccessor = cpuSeconds(successor.pid)
        time.sleep(0.5)
        rssAfter = rssKilobytes(successor.pid)
        events = eventsSince(server, since)
        handsOver = [
            e for e in events
            if e.get("log_namespace") == "txgrace.lifecycle"
            and e.get("successor") == successor.pid and e.get("pid") == empty.pid
        ]
        drained = [
            e for e in events
            if e.get("log_namespace") == "txgrace.drain" and "handedOff" in e
        ]
        start = handsOver[0]["log_time"] if handsOver else None
        drainedEvent = drained[0] if drained else None
        outcome = requestOnAll(connections, 60)
        result: dict[str, Any] = {
            "connections": count,
            "opened": len(connections),
            "setup_failures": failures,
            "sighup_to_ready_s": None if start is None else start - signalled,
            "ready_to_drained_s": (
                None if start is None or drainedEvent is None
                else drainedEvent["log_time"] - start
            ),
            "ready_to_exit_s": None if start is None or exitedAt is None else exitedAt - start,
            "drained": None if drainedEvent is None else {
                k: drainedEvent.get(k) for k in ("opened", "handedOff", "aborted", "failed", "seconds")
            },
            "rss_successor_before_kB": rssBefore,
            "rss_successor_at_old_exit_kB": rssAtExit,
            "rss_successor_after_kB": rssAfter,
            "rss_old_with_connections_kB": rssOld,
            "cpu_old_sighup_to_exit_s": (
                None if oldCPU is None or cpuOld is None else cpuOld - oldCPU
            ),
            "cpu_successor_at_old_exit_s": cpuSuccessor,
            "cpu_empty_successor_s": cpuEmpty,
            "next_request": dict(outcome),
            "successor_pid": successor.pid,
        }
        seconds = result["ready_to_drained_s"]
        result["met"] = seconds is not None and seconds < 1.0 and count <= 10_000
        if drainedEvent is not None:
            print(
                f"    old pid {empty.pid}: Drained {drainedEvent['opened']} connections "
                f"in {drainedEvent['seconds']}s: handed off {drainedEvent['handedOff']}, "
                f"aborted {drainedEvent['aborted']}, failed {drainedEvent['failed']}"
            )
        if start is not None:
            print(f"    SIGHUP -> 'is ready; pid {empty.pid} hands over': {result['sighup_to_ready_s'] * 1000:.0f} ms")
        if seconds is not None:
            print(
                f"    'hands over' -> 'Drained': {seconds * 1000:.0f} ms "
                f"(goal for 10,000: < 1000 ms)"
            )
        if result["ready_to_exit_s"] is not None:
            print(f"    'hands over' -> old pid exited: {result['ready_to_exit_s'] * 1000:.0f} ms")
        if None not in (rssBefore, rssAfter):
            assert rssBefore is not None and rssAfter is not None
            print(
                f"    successor VmRSS: {rssBefore} kB before (a successor that took "
                f"nothing), {rssAtExit} kB when the old pid exited, {rssAfter} kB "
                f"0.5 s later: +{rssAfter - rssBefore} kB, "
                f"{(rssAfter - rssBefore) * 1024 / max(1, len(connections)):.0f} B per connection"
            )
        print(f"    old process VmRSS with the connections: {rssOld} kB")
        if None not in (oldCPU, cpuOld, cpuSuccessor, cpuEmpty):
            assert oldCPU is not None and cpuOld is not None
            assert cpuSuccessor is not None and cpuEmpty is not None
            print(
                f"    CPU time (user+sys, 10 ms resolution): old process "
                f"SIGHUP -> exit {(cpuOld - oldCPU) * 1000:.0f} ms; successor "
                f"{cpuSuccessor * 1000:.0f} ms from its start to the old pid's "
                f"exit, against {cpuEmpty * 1000:.0f} ms for a successor that "
                f"took nothing"
            )
        print(f"    one more request on each connection: {dict(outcome)}")
        return result
    finally:
        for skt in connections:
            skt.close()
        server.kill()


# (b) restarts under load


def benchRestarts(restarts: int, pause: float, handoff: bool) -> dict[str, Any]:
    name = "handoff" if handoff else "--no-handoff"
    print(f"\n(b) {restarts} restarts under load, {name}")
    server, serving = startServer(*(() if handoff else ("--no-handoff",)))
    port = serving.port()
    load = paced = None
    try:
        since = server.eventCount()
        paced = [PacedClient(HOST, port, interval).start() for interval in PACED_INTERVALS]
        load = HTTPLoad(HOST, port, clients=4).start()
        pids = [serving.pid]
        started = time.monotonic()
        for _ in range(restarts):
            time.sleep(pause)
            serving = restart(server, serving)
            pids.append(serving.pid)
        time.sleep(max(PACED_INTERVALS) + 0.5)
        elapsed = time.monotonic() - started
        result = load.stop()
        load = None
        for client in paced:
            client.stop()
        drained = [
            e for e in eventsSince(server, since)
            if e.get("log_namespace") == "txgrace.drain" and "handedOff" in e
        ]
        pacedCloses = sum(c.closes for c in paced)
        pacedFailures = [f for c in paced for f in c.failures]
        closed = result.closedByServer + pacedCloses + result.failed + len(pacedFailures)
        figures: dict[str, Any] = {
            "handoff": handoff,
            "restarts": restarts,
            "seconds": elapsed,
            "load_ok": result.ok,
            "load_failures": dict(result.failures),
            "load_closed_by_server": result.closedByServer,
            "paced": [
                {
                    "interval": interval,
                    "requests": len(c.pids),
                    "closes": c.closes,
                    "failures": c.failures,
                    "connections": len(c.localPorts),
                }
                for interval, c in zip(PACED_INTERVALS, paced)
            ],
            "closed_by_server_total": closed,
            "handed_off": sum(e["handedOff"] for e in drained),
            "drained_connections": sum(e["opened"] for e in drained),
            "aborted": sum(e["aborted"] for e in drained),
            "pids_served": len(set(result.pids) & set(pids)),
            "generations": len(pids),
        }
        print(
            f"    {restarts} restarts in {elapsed:.0f} s; load: {result.ok} ok, "
            f"failed {dict(result.failures) or 0}, keep-alive connections closed by "
            f"the server {result.closedByServer}"
        )
        for entry in figures["paced"]:
            print(
                f"    paced every {entry['interval']} s: {entry['requests']} requests, "
                f"{entry['closes']} Connection: close, failures {entry['failures'] or 0}, "
                f"{entry['connections']} connection(s)"
            )
        print(
            f"    server: {figures['drained_connections']} connections at handovers, "
            f"handed off {figures['handed_off']}, aborted {figures['aborted']}; "
            f"{figures['pids_served']} of {len(pids)} pids served the load"
        )
        print(
            f"    connections closed by the server (closedByServer + paced closes "
            f"+ failures): {closed}"
            + (" (goal 0: met)" if handoff and closed == 0 else " (goal 0: MISSED)" if handoff else "")
        )
        return figures
    finally:
        if load is not None:
            load.stop()
        for client in paced or ():
            client.stop()
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="1000,10000",
                        help="comma-separated counts of idle connections for (a)")
    parser.add_argument("--window", type=int, default=40,
                        help="connections in progress at once while opening")
    parser.add_argument("--restarts", type=int, default=50)
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds between one restart's end and the next SIGHUP")
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-restarts", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()

    counts = [int(c) for c in options.connections.split(",") if c]
    needed = max(counts, default=0)
    limit = raiseFileLimit(needed + 1000)
    info = machineInfo()
    printMachineInfo(info)
    if limit[0] < needed + 200:
        sys.exit(f"RLIMIT_NOFILE {limit} is too low for {needed} connections")
    figures: dict[str, Any] = {"machine": info}
    if not options.skip_idle:
        figures["idle"] = [benchIdle(count, options.window) for count in counts]
    if not options.skip_restarts:
        figures["restarts"] = [
            benchRestarts(options.restarts, options.pause, handoff)
            for handoff in (True, False)
        ]
    writeJSON(options.json, figures)


if __name__ == "__main__":
    main()
