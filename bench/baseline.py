"""
Restarts under load against the baseline: plain Twisted, restarted the only
way it can be (SIGTERM, then start it again on the same port), next to
`twist txgrace` restarted with SIGHUP.  Both serve the same Site
(bench/_serve.py) to the same load as bench/restart.py (closed-loop asyncio
clients, half keep-alive, half a new connection per request, no retries),
one after the other in one run.

    .venv/bin/python bench/baseline.py [--restarts 10] [--json FILE]

Prints the failed requests of each kind, per restart, for both.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from _common import ROOT, machineInfo, printMachineInfo, writeJSON
from restart import KINDS, AsyncLoad, freePort, serverEnvironment

from txgrace.testing import isAlive, waitUntil

HOST = "127.0.0.1"


def waitListening(port: int, timeout: float = 30.0) -> None:
    """
    Wait until something accepts on C{port}.
    """

    def accepts() -> bool:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
        except OSError:
            return False
        return True

    if not waitUntil(accepts, timeout):
        raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout:g}s")


def startPlain(port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "bench", "_serve.py"), "plain", f"tcp:{port}:interface={HOST}"],
        stdout=subprocess.DEVNULL,
        env=serverEnvironment(),
        cwd=ROOT,
    )
    waitListening(port)
    return server


def startGrace(port: int, pidFile: str) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "twist"),
            "txgrace",
            "--pidfile",
            pidFile,
            "--endpoint",
            f"grace:tcp:{port}:interface={HOST}",
            "--app",
            "bench._serve.makeSite",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=serverEnvironment(),
        cwd=ROOT,
    )
    waitListening(port)
    return server


def measure(
    name: str,
    start: Callable[[int], subprocess.Popen[bytes]],
    restart: Callable[[Any], Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """
    Load a server started by C{start}, restart it C{args.restarts} times
    with C{restart}, and count what the clients saw.
    """
    port = freePort()
    first = start(port)
    state: dict[str, Any] = {"process": first, "pid": first.pid, "port": port}
    load = AsyncLoad(port, args.connections, 0.5, args.timeout).start()
    time.sleep(1.0)
    began = time.monotonic()
    for _ in range(args.restarts):
        restart(state)
        time.sleep(args.pause)
    elapsed = time.monotonic() - began
    stats = load.stop()
    os.kill(state["pid"], signal.SIGTERM)
    waitUntil(lambda: not isAlive(state["pid"]), 30)
    failed = sum(stats.failures.values())
    return {
        "name": name,
        "restarts": args.restarts,
        "ok": stats.ok,
        "failures": {kind: stats.failures.get(kind, 0) for kind in KINDS},
        "failed": failed,
        "failedPerRestart": failed / args.restarts,
        "seconds": elapsed,
    }


def restartPlain(state: dict[str, Any]) -> None:
    state["process"].send_signal(signal.SIGTERM)
    state["process"].wait(30)
    state["process"] = startPlain(state["port"])
    state["pid"] = state["process"].pid


def restartGrace(pidFile: str, state: dict[str, Any]) -> None:
    old = state["pid"]
    os.kill(old, signal.SIGHUP)
    # The pidfile names the successor once it is ready; the old process
    # exits once it has drained.
    if not waitUntil(lambda: _readPid(pidFile) != old, 60):
        raise RuntimeError(f"pid {old} did not hand over within 60s")
    if not waitUntil(lambda: not isAlive(old), 60):
        raise RuntimeError(f"pid {old} did not exit within 60s of its handover")
    if state["process"] is not None:
        state["process"].wait(5)
        state["process"] = None
    state["pid"] = _readPid(pidFile)


def _readPid(pidFile: str) -> int | None:
    try:
        with open(pidFile) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--restarts", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=5.0, help="per socket op")
    parser.add_argument("--pause", type=float, default=0.5, help="after each restart")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    info = machineInfo()
    printMachineInfo(info)
    print(
        f"load: {args.connections} closed-loop clients (half keep-alive), no retries; "
        f"{args.restarts} restarts each, {args.pause:g}s apart\n"
    )
    directory = tempfile.mkdtemp(prefix="txgrace-baseline-")
    pidFile = os.path.join(directory, "grace.pid")
    try:
        results = [
            measure("plain Twisted, SIGTERM + start", startPlain, restartPlain, args),
            measure(
                "twist txgrace, SIGHUP",
                functools.partial(startGrace, pidFile=pidFile),
                functools.partial(restartGrace, pidFile),
                args,
            ),
        ]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"{'server':34s} {'ok':>8s} {'failed':>7s} {'per restart':>12s}  by kind")
    for result in results:
        kinds = ", ".join(f"{k} {v}" for k, v in result["failures"].items() if v) or "-"
        print(
            f"{result['name']:34s} {result['ok']:8d} {result['failed']:7d} "
            f"{result['failedPerRestart']:12.1f}  {kinds}"
        )
    writeJSON(args.json, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
