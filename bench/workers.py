"""
Master mode on many cores: throughput of `twist txgrace --workers 2` against
`--workers 1`, how evenly the workers share the load, and how long one whole
rolling restart takes against the workers' cold start.

    .venv/bin/python bench/workers.py [--duration 8] [--connections 64] [--json FILE]

Targets (issue 7, on 2 cores): N=2 >= 1.4x N=1 with keep-alive and >= 1.1x
with Connection: close; every worker serves at least 30% of the requests.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from typing import Any

from _common import ROOT, machineInfo, printMachineInfo, writeJSON
from overhead import ensureWrk, runWrk

from txgrace.testing import HTTPLoad, ServerProcess

APP = "bench._serve.makeSite"


def startMaster(workers: int, app: str = APP) -> tuple[ServerProcess, int, list[int]]:
    """
    Start the master with C{workers} workers serving C{app}.
    """
    server = ServerProcess(
        ["--workers", str(workers), "--endpoint", "grace:tcp:0:interface=127.0.0.1",
         "--app", app],
        cwd=ROOT,
    )
    ready = server.waitForMessage("Master pid .* serving", 60)
    port = int(ready["addresses"].rsplit(":", 1)[1])
    return server, port, [int(p) for p in ready["pids"].split(", ")]


def cpuTicks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def stop(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    try:
        server.wait(60)
    finally:
        server.kill()


def throughput(wrk: str, workers: int, close: bool, args: argparse.Namespace) -> dict[str, Any]:
    """
    One wrk run against a fresh master with C{workers} workers; the share of
    CPU each worker used stands for its share of the requests.
    """
    server, port, pids = startMaster(workers)
    try:
        url = f"http://127.0.0.1:{port}/"
        runWrk(wrk, url, 1, args.connections, 2, close)  # warm-up
        before = {pid: cpuTicks(pid) for pid in pids}
        result = runWrk(wrk, url, 1, args.connections, args.duration, close)
        used = {pid: cpuTicks(pid) - before[pid] for pid in pids}
        total = sum(used.values()) or 1
        result["cpuShare"] = {str(pid): used[pid] / total for pid in pids}
        return result
    finally:
        stop(server)


def requestShare(args: argparse.Namespace) -> dict[str, Any]:
    """
    Which worker answered each request, counted from the responses: 16
    closed-loop clients, half on a new connection per request.
    """
    # This app says which pid answered; the benchmark Site does not.
    server, port, pids = startMaster(2, "txgrace.test._apps.site")
    try:
        load = HTTPLoad("127.0.0.1", port, clients=16).start()
        time.sleep(args.duration)
        result = load.stop()
    finally:
        stop(server)
    return {
        "ok": result.ok,
        "failures": dict(result.failures),
        "share": {str(pid): result.pids[pid] / max(result.ok, 1) for pid in pids},
    }


def rollTimes(args: argparse.Namespace) -> dict[str, Any]:
    """
    Time whole rolling restarts of two workers, and each worker's cold
    start (spawned -> ready, from the logs).
    """
    server, port, pids = startMaster(2)
    rolls = []
    try:
        for _ in range(args.rolls):
            since = server.eventCount()
            started = time.time()
            server.signal(signal.SIGHUP)
            done = server.waitFor(
                lambda e: e.get("log_format", "").startswith("Rolling restart done"),
                120,
                since,
            )
            rolls.append(done["log_time"] - started)
            time.sleep(0.5)
        spawned: dict[int, float] = {}
        cold = []
        for event in list(server.events):
            fmt = event.get("log_format", "")
            if fmt.startswith("Started {kind} pid"):
                spawned[event["pid"]] = event["log_time"]
            elif fmt.startswith("Serving ") and event.get("pid") in spawned:
                cold.append(event["log_time"] - spawned[event["pid"]])
    finally:
        stop(server)
    return {"rolls": rolls, "workerColdStarts": cold}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rolls", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    info = machineInfo()
    printMachineInfo(info)
    wrk = ensureWrk()
    figures: dict[str, Any] = {"machine": info, "modes": {}}
    print(f"\nwrk -t1 -c{args.connections} -d{args.duration}s, order N=1 N=2 N=1 N=2")
    for mode, close in (("keep-alive", False), ("Connection: close", True)):
        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for workers in (1, 2, 1, 2):
            runs[workers].append(throughput(wrk, workers, close, args))
        one = statistics.mean(r["rps"] for r in runs[1])
        two = statistics.mean(r["rps"] for r in runs[2])
        shares = [min(r["cpuShare"].values()) for r in runs[2]]
        target = 1.4 if not close else 1.1
        figures["modes"][mode] = {
            "N=1": [r["rps"] for r in runs[1]],
            "N=2": [r["rps"] for r in runs[2]],
            "ratio": two / one,
            "smallestWorkerShare": shares,
            "errors": [r["socketErrors"] for r in runs[1] + runs[2]],
        }
        print(
            f"  {mode:18} N=1 {one:8.0f} req/s  N=2 {two:8.0f} req/s  "
            f"ratio {two / one:.2f} (target >= {target}: "
            f"{'met' if two / one >= target else 'MISSED'})  "
            f"smallest worker share {min(shares):.0%} (target >= 30%: "
            f"{'met' if min(shares) >= 0.3 else 'MISSED'})"
        )
    share = requestShare(args)
    figures["requestShare"] = share
    smallest = min(share["share"].values())
    print(
        f"\nrequests answered by each of 2 workers (16 closed-loop clients, half "
        f"keep-alive): {', '.join(f'{v:.0%}' for v in share['share'].values())} of "
        f"{share['ok']} (target >= 30% each: {'met' if smallest >= 0.3 else 'MISSED'}), "
        f"failures {share['failures'] or 0}"
    )
    times = rollTimes(args)
    figures["roll"] = times
    roll = statistics.median(times["rolls"])
    cold = statistics.median(times["workerColdStarts"])
    print(
        f"\nrolling restart of 2 workers: median {roll * 1000:.0f} ms over "
        f"{len(times['rolls'])} rolls; worker cold start median {cold * 1000:.0f} ms; "
        f"roll / (2 x cold start) = {roll / (2 * cold):.2f}"
    )
    writeJSON(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
