"""
Steady-state overhead of grace: ports against plain Twisted ports.

The same Site (a 13-byte static body) is served on tcp:PORT and on
grace:tcp:PORT (and on ssl: and grace:ssl:), each by a fresh server process
(bench/_serve.py), and loaded in turn A B A B (plain, grace, plain, grace) by
wrk, with keep-alive and with "Connection: close".  Prints requests/s of
both, the ratio grace/plain, and whether it meets the target (>= 0.97).

    .venv/bin/python bench/overhead.py           # about 3 minutes
    .venv/bin/python bench/overhead.py --duration 10 --rounds 5 --json out.json

wrk (the Debian package) is installed with apt-get if it is missing.  Only
127.0.0.1 is used.  This is a benchmark: it prints figures and exits 0
whether the target is met or not (non-zero only if a run failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from _common import machineInfo, printMachineInfo

from txgrace.testing import writeSelfSignedCertificate

HERE = os.path.dirname(os.path.abspath(__file__))
SERVE = os.path.join(HERE, "_serve.py")
TARGET = 0.97
CASES = [
    # name, endpoint type, "Connection: close"?
    ("tcp keep-alive", "tcp", False),
    ("tcp close", "tcp", True),
    ("ssl keep-alive", "ssl", False),
    ("ssl close", "ssl", True),
]


def ensureWrk() -> str:
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    print("wrk is missing: apt-get install -y wrk", flush=True)
    subprocess.run(
        "apt-get update -qq && apt-get install -y -qq wrk",
        shell=True,
        check=True,
        env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
    )
    wrk = shutil.which("wrk")
    if not wrk:
        raise SystemExit("wrk is still missing after apt-get install")
    return wrk


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def innerEndpoint(scheme: str, keyPath: str, certPath: str) -> str:
    if scheme == "tcp":
        return "tcp:0:interface=127.0.0.1"
    return (
        f"ssl:0:interface=127.0.0.1:privateKey={_escape(keyPath)}"
        f":certKey={_escape(certPath)}"
    )


class Server:
    """
    One bench/_serve.py process, started by us and stopped by its pid.
    """

    def __init__(self, mode: str, endpoint: str, logPath: str) -> None:
        self.mode = mode
        self._log = open(logPath, "ab")
        self.process = subprocess.Popen(
            [sys.executable, SERVE, mode, endpoint],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
        )
        self.port = self._waitListening()

    def _waitListening(self, timeout: float = 30.0) -> int:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(
                f"{self.mode} server did not start (said {line!r}); see {self._log.name}"
            )
        port = int(line.split()[1])
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.mode} server on port {port} not reachable")
                time.sleep(0.05)

    def cpuSeconds(self) -> float:
        """
        User + system CPU time the server process has used so far.
        """
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
        return self.process.returncode


_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(\w+),", re.M)
_WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_WRK_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_WRK_STATUS = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def runWrk(
    wrk: str, url: str, threads: int, connections: int, seconds: int, close: bool
) -> dict[str, Any]:
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
    if close:
        command += ["-H", "Connection: close"]
    command.append(url)
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    out = result.stdout
    rps = _WRK_RPS.search(out)
    if result.returncode != 0 or rps is None:
        raise RuntimeError(
            f"wrk failed ({result.returncode}): {shlex.join(command)}\n{out}{result.stderr}"
        )
    requests = _WRK_REQUESTS.search(out)
    socketErrors = _WRK_SOCKET.search(out)
    status = _WRK_STATUS.search(out)
    return {
        "rps": float(rps.group(1)),
        "requests": int(requests.group(1)) if requests else None,
        "socketErrors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, socketErrors.groups()))
        )
        if socketErrors
        else {"connect": 0, "read": 0, "write": 0, "timeout": 0},
        "non2xx": int(status.group(1)) if status else 0,
        "command": shlex.join(command),
    }


def busySeconds() -> float:
    """
    CPU seconds the whole machine has spent busy (all CPUs, every process).
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...  (A process's
    # own CPU time includes some of the softirq time its traffic causes.)
    busy = fields[0] + fields[1] + fields[2] + sum(fields[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


def childrenCpuSeconds() -> float:
    """
    CPU seconds of this process's reaped children (wrk runs, stopped servers).
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def waitForQuiet(limit: float, threshold: float = 0.10) -> float:
    """
    Wait up to C{limit} seconds for a second in which the machine is less
    than C{threshold} busy.  Returns the busy fraction last seen.
    """
    deadline = time.monotonic() + limit
    cpus = os.cpu_count() or 1
    while True:
        before = busySeconds()
        time.sleep(1)
        load = (busySeconds() - before) / cpus
        if load < threshold or time.monotonic() >= deadline:
            return load


def spread(values: list[float]) -> float:
    """
    (max - min) / mean of repeated runs of one server: the run-to-run noise.
    """
    return (max(values) - min(values)) / mean(values) if len(values) > 1 else 0.0


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="whole seconds per measured wrk run (5)")
    parser.add_argument("--warmup", type=int, default=1, help="whole seconds of wrk warm-up per server, discarded; 0 for none (1)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1: leave the server a core)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--rounds", type=int, default=3, help="A B pairs per case (3: A B A B A B)")
    parser.add_argument(
        "--case",
        action="append",
        choices=[c[0].replace(" ", "-") for c in CASES],
        help="run only this case (repeatable; default all four)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the machine to be < 10%% busy (0: don't)",
    )
    parser.add_argument(
        "--txgrace",
        metavar="DIR",
        help="directory holding the txgrace package to measure (default: this checkout)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1, --warmup at least 0")

    if args.txgrace:
        os.environ["TXGRACE_BENCH_SOURCE"] = os.path.abspath(args.txgrace)
    wrk = ensureWrk()
    info = machineInfo()
    if args.txgrace:
        info["txgrace"] = "from --txgrace"
        info["txgracePath"] = os.environ["TXGRACE_BENCH_SOURCE"]
    wrkVersion = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout
    info["wrk"] = (wrkVersion.splitlines() or ["?"])[0].strip()
    printMachineInfo(info)
    print(info["wrk"])
    print(
        f"load: wrk -t{args.threads} -c{args.connections}, {args.warmup:g} s warm-up + "
        f"{args.duration:g} s measured per run, {args.rounds} x (plain, grace) per case, "
        "a fresh server per run; TLS: self-signed ECDSA P-256"
    )
    print(flush=True)

    selected = [c for c in CASES if not args.case or c[0].replace(" ", "-") in args.case]
    tmp = tempfile.mkdtemp(prefix="txgrace-bench-")
    serverLog = os.path.join(tmp, "servers.log")
    keyPath, certPath = writeSelfSignedCertificate(tmp)
    results: list[dict[str, Any]] = []
    failed = False
    try:
        for name, scheme, close in selected:
            endpoint = innerEndpoint(scheme, keyPath, certPath)
            runs: dict[str, list[dict[str, Any]]] = {"plain": [], "grace": []}
            for pair in range(args.rounds):
                for mode in ("plain", "grace"):
                    if args.wait_quiet > 0:
                        waitForQuiet(args.wait_quiet)
                    server = Server(mode, endpoint, serverLog)
                    try:
                        url = f"{'https' if scheme == 'ssl' else 'http'}://127.0.0.1:{server.port}/"
                        if args.warmup > 0:
                            runWrk(wrk, url, args.threads, args.connections, args.warmup, close)
                        cpuBefore = server.cpuSeconds()
                        busyBefore = busySeconds()
                        wrkBefore = childrenCpuSeconds()
                        wallBefore = time.monotonic()
                        run = runWrk(wrk, url, args.threads, args.connections, args.duration, close)
                        wall = time.monotonic() - wallBefore
                        cpu = server.cpuSeconds() - cpuBefore
                        wrkCpu = childrenCpuSeconds() - wrkBefore
                        # CPU used meanwhile by processes other than this
                        # server and wrk, as a share of the whole machine.
                        other = busySeconds() - busyBefore - cpu - wrkCpu
                        otherLoad = max(other, 0.0) / ((os.cpu_count() or 1) * wall)
                    finally:
                        status = server.stop()
                    run["serverCpuSeconds"] = round(cpu, 3)
                    run["serverCpuPerRequestUs"] = (
                        round(cpu / run["requests"] * 1e6, 2) if run["requests"] else None
                    )
                    run["wrkCpuSeconds"] = round(wrkCpu, 3)
                    run["otherLoad"] = round(otherLoad, 3)
                    run["serverExit"] = status
                    runs[mode].append(run)
                    errors = sum(run["socketErrors"].values()) + run["non2xx"]
                    print(
                        f"  {name:<15} {mode:<5} run {pair + 1}: {run['rps']:>9.1f} req/s"
                        f"  server cpu {run['serverCpuPerRequestUs']:>6.1f} us/req"
                        f"  other load {run['otherLoad'] * 100:3.0f}%"
                        + (f"  errors {run['socketErrors']} non-2xx {run['non2xx']}" if errors else ""),
                        flush=True,
                    )
            plain = mean([r["rps"] for r in runs["plain"]])
            grace = mean([r["rps"] for r in runs["grace"]])
            ratio = grace / plain if plain else float("nan")
            results.append(
                {
                    "case": name,
                    "plainRps": round(plain, 1),
                    "graceRps": round(grace, 1),
                    "ratio": round(ratio, 4),
                    "target": TARGET,
                    "met": ratio >= TARGET,
                    "plainCpuPerRequestUs": round(
                        mean([r["serverCpuPerRequestUs"] for r in runs["plain"]]), 2
                    ),
                    "graceCpuPerRequestUs": round(
                        mean([r["serverCpuPerRequestUs"] for r in runs["grace"]]), 2
                    ),
                    "spread": round(
                        max(spread([r["rps"] for r in runs["plain"]]),
                            spread([r["rps"] for r in runs["grace"]])),
                        3,
                    ),
                    "otherLoadMax": round(
                        max(r["otherLoad"] for r in runs["plain"] + runs["grace"]), 3
                    ),
                    "runs": runs,
                }
            )
    except Exception as e:
        failed = True
        print(f"\nbenchmark failed: {e}\nserver log: {serverLog}", file=sys.stderr)
    finally:
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    printTable(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": info["command"],
                    "machine": info,
                    "options": vars(args),
                    "target": TARGET,
                    "cases": results,
                    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                },
                f,
                indent=2,
            )
        print(f"\nfigures written to {args.json}")
    return 1 if failed else 0


def printTable(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'case':<15} {'plain req/s (runs)':<30} {'grace req/s (runs)':<30} "
        f"{'grace/plain':>11}  {'target >= 0.97':<14}  {'spread':>6}  "
        f"{'cpu us/req plain/grace':>22}  {'other load':>10}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        def cell(mode: str, value: float) -> str:
            each = ", ".join(f"{x['rps']:.0f}" for x in r["runs"][mode])
            return f"{value:.0f} ({each})"

        print(
            f"{r['case']:<15} {cell('plain', r['plainRps']):<30} {cell('grace', r['graceRps']):<30} "
            f"{r['ratio']:>11.3f}  {'met' if r['met'] else 'missed':<14}  "
            f"{r['spread'] * 100:5.0f}%  "
            f"{r['plainCpuPerRequestUs']:>10.1f} / {r['graceCpuPerRequestUs']:<9.1f}"
            f"  {r['otherLoadMax'] * 100:9.0f}%"
        )
    busiest = max((r["otherLoadMax"] for r in results), default=0.0)
    noisiest = max((r["spread"] for r in results), default=0.0)
    print(
        "\nratio = mean grace req/s / mean plain req/s.  spread: the larger of (max - min) / mean\n"
        "over the plain runs and over the grace runs, i.e. run-to-run noise of the same server.\n"
        "cpu us/req: the server's user+system CPU time per request (lower is better).\n"
        "other load: the most CPU that processes other than the server and wrk used during a\n"
        "measured run, as a share of the machine."
    )
    if noisiest > 1 - TARGET:
        print(
            f"NOTE: runs of the same server differ by up to {noisiest * 100:.0f}%, more than the "
            f"{(1 - TARGET) * 100:.0f}% the target allows:\n"
            "a met/missed verdict from these runs is within noise.  More --rounds help."
        )
    if busiest > 0.05:
        print(
            f"WARNING: other processes used up to {busiest * 100:.0f}% of the machine during the runs;\n"
            "with that much competition a few per cent between plain and grace cannot be\n"
            "resolved.  Rerun on a quiet machine, or with --wait-quiet 60 and more --rounds."
        )


if __name__ == "__main__":
    sys.exit(main())
