# -*- test-case-name: txgrace.test.test_command -*-
"""
C{python -m txgrace restart --pidfile P}: restart a running server and wait
for the outcome, for deploy scripts and C{systemctl reload}
(C{ExecReload=}).

It reads the pid from the pidfile, sends the restart signal, and waits for
the server's record of that restart beside the pidfile (see
L{txgrace.pidfile.writeRestartStatus}).  It prints the new pid and exits 0
once the successor (or, in master mode, the new workers) took over, or
prints the reason and exits 1 when the restart failed, was refused, or did
not finish in time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from txgrace.pidfile import readRestartStatus
from txgrace.settings import SettingError, parseSignal

FAILED_EXIT_STATUS = 1
USAGE_EXIT_STATUS = 2


def _readPid(path: str) -> int:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise SystemExit(f"txgrace restart: cannot read pidfile {path!r}: {e.strerror}")
    try:
        pid = int(text)
    except ValueError:
        raise SystemExit(f"txgrace restart: pidfile {path!r} holds {text!r}, not a pid")
    if pid <= 0:
        raise SystemExit(f"txgrace restart: pidfile {path!r} holds {text!r}, not a pid")
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def restart(pidFile: str, signum: int, timeout: float, poll: float = 0.05) -> int:
    """
    Restart the server whose pidfile is C{pidFile} and wait for the outcome.

    @return: The exit status: 0 once the restart took, 1 otherwise (the
        reason is printed on stderr).
    """
    pid = _readPid(pidFile)
    asked = time.time()
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        print(f"txgrace restart: pid {pid} (from {pidFile}) is not running", file=sys.stderr)
        return FAILED_EXIT_STATUS
    except PermissionError:
        print(f"txgrace restart: not allowed to signal pid {pid}", file=sys.stderr)
        return FAILED_EXIT_STATUS
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = readRestartStatus(pidFile)
        if (
            status is not None
            and status.get("pid") == pid
            and isinstance(status.get("time"), (int, float))
            and status["time"] >= asked - 1e-3
        ):
            outcome = status.get("outcome")
            if outcome == "ready":
                successor = status.get("successor")
                if successor == pid:
                    print(f"restarted: pid {pid} serves with new workers")
                else:
                    print(f"restarted: pid {successor} serves (was pid {pid})")
                return 0
            print(
                f"txgrace restart: pid {pid} goes on serving; the restart "
                f"{outcome}: {status.get('reason', 'no reason given')}",
                file=sys.stderr,
            )
            return FAILED_EXIT_STATUS
        if not _alive(pid):
            print(
                f"txgrace restart: pid {pid} exited without a successor",
                file=sys.stderr,
            )
            return FAILED_EXIT_STATUS
        time.sleep(poll)
    print(
        f"txgrace restart: no outcome from pid {pid} within {timeout:g}s "
        "(is it a txgrace server with this pidfile?)",
        file=sys.stderr,
    )
    return FAILED_EXIT_STATUS


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run C{python -m txgrace ...}.
    """
    parser = argparse.ArgumentParser(
        prog="python -m txgrace",
        description="Control a running txgrace server.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    restartParser = commands.add_parser(
        "restart",
        help="restart the server and wait until the new build serves",
        description=(
            "Send the restart signal to the pid in PIDFILE and wait: exit 0 "
            "and print the new pid once it serves, or exit 1 with the reason."
        ),
    )
    restartParser.add_argument("--pidfile", required=True, help="the server's pidfile")
    restartParser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for the outcome (default 90; make it longer "
        "than the server's ready timeout)",
    )
    restartParser.add_argument(
        "--signal", default="HUP", help="the restart signal to send (default HUP)"
    )
    arguments = parser.parse_args(argv)
    try:
        signum = parseSignal("--signal", arguments.signal)
    except SettingError as e:
        parser.exit(USAGE_EXIT_STATUS, f"txgrace restart: {e}\n")
    if not arguments.timeout > 0:
        parser.exit(USAGE_EXIT_STATUS, f"txgrace restart: --timeout {arguments.timeout!r}: must be more than 0\n")
    return restart(arguments.pidfile, signum, arguments.timeout)
