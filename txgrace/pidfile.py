# -*- test-case-name: txgrace.test.test_pidfile -*-
"""
A pidfile that always names the process serving now.
"""

from __future__ import annotations

import os
import tempfile


def writePidFile(path: str, pid: int) -> None:
    """
    Write C{pid} to C{path} atomically: a reader sees the old pid or the new
    one, never a partial file.  A symlink planted at C{path} is replaced, not
    followed.

    @raise OSError: If the directory does not exist or is not writable.
    """
    directory, name = os.path.split(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as pidFile:
            pidFile.write(f"{pid}\n")
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
