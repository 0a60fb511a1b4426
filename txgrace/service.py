# -*- test-case-name: txgrace.test.test_service -*-
"""
L{GraceService}: a L{MultiService} that listens on C{grace:} endpoints,
reports readiness, restarts into a successor, and stops gracefully.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from txgrace import sdnotify
from txgrace.adopt import SocketRegistry, registry as processRegistry, stopListening
from txgrace.drain import Drain, DrainResult, drainConnections
from txgrace.pidfile import removePidFile, writePidFile
from txgrace.signals import SignalHandlers
from txgrace.restart import (
    Successor,
    WorkerControl,
    adoptWorkerControl,
    generation,
    ignoreRestartSignals,
    reportReady,
    takeControlChannel,
)

log = Logger()

DEFAULT_RESTART_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)


class RestartRefused(Exception):
    """
    A restart was asked for while this process could not start one.
    """


def holdReadiness(until: Deferred[Any]) -> None:
    """
    Delay this process's readiness until C{until} fires, for example to warm
    caches.  A predecessor keeps serving meanwhile, and this process's ports
    accept nothing (clients wait in the listen queue).  Call it before the
    reactor runs: at import time or from a service's C{startService}.  If
    C{until} fails, the process stops instead of becoming ready.
    """
    processRegistry.holdReadiness(until)


def describePort(port: Any) -> str:
    """
    Describe a listening port as C{tcp:127.0.0.1:8080}, C{ssl:[::1]:8443} or
    C{unix:/run/app.sock}.
    """
    host = port.getHost()
    if getattr(host, "type", None) in ("TCP", "TLS"):
        kind = "ssl" if isinstance(port.factory, TLSMemoryBIOFactory) else "tcp"
        address = f"[{host.host}]" if ":" in host.host else host.host
        return f"{kind}:{address}:{host.port}"
    name = host.name
    return "unix:" + (os.fsdecode(name) if isinstance(name, bytes) else str(name))


class _ListeningService(Service):
    """
    Listens on one endpoint and fails loudly: a port that cannot be had stops
    the start-up, so that a successor never reports ready without it.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory):
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        Service.startService(self)
        failures: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: Any) -> None:
        self.port = port

    def stopService(self) -> Deferred[Any] | None:
        Service.stopService(self)
        if self.port is not None:
            return maybeDeferred(self.port.stopListening)
        return None


