# -*- test-case-name: txgrace.test.test_units -*-
"""
A pidfile that always names the process serving now, and beside it the
outcome of the last restart (C{<pidfile>.restart}, one JSON object), which
C{python -m txgrace restart} waits for.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def writePidFile(path: str, pid: int) -> None:
    """
    Write C{pid} to C{path} atomically: a reader sees the old pid or the new
    one, never a partial file.  A symlink planted at C{path} is replaced, not
    followed.

    @raise OSError: If the directory does not exist or is not writable.
    """
    _writeAtomically(path, f"{pid}\n")


def _writeAtomically(path: str, text: str) -> None:
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as pidFile:
            pidFile.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def removePidFile(path: str, pid: int) -> None:
    """
    Remove C{path} if it still names C{pid}: after a handover it names the
    successor, which must keep it.
    """
    try:
        with open(path, "rb") as pidFile:
            current = pidFile.read().strip()
    except OSError:
        return
    if current == str(pid).encode("ascii"):
        os.unlink(path)


def checkPidFileLocation(path: str) -> None:
    """
    Check early that a pidfile can be written at C{path}.

    @raise ValueError: Naming C{path}, if its directory is missing or not
        writable.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"pidfile {path!r}: directory {directory!r} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"pidfile {path!r}: directory {directory!r} is not writable")


def restartStatusPath(pidFile: str) -> str:
    """
    Where the outcome of the last restart of the server with C{pidFile} is
    kept.
    """
    return pidFile + ".restart"


def writeRestartStatus(pidFile: str, status: dict[str, Any]) -> None:
    """
    Record the outcome of a restart atomically: C{status} has C{"pid"} (the
    process that was asked), C{"time"} (when it was asked, seconds since the
    epoch), C{"outcome"} (C{"ready"}, C{"failed"} or C{"refused"}), and
    C{"successor"} or C{"reason"}.
    """
    _writeAtomically(restartStatusPath(pidFile), json.dumps(status) + "\n")


def readRestartStatus(pidFile: str) -> dict[str, Any] | None:
    """
    The outcome of the last restart, or L{None} if none is recorded.
    """
    try:
        with open(restartStatusPath(pidFile)) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def removeRestartStatus(pidFile: str, pid: int) -> None:
    """
    Remove the restart record on a final stop, if it is C{pid}'s or names
    C{pid} as the successor.
    """
    status = readRestartStatus(pidFile)
    if status is not None and pid in (status.get("pid"), status.get("successor")):
        try:
            os.unlink(restartStatusPath(pidFile))
        except FileNotFoundError:
            pass
