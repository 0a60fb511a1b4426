# -*- test-case-name: txgrace.test.test_lifecycle -*-
"""
L{GraceService}: a L{MultiService} of the services that listen on C{grace:}
endpoints, which configures the process's lifecycle (see
L{txgrace.lifecycle}).  The lifecycle, not this service, restarts and
drains: a C{grace:} port does that in any program.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint

from txgrace._twisted import raiseListenFailuresSynchronously
from txgrace.adopt import SocketRegistry, registry as processRegistry
from txgrace.drain import DrainResult
from txgrace.lifecycle import RestartRefused, describePort, lifecycleFor
from txgrace.settings import DEFAULT_RESTART_SIGNALS, SettingError
from txgrace.report import RestartReport

__all__ = [
    "DEFAULT_RESTART_SIGNALS",
    "GraceService",
    "ListeningService",
    "RestartRefused",
    "describePort",
    "holdReadiness",
]


def holdReadiness(until: Deferred[Any]) -> None:
    """
    Delay this process's readiness until C{until} fires, for example to warm
    caches.  A predecessor keeps serving meanwhile, and this process's ports
    accept nothing (clients wait in the listen queue).  Call it before the
    reactor runs: at import time or from a service's C{startService}.  If
    C{until} fails, the process stops instead of becoming ready.
    """
    processRegistry.holdReadiness(until)


class ListeningService(StreamServerEndpointService):
    """
    Listens on one endpoint, from C{privilegedStartService} (before twistd
    drops privileges), and fails loudly: a port that cannot be had stops
    the start, so that a successor never reports ready without it.  (A
    C{grace:} listen that fails later stops the process before it is ready,
    too; see L{txgrace.lifecycle.ProcessLifecycle.listening}.)
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory):
        StreamServerEndpointService.__init__(self, endpoint, factory)
        raiseListenFailuresSynchronously(self)


class GraceService(MultiService):
    """
    Listen on C{grace:} endpoints, and configure how this process restarts
    and stops: every setting left L{None} comes from the environment
    (C{TXGRACE_*}) or its default (see L{txgrace.settings}).

    SIGHUP and SIGUSR2 (or L{restart}) start a successor with the same
    command and sockets, which takes over once it is ready; SIGTERM and
    SIGINT stop gracefully.  See L{txgrace.lifecycle}.

    @param hammerTimeout: Seconds a drain may take before the remaining
        connections are aborted; C{0} aborts at once, a negative value never.
    @param readyTimeout: Seconds a successor has to become ready.
    @param pidFile: A path kept naming the serving process.
    @param restartSignals: The signals that restart.
    @param shutdownDelay: Seconds to go on serving after SIGTERM before the
        drain begins (for load balancers, as in Kubernetes).
    @param drainRate: How many long-lived connections (websockets,
        L{txgrace.IDrainable} protocols) a drain asks to close per second;
        C{0} asks them all at once.  HTTP requests are never paced.
    @param probation: Seconds after a handover during which this process
        keeps its copies of the sockets and serves again if its successor
        dies (it keeps them as long as its drain lasts in any case).
    @param handoff: Whether connections between two requests move to the
        successor at a restart (L{txgrace.handoff}); C{False} drains them.
    @param idleGrace: Seconds a drain keeps an idle HTTP/1.1 connection
        that cannot move.
    @param installSignalHandlers: C{False} leaves signals alone (tests).
    @raise txgrace.settings.SettingError: For a bad value, naming it.
    """

    def __init__(
        self,
        hammerTimeout: float | None = None,
        readyTimeout: float | None = None,
        pidFile: str | None = None,
        restartSignals: Sequence[int] | None = None,
        reactor: Any = None,
        registry: SocketRegistry | None = None,
        installSignalHandlers: bool = True,
        shutdownDelay: float | None = None,
        drainRate: float | None = None,
        probation: float | None = None,
        handoff: bool | None = None,
        idleGrace: float | None = None,
    ) -> None:
        MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor = reactor
        self.lifecycle = lifecycleFor(registry, reactor)
        self.lifecycle.configureGiven(
            hammerTimeout=hammerTimeout,
            readyTimeout=readyTimeout,
            pidFile=pidFile,
            restartSignals=restartSignals,
            shutdownDelay=shutdownDelay,
            drainRate=drainRate,
            probation=probation,
            handoff=handoff,
            idleGrace=idleGrace,
        )
        if not installSignalHandlers:
            self.lifecycle.installSignalHandlers = False

    @property
    def lastDrain(self) -> DrainResult | None:
        """
        The L{DrainResult} of this process's drain, once done.
        """
        return self.lifecycle.lastDrain

    def listen(
        self, endpoint: str | IStreamServerEndpoint, factory: IProtocolFactory
    ) -> None:
        """
        Listen with C{factory} on C{endpoint} (an endpoint, or a string for
        L{serverFromString}, normally C{grace:...}) while this service runs.

        @raise ValueError: If the string is not a valid endpoint.
        """
        if isinstance(endpoint, str):
            endpoint = serverFromString(self._reactor, endpoint)
        assert IStreamServerEndpoint.providedBy(endpoint)
        ListeningService(endpoint, factory).setServiceParent(self)

    def privilegedStartService(self) -> None:
        """
        Take charge of the process, then listen (before privileges drop).

        @raise SystemExit: With one line, if a C{TXGRACE_*} variable has a
            bad value.
        """
        self._install()
        MultiService.privilegedStartService(self)

    def startService(self) -> None:
        """
        Take charge of the process, then start every child.

        @raise SystemExit: With one line, if a C{TXGRACE_*} variable has a
            bad value.
        """
        self._install()
        MultiService.startService(self)

    def _install(self) -> None:
        # A bad TXGRACE_* value ends the start with one line, as a bare
        # grace: port's listen does (see txgrace.endpoints).
        try:
            self.lifecycle.install()
        except SettingError as e:
            raise SystemExit(f"txgrace: error: {e}") from None

    def restart(self) -> Deferred[RestartReport]:
        """
        Start a successor and hand over to it once it is ready; see
        L{txgrace.lifecycle.ProcessLifecycle.restart}.

        @return: A Deferred that fires with the L{RestartReport} once this
            process's part is over (the successor serves, this process has
            drained and is about to exit), or fails with
            L{txgrace.RestartRefused} or L{txgrace.restart.SuccessorFailed}
            (this process goes on serving).
        """
        lifecycle = self.lifecycle
        return lifecycle.restart().addCallback(lambda pid: lifecycle.whenRestarted())

    def hammer(self) -> None:
        """
        Abort every remaining connection now, instead of at the deadline.
        """
        self.lifecycle.hammer()

    def stopService(self) -> Deferred[Any]:
        """
        Drain (as the reactor's shutdown does; both wait for the same
        drain), then stop the children.
        """
        done = self.lifecycle.shutdown()
        done.addCallback(lambda ignored: MultiService.stopService(self))
        return done
