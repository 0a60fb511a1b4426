"""
Crash benchmark for txgrace (prints figures; not a pass/fail test): what
clients see when a server dies instead of handing over.

  (a) C{kill -9} of the serving process under load, then a start as
      systemd's C{Restart=always} would make it (after C{--restart-delay}):
      without the fd store (a fresh socket on the same port) and with it
      (the stand-in for systemd from C{txgrace/test/test_fdstore.py} keeps
      the socket and passes it back).
  (b) A successor that dies one second after it is ready
      (C{exit-1s-after-ready}, the test switch of C{txgrace/test/_apps.py}):
      with the default probation (the old process serves again), and with
      C{--probation 0} (nothing listens once the old process has drained;
      a supervisor then starts the server again after C{--restart-delay},
      without the fd store, as C{Restart=on-failure} would).

For each crash: the requests refused, the other failed requests, and the
time from the crash to the first request answered after it.  The clients
(C{txgrace.testing.HTTPLoad}, closed loop, half keep-alive, no retries)
send the next request as soon as one fails, so "refused" counts attempts,
not clients.

Run from the repository root:

    .venv/bin/python bench/crash.py [--crashes 3] [--clients 8]
        [--restart-delay 0.1] [--json FILE]

Everything listens on 127.0.0.1 only; every server process is started here
and killed by pid (ServerProcess.kill) if it is still alive at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import APP, HOST, ROOT, machineInfo, printMachineInfo, writeJSON  # noqa: E402

from txgrace.test.test_fdstore import FakeSystemd  # noqa: E402
from txgrace.testing import HTTPLoad, ServerProcess, isAlive, waitUntil  # noqa: E402

FAULT = "exit-1s-after-ready"
_PID = re.compile(rb"pid (\d+)")


class TimedLoad(HTTPLoad):
    """
    L{HTTPLoad} that also notes when each request was answered, to find the
    first answer after a crash.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.answers: list[tuple[float, int]] = []

    def _count(self, status: int | None, body: bytes, kind: str | None) -> None:
        super()._count(status, body, kind)
        match = _PID.search(body)
        if kind is None and status == 200 and match:
            with self._lock:
                self.answers.append((time.monotonic(), int(match.group(1))))

    def firstAnswerAfter(self, moment: float, dead: int) -> float | None:
        """
        The first time after C{moment} that a request was answered by
        another process than C{dead} (whose last responses may still be on
        their way when it dies), or L{None}.
        """
        with self._lock:
            later = [t for t, pid in self.answers if t > moment and pid != dead]
        return min(later) if later else None

    def snapshot(self) -> Counter[str]:
        """
        The failures so far, by kind.
        """
        with self._lock:
            return Counter(self.result.failures)


