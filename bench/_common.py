"""
Shared helpers of the benchmarks in this directory: machine information,
the repository root, exact process-exit timing, and log-event lookups.
"""

from __future__ import annotations

import json
import os
import platform
import select
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    # Use the txgrace of this checkout, as the server processes do (they run
    # with the repository root as their working directory).
    sys.path.insert(0, ROOT)

APP = "txgrace.test._apps.site"
HOST = "127.0.0.1"


def machineInfo() -> dict[str, Any]:
    """
    What the figures were measured on: the machine, the software (with the
    git revision of this checkout, and whether txgrace/ has uncommitted
    changes) and the command that printed them.
    """
    import resource

    import twisted

    import txgrace

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        head = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--", "txgrace"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        revision = head + (" (txgrace/ has uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        revision = "?"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "twisted": twisted.__version__,
        "txgrace": revision,
        "txgracePath": os.path.dirname(txgrace.__file__),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "loadavg": os.getloadavg(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def printMachineInfo(info: dict[str, Any]) -> None:
    print(f"command:  {info['command']}  (cwd {os.getcwd()})")
    print(
        f"machine:  nproc={info['nproc']}  cpu={info['cpu']}  "
        f"kernel={info['kernel']}  loadavg={info['loadavg'][0]:.2f} at start"
    )
    print(
        f"software: python {info['python']}  Twisted {info['twisted']}  "
        f"txgrace {info['txgrace']} from {info['txgracePath']}  "
        f"RLIMIT_NOFILE={info['nofile_limit']}"
    )
    sys.stdout.flush()


class ExitWatch:
    """
    Notes the moment a child process exits, to the millisecond, without
    reaping it: a pidfd (Linux 5.3+) becomes readable when the process ends.
    Falls back to a thread blocked in C{Popen.wait()} (not C{wait(timeout)},
    which polls up to every 50 ms).
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        self.exitedAt: float | None = None
        self._pidfd: int | None = None
        self._thread = None
        try:
            self._pidfd = os.pidfd_open(process.pid)  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            import threading

            def waiter() -> None:
                process.wait()
                self.exitedAt = time.monotonic()

            self._thread = threading.Thread(target=waiter, daemon=True)
            self._thread.start()

    def wait(self, timeout: float) -> float | None:
        """
        Wait up to C{timeout} seconds for the exit.

        @return: The C{time.monotonic()} of the exit, or L{None}.
        """
        if self._pidfd is not None:
            if self.exitedAt is None:
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                if poller.poll(max(0, int(timeout * 1000))):
                    self.exitedAt = time.monotonic()
                    os.close(self._pidfd)
                    self._pidfd = None
                    self._reap()
            return self.exitedAt
        assert self._thread is not None
        self._thread.join(timeout)
        return self.exitedAt

    def _reap(self) -> None:
        # wait4() rather than Popen.wait(), for the child's CPU time.
        if self._process.returncode is not None:
            return
        try:
            _, status, usage = os.wait4(self._process.pid, 0)
        except ChildProcessError:
            self._process.wait(10)
            return
        self._process.returncode = os.waitstatus_to_exitcode(status)
        self.cpuSeconds = usage.ru_utime + usage.ru_stime

    cpuSeconds: float | None = None
    """
    The child's total CPU time (user + system), once reaped by the pidfd path.
    """

    def fileno(self) -> int | None:
        return self._pidfd


def cpuSeconds(pid: int) -> float | None:
    """
    The user + system CPU time C{pid} has used so far.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    # Fields 14 and 15 of stat(5); fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def eventsMatching(server: Any, namespace: str, key: str) -> list[dict[str, Any]]:
    with server._condition:
        events = list(server.events)
    return [
        e for e in events if e.get("log_namespace") == namespace and key in e
    ]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def writeJSON(path: str | None, data: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        print(f"figures written to {path}")