class GraceService(MultiService):
    """
    Serve on C{grace:} endpoints with graceful stop and zero-downtime restart.

      - On start, once every port listens and every readiness hold has fired
        (see L{holdReadiness}), the process is ready: it logs
        C{Serving <addresses> with pid N}, tells its predecessor (or systemd,
        or the pidfile).
      - SIGHUP and SIGUSR2 (or L{restart}) start a successor with the same
        command and the same sockets; once it is ready this process hands
        over and drains.  If it fails, this process goes on serving.
      - SIGTERM and SIGINT stop: stop listening, drain every connection
        accepted through a grace port, abort the rest after C{hammerTimeout}
        seconds.  A second signal aborts at once.

    @ivar hammerTimeout: Seconds a drain may take before the remaining
        connections are aborted; C{0} aborts at once, a negative value never.
    @ivar readyTimeout: Seconds a successor has to become ready.
    @ivar pidFile: A path kept naming the serving process, or L{None}.
    @ivar shutdownDelay: Seconds to go on serving after SIGTERM before the
        drain begins, for load balancers that take the server out of
        rotation at the moment they send SIGTERM (Kubernetes).
    @ivar lastDrain: The L{DrainResult} of the last drain, once done.
    @ivar worker: Whether this process is a master's worker (see
        L{txgrace.master}): it is started, restarted and stopped by its
        master, and accepts one connection per wakeup so that workers
        sharing a socket share the load.
    """

    def __init__(
        self,
        hammerTimeout: float = 60.0,
        readyTimeout: float = 60.0,
        pidFile: str | None = None,
        restartSignals: Sequence[int] = DEFAULT_RESTART_SIGNALS,
        reactor: Any = None,
        registry: SocketRegistry | None = None,
        installSignalHandlers: bool = True,
        shutdownDelay: float = 0.0,
    ) -> None:
        MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.hammerTimeout = hammerTimeout
        self.readyTimeout = readyTimeout
        self.pidFile = pidFile
        self.restartSignals = tuple(restartSignals)
        self.shutdownDelay = shutdownDelay
        self.lastDrain: DrainResult | None = None
        self._reactor = reactor
        self._registry = processRegistry if registry is None else registry
        self._installSignalHandlers = installSignalHandlers
        self._controlFD, self.worker = takeControlChannel()
        self._workerControl: WorkerControl | None = None
        if self.worker:
            self._registry.acceptLimit = 1
        self._state = "starting"
        self._successor: Successor | None = None
        self._drain: Drain | None = None
        self._hammerAsked = False
        self._signals = SignalHandlers(
            reactor,
            self._stopOnSignal,
            self.hammer,
            # Workers are restarted by their master.
            None if self.worker else self._restartOnSignal,
            self.restartSignals,
        )
        self._pid = os.getpid()
        if installSignalHandlers:
            ignoreRestartSignals(self.restartSignals)

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
        _ListeningService(endpoint, factory).setServiceParent(self)

    # Start and readiness

    def startService(self) -> None:
        """
        Start every child (so every port listens), then become ready once the
        reactor runs.
        """
        # Connections wait on the socket until this process is ready, so a
        # successor that dies first takes no client with it.
        self._registry.pauseAccepting()
        MultiService.startService(self)
        self._reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        if self.worker and self._controlFD is not None:
            self._workerControl = adoptWorkerControl(
                self._reactor, self._controlFD, self._stopAsWorker
            )
            self._controlFD = None
        if self._installSignalHandlers:
            self._signals.install()
        holds = self._registry.readinessHolds()
        gatherResults(holds, consumeErrors=True).addCallbacks(
            self._becomeReady, self._notReady
        )

    def _becomeReady(self, ignored: object) -> None:
        if self._state != "starting":
            return
        self._registry.closeUnclaimed()
        self._registry.resumeAccepting()
        self._state = "serving"
        log.info(
            "Serving {addresses} with pid {pid} (generation {generation})",
            addresses=", ".join(
                describePort(p) for p in self._registry.ports.values()
            ),
            pid=self._pid,
            generation=generation(),
        )
        if self._workerControl is not None:
            self._workerControl.ready()
            return
        if self._controlFD is not None:
            reportReady(self._controlFD)
            self._controlFD = None
            return
        sdnotify.notify("READY=1", f"MAINPID={self._pid}")
        if self.pidFile is not None:
            self._writePidFile(self._pid)

    def _notReady(self, reason: Failure) -> None:
        log.failure("A readiness hold failed; stopping", reason)
        self._reactor.stop()

    def _writePidFile(self, pid: int) -> None:
        assert self.pidFile is not None
        try:
            writePidFile(self.pidFile, pid)
        except OSError as e:
            log.error(
                "Cannot write pidfile {path!r}: {error}", path=self.pidFile, error=e
            )

    # Signals

    def _stopOnSignal(self) -> None:
        # Only a signal received twice hammers: a process draining after a
        # handover goes on draining when `systemctl stop` signals the whole
        # control group.
        if self._state in ("handedOver", "stopping"):
            log.info("Already draining; a second signal aborts what is left")
            return
        if self.shutdownDelay > 0:
            log.info(
                "Serving {delay}s more before draining (--shutdown-delay)",
                delay=self.shutdownDelay,
            )
        self._reactor.callLater(max(self.shutdownDelay, 0), self._reactor.stop)

    def _stopAsWorker(self, why: str) -> None:
        if self._signals.stopAsked or self._state in ("handedOver", "stopping"):
            return
        # Counts as the first stop signal: a SIGTERM now hammers.
        self._signals.stopAsked = True
        self._registry.handingOver = True  # The master owns the sockets.
        log.info("Stopping: {why}", why=why)
        self._reactor.stop()

    def _restartOnSignal(self) -> None:
        self.restart().addErrback(lambda failure: None)

    # Restart

    def restart(self) -> Deferred[int]:
        """
        Start a successor and hand over to it once it is ready.

        @return: A Deferred that fires with the successor's pid once it is
            ready (this process then drains and exits), or fails with
            L{RestartRefused} or L{txgrace.restart.SuccessorFailed}; after a
            failure this process goes on serving.
        """
        refusal = {
            "starting": "this process is not ready yet",
            "restarting": f"successor pid {self._successor and self._successor.pid} "
            "is still starting",
            "handedOver": "this process has handed over and is draining",
            "stopping": "this process is stopping",
        }.get(self._state)
        if refusal is not None:
            log.warn("Restart refused: {why}", why=refusal)
            return fail(RestartRefused(refusal))
        self._state = "restarting"
        sdnotify.notify(*sdnotify.reloading())
        self._successor = Successor(
            self._reactor, list(self._registry.ports.values()), self.readyTimeout
        )
        return self._successor.start().addCallbacks(
            self._handOver, self._restartFailed
        )

    def _handOver(self, pid: int) -> int:
        log.info(
            "Successor pid {successor} is ready; pid {pid} hands over and drains",
            successor=pid,
            pid=self._pid,
        )
        self._state = "handedOver"
        self._successor = None
        self._registry.handingOver = True
        sdnotify.notify(f"MAINPID={pid}", "READY=1")
        if self.pidFile is not None:
            self._writePidFile(pid)
        self._reactor.callLater(0, self._reactor.stop)
        return pid

    def _restartFailed(self, reason: Failure) -> Failure:
        log.error(
            "Restart failed, pid {pid} goes on serving: {why}",
            pid=self._pid,
            why=reason.getErrorMessage(),
        )
        self._state = "serving"
        self._successor = None
        sdnotify.notify("READY=1")
        return reason

    # Stop

    def stopService(self) -> Deferred[Any]:
        """
        Stop listening (this process's copies only), drain, then stop the
        children.  On a final stop, connections already queued on the
        sockets are accepted first, UNIX socket paths are removed, and so is
        the pidfile.
        """
        if self._successor is not None:
            self._successor.kill("was killed: the server is stopping")
        final = not self._registry.handingOver
        self._state = "stopping" if final else "handedOver"
        if final:
            sdnotify.notify("STOPPING=1")
        ports = list(self._registry.ports.values())
        if final or self.worker:
            # A worker takes what is queued too: its master may be closing.
            for port in ports:
                port.acceptBacklog()
        d = stopListening(ports)
        d.addCallback(lambda ignored: self._startDrain())
        d.addCallback(lambda ignored: MultiService.stopService(self))
        if final and self.pidFile is not None:
            pidFile = self.pidFile
            d.addCallback(lambda ignored: removePidFile(pidFile, self._pid))
        return d

    def _startDrain(self) -> Deferred[DrainResult]:
        self._drain, done = drainConnections(
            self._reactor, self._registry, self.hammerTimeout
        )
        if self._hammerAsked:
            self._drain.hammer()

        def finished(result: DrainResult) -> DrainResult:
            self.lastDrain = result
            self._drain = None
            return result

        return done.addCallback(finished)

    def hammer(self) -> None:
        """
        Abort every remaining connection now, instead of at the deadline.
        """
        self._hammerAsked = True
        if self._drain is not None:
            self._drain.hammer()
