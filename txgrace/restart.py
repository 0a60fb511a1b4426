# -*- test-case-name: txgrace.test.test_restart -*-
"""
Where the successor is spawned: the same command in the same directory and
environment, with the listening sockets as descriptors 3..n, and a private
pipe on which it reports that it is ready.  A successor that exits first, or
is not ready in time, is killed and the restart fails: the caller goes on
serving.

Both ends of the readiness pipe live here: L{Successor} in the old process,
L{reportReady} in the new one.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgrace.inherit import LISTEN_FDS_START, listenEnvironment, trampoline

log = Logger()

READY_FD_VARIABLE = "TXGRACE_READY_FD"
GENERATION_VARIABLE = "TXGRACE_GENERATION"
_READY = b"READY\n"

startDirectory = os.getcwd()
"""
The working directory this process started in, where a successor starts.
"""


class SuccessorFailed(Exception):
    """
    The successor exited, or was killed, before it was ready.
    """


def successorCommand() -> list[str]:
    """
    The command that started this process: C{sys.executable} and
    C{sys.orig_argv}, so that C{python -m twisted txgrace}, C{twist txgrace}
    and a script all run again as they were started.
    """
    return [sys.executable, *sys.orig_argv[1:]]


def generation() -> int:
    """
    How many processes have served before this one, plus one.
    """
    try:
        return int(os.environ.get(GENERATION_VARIABLE, "1"))
    except ValueError:
        return 1


class _SuccessorProtocol(ProcessProtocol):
    def __init__(self, successor: Successor) -> None:
        self._successor = successor
        self._buffer = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self._successor.readyFD:
            self._buffer += data
            if _READY in self._buffer:
                self._successor._becameReady()

    def processEnded(self, reason: Failure) -> None:
        self._successor._ended(reason)


class Successor:
    """
    One attempt to start a successor.

    @ivar pid: The successor's pid once spawned.
    @ivar readyFD: The successor's descriptor for the readiness pipe.
    """

    def __init__(
        self,
        reactor: Any,
        ports: Sequence[Any],
        readyTimeout: float,
        command: Sequence[str] | None = None,
    ) -> None:
        self._reactor = reactor
        self._ports = list(ports)
        self._readyTimeout = readyTimeout
        self._command = list(successorCommand() if command is None else command)
        self.readyFD = LISTEN_FDS_START + len(self._ports)
        self.pid: int | None = None
        self._result: Deferred[int] = Deferred()
        self._timeout: Any = None
        self._process: Any = None
        self._outcome: str | None = None

    def start(self) -> Deferred[int]:
        """
        Spawn the successor.

        @return: A Deferred that fires with its pid once it is ready, or fails
            with L{SuccessorFailed} saying why.
        """
        childFDs: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for index, port in enumerate(self._ports):
            childFDs[LISTEN_FDS_START + index] = port.fileno()
        childFDs[self.readyFD] = "r"
        environment = listenEnvironment(os.environ, [port.key for port in self._ports])
        environment[READY_FD_VARIABLE] = str(self.readyFD)
        environment[GENERATION_VARIABLE] = str(generation() + 1)
        argv = trampoline(self._command)
        try:
            self._process = self._reactor.spawnProcess(
                _SuccessorProtocol(self),
                argv[0],
                argv,
                env=environment,
                path=startDirectory,
                childFDs=childFDs,
            )
        except OSError as e:
            self._fail(f"could not be started: {e}")
            return self._result
        self.pid = self._process.pid
        log.info(
            "Started successor pid {pid}: {command}",
            pid=self.pid,
            command=" ".join(self._command),
        )
        self._timeout = self._reactor.callLater(self._readyTimeout, self._tooSlow)
        return self._result

    def kill(self, why: str) -> None:
        """
        Kill a successor that is not ready yet; the restart fails with C{why}.
        """
        if self._outcome is not None:
            return
        try:
            self._process.signalProcess("KILL")
        except (ProcessExitedAlready, AttributeError):
            pass
        self._fail(why)

    def _tooSlow(self) -> None:
        self._timeout = None
        self.kill(f"was not ready within {self._readyTimeout:g}s and was killed")

    def _becameReady(self) -> None:
        if self._outcome is not None:
            return
        self._outcome = "ready"
        self._cancelTimeout()
        assert self.pid is not None
        self._result.callback(self.pid)

    def _ended(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        status = f"signal {sig}" if sig is not None else f"status {code}"
        if self._outcome == "ready":
            log.error(
                "Successor pid {pid} exited with {status} after it was ready",
                pid=self.pid,
                status=status,
            )
            return
        if self._outcome is not None:
            return
        why = f"exited with {status} before it was ready"
        if code == 127 and not os.access(self._command[0], os.X_OK):
            # /bin/sh could not exec it: say what is missing.
            why += f": {self._command[0]} does not exist or is not executable"
        self._fail(why)

    def _fail(self, why: str) -> None:
        self._outcome = "failed"
        self._cancelTimeout()
        self._result.errback(
            Failure(SuccessorFailed(f"successor pid {self.pid} {why}"))
        )

    def _cancelTimeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


def takeReadyChannel(environ: Any = None) -> int | None:
    """
    Take the readiness pipe that a predecessor passed, if any: remove its
    variable from the environment and keep the application's subprocesses
    from inheriting it.

    @return: Its descriptor, or L{None} when this process is not a successor.
    """
    environ = os.environ if environ is None else environ
    value = environ.pop(READY_FD_VARIABLE, None)
    if value is None:
        return None
    try:
        fd = int(value)
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    except (ValueError, OSError):
        log.error("Ignoring {variable}={value!r}", variable=READY_FD_VARIABLE, value=value)
        return None
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fd


def reportReady(fd: int) -> None:
    """
    Tell the predecessor that this process is ready, and close the pipe.
    """
    try:
        os.write(fd, _READY)
    except OSError as e:
        log.error("Cannot report ready to the predecessor: {error}", error=e)
    finally:
        os.close(fd)


def ignoreRestartSignals(signals: Sequence[int]) -> None:
    """
    Ignore C{signals} until the service installs its handlers: by default
    SIGHUP and SIGUSR2 kill a process, and a restart signal that reaches a
    successor still starting up must not.
    """
    for signum in signals:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_IGN)
