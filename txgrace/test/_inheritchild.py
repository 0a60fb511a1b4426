"""
A child process for L{txgrace.test.test_inherit}: listen on endpoint strings
with the sockets it inherited, and report what it got as one JSON line.

Run it as a script (not with C{-m}, which would import L{txgrace} before the
chosen import order could take effect)::

    python _inheritchild.py ORDER [--subprocess] ENDPOINT...

C{ORDER} is C{twisted-first} (import L{twisted.internet.endpoints} before
anything of txgrace, which lets Twisted's C{systemd:} parser consume
C{LISTEN_PID} and C{LISTEN_FDS}) or C{txgrace-first} (import
L{txgrace.adopt} first).

The report has, for each endpoint, the bound address and the inode of the
listening socket (or the error); whether descriptors 3 and 4 are still open
and which socket they hold; the inodes of every socket the child still holds
(one entry per descriptor); and which C{LISTEN_*} variables were in the
environment at start, after the first import, and at the end.  The reactor
is never run: listening is synchronous.

With C{--subprocess}, the child starts C{sleep 60} right after the imports,
as an application might at import time, letting it inherit every descriptor
that is not close-on-exec (C{close_fds=False}); the report then has its pid
and the inode of a pipe that the child left inheritable on purpose, which
the subprocess must hold.  The caller kills it.
"""

import os
import stat
import sys

_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _environment() -> dict:
    return {name: os.environ.get(name) for name in _VARIABLES}


# Before any import can change it.
_atStart = _environment()
_listenPIDIsMine = os.environ.get("LISTEN_PID") == str(os.getpid())

# Run as a script, sys.path[0] is this directory: keep its modules from
# shadowing anything.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(
    os.path.abspath(__file__)
):
    del sys.path[0]


def _describe(fd: int) -> dict:
    """
    Whether C{fd} is open and, if it is a socket, its inode.  (Once an
    inherited descriptor is closed, its number can be reused: Twisted's
    ports reserve a descriptor on C{/dev/null}.)
    """
    try:
        status = os.fstat(fd)
    except OSError:
        return {"open": False, "inode": None}
    inode = status.st_ino if stat.S_ISSOCK(status.st_mode) else None
    return {"open": True, "inode": inode}


def _socketInodes() -> list:
    """
    The inodes of every socket this process holds.
    """
    inodes = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            status = os.fstat(int(entry))
        except OSError:
            continue  # the directory listing's own descriptor
        if stat.S_ISSOCK(status.st_mode):
            inodes.append(status.st_ino)
    return sorted(inodes)


def main(order: str, descriptions: list) -> dict:
    if order == "twisted-first":
        import twisted.internet.endpoints  # noqa: F401

        import txgrace.adopt  # noqa: F401
    elif order == "txgrace-first":
        import txgrace.adopt  # noqa: F401

        import twisted.internet.endpoints  # noqa: F401
    else:
        raise SystemExit(f"unknown import order {order!r}")
    afterFirstImport = _environment()

    spawned = {}
    if descriptions[:1] == ["--subprocess"]:
        import subprocess

        descriptions = descriptions[1:]
        readEnd, writeEnd = os.pipe()
        os.set_inheritable(writeEnd, True)
        sleeper = subprocess.Popen(
            ["sleep", "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
        )
        spawned = {
            "subprocess": sleeper.pid,
            "inheritableInode": os.fstat(writeEnd).st_ino,
        }
        os.close(readEnd)
        os.close(writeEnd)

    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )

    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.protocol import Factory, Protocol
    from twisted.python.failure import Failure

    import txgrace.adopt

    endpoints = []
    for description in descriptions:
        results: list = []
        try:
            listening = serverFromString(reactor, description).listen(
                Factory.forProtocol(Protocol)
            )
        except Exception as e:
            endpoints.append({"error": f"{type(e).__name__}: {e}"})
            continue
        listening.addBoth(results.append)
        (result,) = results  # listening is synchronous
        if isinstance(result, Failure):
            endpoints.append({"error": result.getErrorMessage()})
            continue
        host = result.getHost()
        endpoints.append(
            {
                "host": getattr(host, "host", None),
                "port": getattr(host, "port", None),
                "inode": os.fstat(result.fileno()).st_ino,
            }
        )

    txgrace.adopt.registry.closeUnclaimed()

    return {
        "listenPIDIsMine": _listenPIDIsMine,
        "endpoints": endpoints,
        "fds": {str(fd): _describe(fd) for fd in (3, 4)},
        **spawned,
        "socketInodes": _socketInodes(),
        "environmentAtStart": _atStart,
        "environmentAfterFirstImport": afterFirstImport,
        "environmentAtEnd": _environment(),
    }


if __name__ == "__main__":
    import json

    report = main(sys.argv[1], sys.argv[2:])
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