def waitForExit(pid: int, timeout: float = 30.0) -> float:
    """
    Wait until C{pid} (any process, not only a child) has exited.

    @return: The C{time.monotonic()} of the exit, to the millisecond.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return time.monotonic()
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            raise RuntimeError(f"pid {pid} still alive after {timeout}s")
        return time.monotonic()
    finally:
        os.close(pidfd)


def arguments(port: int, *extra: str) -> list[str]:
    return ["--endpoint", f"grace:tcp:{port}:interface={HOST}", "--app", APP, *extra]


def crashFigures(
    load: TimedLoad, before: Counter[str], crashedAt: float, dead: int, settle: float
) -> dict[str, Any]:
    """
    Wait C{settle} seconds after the first answer following the crash (of
    pid C{dead}), and count what failed since C{before}.
    """
    first = None
    deadline = time.monotonic() + 30
    while first is None and time.monotonic() < deadline:
        time.sleep(0.01)
        first = load.firstAnswerAfter(crashedAt, dead)
    time.sleep(settle)
    failures = load.snapshot() - before
    return {
        "refused": failures.get("refused", 0),
        "other_failed": sum(failures.values()) - failures.get("refused", 0),
        "failures": dict(failures),
        "first_answer_ms": None if first is None else (first - crashedAt) * 1000,
    }


def benchKill(crashes: int, clients: int, restartDelay: float, store: bool) -> list[dict[str, Any]]:
    """
    (a): C{kill -9} of the serving process, then a start after
    C{restartDelay}, with or without the fd store.
    """
    directory = tempfile.mkdtemp(prefix="txgrace-crash-")
    systemd = FakeSystemd(directory) if store else None
    servers: list[ServerProcess] = []

    def start(port: int) -> ServerProcess:
        server = (
            systemd.start(arguments(port)) if systemd is not None
            else ServerProcess(arguments(port), cwd=ROOT)
        )
        servers.append(server)
        return server

    runs = []
    try:
        server = start(0)
        serving = server.waitServing(1, timeout=60)
        port = serving.port()
        if systemd is not None and not systemd.waitStored(1):
            raise RuntimeError("the socket was never stored")
        load = TimedLoad(HOST, port, clients=clients)
        load.start()
        try:
            for _ in range(crashes):
                waitUntil(lambda: load.result.ok > 200, 30)
                time.sleep(0.5)
                before = load.snapshot()
                crashedAt = time.monotonic()
                dead = serving.pid
                os.kill(dead, signal.SIGKILL)
                waitForExit(dead)
                time.sleep(restartDelay)
                server = start(port)
                serving = server.waitServing(1, timeout=60)
                runs.append(crashFigures(load, before, crashedAt, dead, 0.5))
        finally:
            load.stop()
    finally:
        for server in servers:
            server.kill()
        if systemd is not None:
            systemd.close()
        shutil.rmtree(directory, ignore_errors=True)
    return runs


def benchSuccessorDies(
    crashes: int, clients: int, restartDelay: float, probation: bool
) -> list[dict[str, Any]]:
    """
    (b): a restart whose successor dies 1 s after it is ready, with the
    default probation, or with C{--probation 0} and a supervisor that starts
    the server again.
    """
    directory = tempfile.mkdtemp(prefix="txgrace-crash-")
    fault = os.path.join(directory, "fault")
    environment = dict(os.environ, TXGRACE_TEST_FAULT=fault)
    extra = () if probation else ("--probation", "0")
    servers: list[ServerProcess] = []

    def start(port: int) -> ServerProcess:
        server = ServerProcess(arguments(port, *extra), env=environment, cwd=ROOT)
        servers.append(server)
        return server

    runs = []
    try:
        server = start(0)
        serving = server.waitServing(1, timeout=60)
        port = serving.port()
        load = TimedLoad(HOST, port, clients=clients)
        load.start()
        try:
            for _ in range(crashes):
                waitUntil(lambda: load.result.ok > 200, 30)
                time.sleep(0.5)
                with open(fault, "w") as f:
                    f.write(FAULT)
                since = server.eventCount()
                os.kill(serving.pid, signal.SIGHUP)
                ready = server.waitForMessage(r"Successor pid \d+ is ready", 60, since)
                successor = ready["successor"]
                os.unlink(fault)
                before = load.snapshot()
                crashedAt = waitForExit(successor)
                if not probation:
                    # Nothing listens: a supervisor starts the server again.
                    waitForExit(serving.pid)
                    time.sleep(restartDelay)
                    server = start(port)
                    serving = server.waitServing(1, timeout=60)
                runs.append(crashFigures(load, before, crashedAt, successor, 0.5))
                if probation and not isAlive(serving.pid):
                    raise RuntimeError(f"pid {serving.pid} did not serve again")
        finally:
            load.stop()
    finally:
        for server in servers:
            server.kill()
        shutil.rmtree(directory, ignore_errors=True)
    return runs


def report(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    refused = [r["refused"] for r in runs]
    other = [r["other_failed"] for r in runs]
    first = [r["first_answer_ms"] for r in runs if r["first_answer_ms"] is not None]
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["failures"])
    figures = {
        "runs": runs,
        "refused_per_crash": statistics.mean(refused),
        "other_failed_per_crash": statistics.mean(other),
        "first_answer_ms_median": statistics.median(first) if first else None,
        "first_answer_ms_max": max(first) if first else None,
    }
    print(
        f"    {label}: refused per crash {figures['refused_per_crash']:.1f} "
        f"({', '.join(map(str, refused))}); other failed per crash "
        f"{figures['other_failed_per_crash']:.1f}; crash -> "
        f"first answer median {figures['first_answer_ms_median']:.0f} ms "
        f"(max {figures['first_answer_ms_max']:.0f})\n"
        f"        all failures, by kind: {dict(kinds) or 'none'}"
        if first
        else f"    {label}: no answer after the crash"
    )
    sys.stdout.flush()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=3, help="crashes per case")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--restart-delay", type=float, default=0.1,
                        help="seconds before a supervisor starts the server again "
                        "(systemd's RestartSec= default is 100 ms)")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args()
    info = machineInfo()
    printMachineInfo(info)
    figures: dict[str, Any] = {"machine": info, "options": vars(options)}
    cases: list[tuple[str, str, Callable[[], list[dict[str, Any]]]]] = [
        ("kill_without_store", "(a) kill -9, restarted without the fd store",
         lambda: benchKill(options.crashes, options.clients, options.restart_delay, False)),
        ("kill_with_store", "(a) kill -9, restarted with the fd store",
         lambda: benchKill(options.crashes, options.clients, options.restart_delay, True)),
        ("successor_dies_probation", "(b) successor dies 1 s after ready, default probation",
         lambda: benchSuccessorDies(options.crashes, options.clients, options.restart_delay, True)),
        ("successor_dies_no_probation",
         "(b) successor dies 1 s after ready, --probation 0, supervisor restart",
         lambda: benchSuccessorDies(options.crashes, options.clients, options.restart_delay, False)),
    ]
    print(
        f"\n{options.clients} closed-loop clients, {options.crashes} crashes per case, "
        f"restart delay {options.restart_delay:g} s"
    )
    for key, label, run in cases:
        figures[key] = report(label, run())
    writeJSON(options.json, figures)


if __name__ == "__main__":
    main()
