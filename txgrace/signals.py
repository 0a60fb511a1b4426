# -*- test-case-name: txgrace.test.test_process -*-
"""
The signals of a server process: SIGTERM and SIGINT stop it and a second one
aborts what is left; the restart signals (SIGHUP and SIGUSR2 by default)
restart it.
"""

from __future__ import annotations

import signal
from typing import Any, Callable, Sequence

from twisted.logger import Logger

log = Logger()


class SignalHandlers:
    """
    Dispatches signals to a service, on the reactor thread.

    Install it from C{reactor.callWhenRunning}: the reactor installs its own
    handlers when it starts, over any installed before.

    @ivar stopAsked: Whether a stop was asked for, by a signal or otherwise
        (set it then): the next stop signal calls C{hammer}.
    """

    def __init__(
        self,
        reactor: Any,
        stop: Callable[[], None],
        hammer: Callable[[], None],
        restart: Callable[[], None] | None,
        restartSignals: Sequence[int],
    ) -> None:
        self._reactor = reactor
        self._stop = stop
        self._hammer = hammer
        self._restart = restart
        self._restartSignals = tuple(restartSignals)
        self.stopAsked = False

    def install(self) -> None:
        """
        Install the handlers.  A SIGINT that was ignored when the process
        started (as in a background job of a shell) stays ignored.
        """
        for stopSignal in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(stopSignal) != signal.SIG_IGN:
                signal.signal(stopSignal, self._onStop)
        for restartSignal in self._restartSignals:
            signal.signal(restartSignal, self._onRestart)

    def _onStop(self, signum: int, frame: Any) -> None:
        # Runs between bytecodes: hand the work to the reactor thread.
        if self.stopAsked:
            self._reactor.callFromThread(self._hammer)
        else:
            self.stopAsked = True
            self._reactor.callFromThread(self._stop)

    def _onRestart(self, signum: int, frame: Any) -> None:
        if self._restart is not None:
            self._reactor.callFromThread(self._restartOn, signum)

    def _restartOn(self, signum: int) -> None:
        assert self._restart is not None
        log.info("Received {signal}: restarting", signal=signal.Signals(signum).name)
        self._restart()
