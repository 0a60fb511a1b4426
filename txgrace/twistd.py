# -*- test-case-name: txgrace.test.test_programs -*-
"""
What a process run by C{twistd} needs to restart: twistd keeps a pidfile,
may daemonize, and logs to a file of its own.

  - twistd refuses to start while its pidfile names a live process, and
    removes the pidfile when it exits.  So the lifecycle takes the pidfile
    over: a successor is started with C{--pidfile=} (twistd then leaves the
    file alone) and is told the path in C{TXGRACE_PIDFILE}; the pidfile is
    rewritten atomically at every handover and removed by the final stop.
  - A daemon's successor must not daemonize again: it is started with
    C{--nodaemon} (and the umask the daemon set), so its pid is the one its
    predecessor spawned and waited for.  Its stdout and stderr go to the
    log file, so that an error before its logging starts is not lost in
    the daemon's C{/dev/null}.
  - twistd opens its log file without C{O_APPEND}; two generations writing
    it would overwrite each other's lines.  Both set C{O_APPEND} on it.
"""

from __future__ import annotations

import fcntl
import os
import sys
from typing import Any, Sequence

from twisted.logger import Logger

log = Logger()


def findRunner() -> Any:
    """
    The twistd application runner of this process, if twistd is running it.

    The lifecycle is installed while twistd starts the application (from
    the runner's C{startApplication} or while it loads the C{.tac} file), so
    the runner is on the stack then.
    """
    app = sys.modules.get("twisted.application.app")
    if app is None:
        return None
    runnerClass = getattr(app, "ApplicationRunner", None)
    if runnerClass is None:
        return None
    frame: Any = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, runnerClass) and isinstance(
            getattr(candidate, "config", None), dict
        ):
            return candidate
        frame = frame.f_back
    return None


class TwistdHost:
    """
    A process started by twistd.

    @ivar pidFile: twistd's pidfile (absolute), or L{None} when it has none.
    @ivar logFile: The file twistd logs to (absolute), or L{None} for
        stdout or syslog.
    @ivar daemon: Whether twistd daemonized this process.
    """

    def __init__(self, runner: Any) -> None:
        config = runner.config
        self._config = config
        self.daemon = not config.get("nodaemon")
        pidFile = config.get("pidfile") or None
        self.pidFile = None if pidFile is None else os.path.abspath(pidFile)
        logFile = config.get("logfile")
        if logFile == "-" or config.get("syslog"):
            logFile = None
        elif not logFile:
            logFile = "twistd.log" if self.daemon else None
        self.logFile = None if logFile is None else os.path.abspath(logFile)
        self._givenLogFile = bool(config.get("logfile"))

    def takePidFile(self) -> str | None:
        """
        Take the pidfile from twistd, which would remove it at exit even
        after a handover; the lifecycle keeps it from now on.
        """
        self._config["pidfile"] = ""
        return self.pidFile

    def appendToLogFile(self) -> None:
        """
        Make this process's descriptors on the log file append, so that two
        generations never overwrite each other's lines.
        """
        if self.logFile is None:
            return
        for fd in _descriptorsOf(self.logFile):
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_APPEND)

    def successorArguments(self, argv: Sequence[str]) -> list[str]:
        """
        The command line of a successor: C{argv} (this process's
        C{sys.orig_argv}, with C{sys.executable} first) with twistd options
        that keep it from daemonizing and from checking the pidfile.
        """
        extra = ["--pidfile="]
        if self.daemon:
            umask = os.umask(0)
            os.umask(umask)
            extra += ["--nodaemon", f"--umask={umask:04o}"]
            if self.logFile is not None and not self._givenLogFile:
                extra.append(f"--logfile={self.logFile}")
        # twistd's own options come right after the script that runs it, and
        # end where its subcommand (such as "web") begins.
        at = len(sys.orig_argv) - len(sys.argv) + 1
        argv = list(argv)
        head, tail = argv[at:], []
        subCommand = getattr(self._config, "subCommand", None)
        if subCommand in head:
            end = head.index(subCommand)
            head, tail = head[:end], head[end:]
        # A --pidfile given later would win over ours: empty it.
        for index, argument in enumerate(head):
            if argument == "--pidfile" and index + 1 < len(head):
                head[index + 1] = ""
            elif argument.startswith("--pidfile="):
                head[index] = "--pidfile="
        if head[: len(extra)] == extra:
            extra = []
        return argv[:at] + extra + head + tail

    def successorOutput(self) -> int | None:
        """
        A descriptor for the successor's stdout and stderr when this process
        is a daemon (whose own are C{/dev/null}): the log file, appending.
        The caller closes it.
        """
        if not self.daemon or self.logFile is None:
            return None
        try:
            return os.open(
                self.logFile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            log.error(
                "Cannot open {path!r} for the successor's output: {error}",
                path=self.logFile,
                error=e,
            )
            return None


def _descriptorsOf(path: str) -> list[int]:
    """
    The descriptors of this process that are open on C{path}.
    """
    try:
        wanted = os.stat(path)
    except OSError:
        return []
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (wanted.st_dev, wanted.st_ino):
            found.append(int(name))
    return found


def twistdHost() -> TwistdHost | None:
    """
    This process's twistd, if twistd runs it.
    """
    runner = findRunner()
    return None if runner is None else TwistdHost(runner)
