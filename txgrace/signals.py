# -*- test-case-name: txgrace.test.test_lifecycle -*-
"""
The signals of a server process, handed to its lifecycle on the reactor
thread: SIGTERM and SIGINT stop it, the restart signals (SIGHUP and SIGUSR2
by default) restart it.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Sequence


class SignalHandlers:
    """
    Dispatches signals to callables, on the reactor thread.

    Install it from C{reactor.callWhenRunning}: the reactor installs its own
    handlers when it starts, over any installed before.

    @param restart: Called with the signal number of a restart signal, or
        L{None} to ignore the restart signals (a master's worker is
        restarted by its master).
    """

    def __init__(
        self,
        reactor: Any,
        stop: Callable[[int], None],
        restart: Callable[[int], None] | None,
        restartSignals: Sequence[int],
    ) -> None:
        self._reactor = reactor
        self._stop = stop
        self._restart = restart
        self._restartSignals = tuple(restartSignals)

    def install(self) -> None:
        """
        Install the handlers.  A SIGINT that was ignored when the process
        started (as in a background job of a shell) stays ignored.
        """
        for stopSignal in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(stopSignal) != signal.SIG_IGN:
                signal.signal(stopSignal, self._onStop)
        for restartSignal in self._restartSignals:
            if self._restart is None:
                signal.signal(restartSignal, signal.SIG_IGN)
            else:
                signal.signal(restartSignal, self._onRestart)
        # A successor starts with its restart signals blocked (see
        # txgrace.lifecycle): they are handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(self._restartSignals))

    def _onStop(self, signum: int, frame: Any) -> None:
        # Runs between bytecodes: hand the work to the reactor thread.
        self._reactor.callFromThread(self._stop, signum)

    def _onRestart(self, signum: int, frame: Any) -> None:
        assert self._restart is not None
        self._reactor.callFromThread(self._restart, signum)


def signalName(signum: int) -> str:
    """
    C{SIGHUP} for 1, and so on.
    """
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def ignoreRestartSignals(signals: Sequence[int]) -> None:
    """
    Ignore C{signals} until the lifecycle installs its handlers: by default
    SIGHUP and SIGUSR2 kill a process, and a restart signal that reaches a
    successor still starting up must not.
    """
    for signum in signals:
        if signal.getsignal(signum) == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_IGN)
