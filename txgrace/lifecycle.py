# -*- test-case-name: txgrace.test.test_lifecycle -*-
"""
Where the process's state lives: one lifecycle per process, installed by the
first C{grace:} port that listens, whatever program runs it (C{twist web},
C{twistd}, Klein's C{app.run}, a plain script, C{twist txgrace}).

States::

    starting --ready--> serving --restart--> restarting --successor ready--> handed over
       |                  |  ^                  |                               |
       |                  |  +---- it failed ---+                               |
       +------------------+--------- stop ----> stopping                      drain, exit

  - B{starting}: ports listen but accept nothing; once the reactor runs,
    every listen has succeeded and every readiness hold has fired, the
    process is ready.  A successor then tells its predecessor C{READY} and
    accepts only after the C{GO}.
  - B{serving}: SIGTERM/SIGINT stop (after C{shutdownDelay}); SIGHUP/SIGUSR2
    restart.  A second stop signal aborts what is left.
  - B{restarting}: a successor starts with the same command and sockets; if
    it fails, back to serving.  A second restart is refused.
  - B{handed over}: the successor serves; this process stops listening (its
    copies only), drains and exits.
  - B{stopping}: the final stop: accept what is queued, stop listening,
    drain, remove the pidfile.

The stop joins the reactor's shutdown (a C{before shutdown} trigger that
returns the drain's Deferred), so C{reactor.stop()} from application code
drains too.  In master mode (L{txgrace.master}) the same states drive
workers instead: a restart rolls them and a stop stops them.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import time
import weakref
from dataclasses import replace
from typing import Any, Callable

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import Interface

from txgrace import sdnotify
from txgrace.adopt import SocketRegistry, registry as processRegistry, stopListening
from txgrace.drain import Drain, DrainResult, drainConnections, requestsInFlight
from txgrace.handoff import HandoffReceiver, HandoffSender
from txgrace.report import ListenCounters, RestartReport, listenCounters
from txgrace.pidfile import (
    removePidFile,
    removeRestartStatus,
    writePidFile,
    writeRestartStatus,
)
from txgrace.restart import (
    GO_TIMEOUT,
    ControlChannel,
    Successor,
    SuccessorFailed,
    adoptControlChannel,
    generation,
    successorCommand,
    takeControlChannel,
)
from txgrace.settings import ENVIRONMENT, Settings, checkValue, resolve
from txgrace.signals import SignalHandlers, ignoreRestartSignals, signalName
from txgrace.twistd import TwistdHost, twistdHost

log = Logger()

STARTING = "starting"
SERVING = "serving"
RESTARTING = "restarting"
HANDED_OVER = "handed over"
STOPPING = "stopping"

OWNED_SOCKETS_VARIABLE = "TXGRACE_OWNED_SOCKETS"
"""
The names of the sockets whose UNIX paths a successor inherits the duty to
remove (those its predecessor bound or owned; not systemd's).
"""

HAMMERED_EXIT_STATUS = 1
"""
The exit status a program may use after a drain that had to abort
connections (C{twist txgrace} does), so that a supervisor can tell it from
a clean stop.
"""

EXIT_AFTER_HAMMER_SECONDS = 5.0
"""
Seconds a process may go on after its hammer (threads that never end, such
as a WSGI request still running) before it exits anyway.
"""


class RestartRefused(Exception):
    """
    A restart was asked for while this process could not start one.
    """


class IWorkers(Interface):
    """
    Master mode's policy: what a restart and a stop do to the workers.
    """

    def start() -> Deferred[None]:
        """
        Start every worker; fires once all of them serve.
        """

    def roll() -> Deferred[None]:
        """
        Replace every worker; fires when done, or fails (the old workers go
        on serving).
        """

    def stop(hammerTimeout: float) -> Deferred[None]:
        """
        Stop every worker (each drains); fires once all have exited.
        """

    def hammer() -> None:
        """
        Have every worker abort its remaining connections now.
        """

    def lameDuck() -> None:
        """
        Tell every worker that the master is stopping (health checks fail)
        while they still serve.
        """

    def announce() -> None:
        """
        Log that the master serves: its pid, addresses and workers.
        """


def describePort(port: Any) -> str:
    """
    Describe a listening port as C{tcp:127.0.0.1:8080}, C{ssl:[::1]:8443} or
    C{unix:/run/app.sock}.
    """
    describe = getattr(port, "describe", None)
    if describe is not None:
        return str(describe())
    host = port.getHost()
    if getattr(host, "type", None) in ("TCP", "TLS"):
        kind = "ssl" if isinstance(port.factory, TLSMemoryBIOFactory) else "tcp"
        address = f"[{host.host}]" if ":" in host.host else host.host
        return f"{kind}:{address}:{host.port}"
    name = host.name
    return "unix:" + (os.fsdecode(name) if isinstance(name, bytes) else str(name))


def _isTerminalJobLeader() -> bool:
    """
    Whether this process leads the foreground job of a terminal: a shell
    gives the terminal back when it exits, and the kernel hangs up the
    group if it also leads the session.
    """
    try:
        return (
            os.getpgrp() == os.getpid()
            and os.isatty(0)
            and os.tcgetpgrp(0) == os.getpgrp()
        )
    except OSError:
        return False


def processGroupMembers(pgid: int, exclude: int) -> list[int]:
    """
    The live processes of process group C{pgid}, but C{exclude}.
    """
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == exclude:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.append(int(name))
    return members


class ProcessLifecycle:
    """
    The lifecycle of one process: see the module docstring.

    @ivar state: One of L{STARTING}, L{SERVING}, L{RESTARTING},
        L{HANDED_OVER}, L{STOPPING}.
    @ivar settings: The settings in force (see L{txgrace.settings}).
    @ivar worker: Whether this process is a master's worker.
    @ivar workers: Master mode's policy, or L{None}.
    @ivar lastDrain: The L{DrainResult} of the drain, once done.
    @ivar exitStatus: C{0}, or L{HAMMERED_EXIT_STATUS} after a hammer.
    @ivar installSignalHandlers: Whether to handle signals (tests turn it
        off).
    @ivar stopBegun: Whether this process is on its way out: a stop was
        asked for (its shutdown delay may still run) or it handed over.  A
        health check answers 503 from then on.
    """

    def __init__(
        self,
        reactor: Any,
        registry: SocketRegistry,
        spawn: Callable[..., Any] = Successor,
        environ: Any = None,
        host: Callable[[], TwistdHost | None] = twistdHost,
    ) -> None:
        self._reactor = reactor
        self._registry = registry
        self._spawn = spawn
        self._environ = os.environ if environ is None else environ
        self._findHost = host
        self._code: dict[str, Any] = {}
        self.settings = Settings()
        self.state = STARTING
        self.installed = False
        self.installSignalHandlers = True
        self.worker = False
        self.workers: IWorkers | None = None
        self.lastDrain: DrainResult | None = None
        self.exitStatus = 0
        self._host: TwistdHost | None = None
        self._controlFD: int | None = None
        self._control: ControlChannel | None = None
        self._successor: Any = None
        self._drain: Drain | None = None
        self._holds: list[Deferred[Any]] = []
        self._stopAsked = False
        self._hammerAsked = False
        self._stopCall: Any = None
        self._stopping = False
        self._stoppingSent = False
        self._shutdownResult: Any = None
        self._shutdownWaiters: list[Deferred[Any]] | None = None
        self._terminalLeader = False
        self._served = False
        self._ownedSockets: set[str] = set()
        self._drainResult: DrainResult | None = None
        self._drainWaiters: list[Deferred[DrainResult]] | None = None
        self._handedOverAt = 0.0
        self._probationCall: Any = None
        self._probationElapsed = False
        self._leaving = False
        self._probationToken: object | None = None
        self.stopBegun = False
        self._draining = False
        self._drainingWaiters: list[Deferred[None]] = []
        self._restartBegan: tuple[float, ListenCounters | None] = (0.0, None)
        self._relayedBefore = 0
        self._handedOver: tuple[int, float, int] | None = None
        self._reportWaiters: list[Deferred[RestartReport]] = []

    # Settings

    def configure(self, **settings: Any) -> None:
        """
        Set settings in code; they override the environment.

        @raise txgrace.settings.SettingError: For an unknown setting or a
            bad value, naming it.
        """
        for key, value in settings.items():
            self._code[key] = checkValue(key, value)
        if self.installed:
            self.settings = resolve(self._code, self._environ)

    def configureGiven(self, **settings: Any) -> None:
        """
        L{configure} with the settings that are not L{None} (the others are
        left to the environment and the defaults).
        """
        self.configure(**{k: v for k, v in settings.items() if v is not None})

    # Start and readiness

    def install(self) -> None:
        """
        Take charge of this process: called by the first C{grace:} port that
        listens, before it starts accepting; later calls do nothing.

        @raise txgrace.settings.SettingError: If a C{TXGRACE_*} variable has
            a bad value.
        """
        if self.installed:
            return
        self.settings = resolve(self._code, self._environ)
        self.installed = True
        self._controlFD, self.worker = takeControlChannel(self._environ)
        owned = self._environ.pop(OWNED_SOCKETS_VARIABLE, "")
        self._ownedSockets = set(owned.split(":")) - {""} if self._controlFD is not None else set()
        if self.worker:
            # Accept one connection per wakeup so that workers sharing a
            # socket share the load; the master keeps the sockets, and it
            # applies any shutdown delay itself.
            self._registry.acceptLimit = 1
            self._registry.handingOver = True
            self.settings = replace(self.settings, shutdownDelay=0.0)
        self._host = self._findHost()
        if self._host is not None:
            pidFile = self._host.pidFile
            if self.settings.pidFile is None and pidFile is not None:
                self._host.takePidFile()
                self.settings = replace(self.settings, pidFile=pidFile)
            self._host.appendToLogFile()
        # Connections wait on the socket until this process is ready, so a
        # successor that dies first takes no client with it.
        self._registry.pauseAccepting()
        if self.installSignalHandlers:
            ignoreRestartSignals(self.settings.restartSignals)
        self._terminalLeader = _isTerminalJobLeader()
        self._reactor.addSystemEventTrigger("before", "shutdown", self._beforeShutdown)
        self._reactor.callWhenRunning(self._running)

    def holdReadiness(self, until: Deferred[Any]) -> None:
        """
        Do not become ready before C{until} fires; if it fails, stop.
        """
        self._holds.append(until)

    def listening(self, listened: Deferred[Any]) -> Deferred[Any]:
        """
        Hold readiness until the listen C{listened} has succeeded: a port
        that cannot be had stops the process instead, even when its failure
        comes later.  C{listened}'s own result is left for its caller.
        """
        outcome: Deferred[None] = Deferred()

        def observe(result: Any) -> Any:
            if isinstance(result, Failure):
                outcome.errback(result)
            else:
                outcome.callback(None)
            return result

        self.holdReadiness(outcome)
        return listened.addBoth(observe)

    def _running(self) -> None:
        if self._controlFD is not None:
            receiver = HandoffReceiver(self._registry) if self.settings.handoff else None
            channel = (
                ControlChannel(
                    self._stopAsWorker, self._hammerAsWorker, self._lameDuck, receiver
                )
                if self.worker
                else ControlChannel(handoff=receiver)
            )
            self._control = adoptControlChannel(self._reactor, self._controlFD, channel)
            self._controlFD = None
        if self.installSignalHandlers:
            SignalHandlers(
                self._reactor,
                self._onStopSignal,
                None if self.worker else self._onRestartSignal,
                self.settings.restartSignals,
            ).install()
        holds = self._holds + self._registry.readinessHolds()
        self._holds = []
        if self.workers is not None:
            holds.append(self.workers.start())
        gatherResults(holds, consumeErrors=True).addCallbacks(
            self._ready, self._notReady
        )

    def _ready(self, ignored: object) -> None:
        if self.state != STARTING:
            return
        unclaimed = [i.name for i in self._registry.inherited() if i.name != "unknown"]
        self._registry.closeUnclaimed()
        if unclaimed and sdnotify.fileDescriptorStore(self._environ) and not self.worker:
            # A port dropped from the configuration: systemd forgets it too.
            for name in unclaimed:
                sdnotify.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
        if self._control is None:
            self._serve("first")
            return
        go = self._control.ready()
        def noAnswer() -> None:
            if not go.called:
                go.callback("timeout")

        timeout = self._reactor.callLater(GO_TIMEOUT, noAnswer)

        def answered(answer: str) -> None:
            if timeout.active():
                timeout.cancel()
            self._serve(answer)

        go.addCallback(answered)

    def _serve(self, answer: str) -> None:
        """
        Start accepting: this process is ready, and its parent (if any) said
        C{GO}, or is gone, or did not answer in time.
        """
        if self.state != STARTING:
            return
        if answer == "timeout":
            log.warn(
                "No GO from the predecessor within {seconds}s; accepting anyway",
                seconds=GO_TIMEOUT,
            )
        self._registry.resumeAccepting()
        self.state = SERVING
        self._served = True
        pid = os.getpid()
        if not self.worker:
            # The serving process owns the UNIX socket paths its predecessor
            # owned (never those of systemd's socket units): its final stop
            # removes them.
            for port in self._registry.ports.values():
                if port.key in self._ownedSockets:
                    port.boundHere = True
        if self.workers is not None:
            self.workers.announce()
        else:
            log.info(
                "Serving {addresses} with pid {pid} (generation {generation})",
                addresses=", ".join(
                    describePort(p) for p in self._registry.ports.values()
                ),
                pid=pid,
                generation=generation(),
            )
        if self.worker:
            return
        self._storeSockets()
        if answer != "go":
            # A first start, or a predecessor that is gone: nobody else
            # tells systemd or the pidfile about this process.
            self._notify("READY=1", f"MAINPID={pid}")
            self._writePidFile(pid)

    def _storeSockets(self) -> None:
        """
        Give systemd a copy of every listening socket (its fd store), so
        that a crash or a C{systemctl restart} queues connections instead of
        refusing them: the next start gets them back as C{LISTEN_FDS} and
        adopts them by name.  systemd keeps one copy of a socket however
        often it is sent, so every generation sends them.
        """
        if not sdnotify.fileDescriptorStore(self._environ):
            return
        for port in list(self._registry.ports.values()):
            try:
                fd = port.fileno()
            except Exception:
                continue
            sdnotify.notify(
                "FDSTORE=1", f"FDNAME={port.key}", "FDPOLL=0", fds=[fd]
            )

    def _notReady(self, reason: Failure) -> None:
        if self.state != STARTING:
            return
        self.exitStatus = 1
        if isinstance(reason.value, FirstError):
            reason = reason.value.subFailure
        log.error(
            "Not ready, stopping: {why}",
            why=f"{reason.type.__name__}: {reason.getErrorMessage()}",
            log_failure=reason,
        )
        self._stopReactor()

    # Signals

    def _onStopSignal(self, signum: int) -> None:
        name = signalName(signum)
        if self.state == HANDED_OVER and not self._stopAsked:
            # `systemctl stop` signals every process of the unit: a
            # predecessor that is draining goes on draining.
            self._stopAsked = True
            log.info(
                "Already draining after the handover ({signal}); a second "
                "signal aborts what is left",
                signal=name,
            )
            self._leave()  # A stop ends the probation.
            return
        if self._stopAsked:
            log.warn("Received {signal} again: aborting what is left", signal=name)
            self.hammer()
            return
        self._stopAsked = True
        log.info(
            "Received {signal}: stopping gracefully (a second signal aborts)",
            signal=name,
        )
        self.stop()

    def _onRestartSignal(self, signum: int) -> None:
        log.info("Received {signal}: restarting", signal=signalName(signum))
        self.restart().addErrback(lambda failure: None)

    def _stopAsWorker(self, why: str) -> None:
        if self._stopAsked or self._stopping:
            return
        # Counts as the first stop signal: a SIGTERM now hammers.
        self._stopAsked = True
        control = self._control
        if control is not None and control.passUp and control.transport is not None:
            # A roll: the drain passes connections up to the master, which
            # passes them on to a worker that stays.
            control.sender = HandoffSender(control.transport)
        log.info("Stopping: {why}", why=why)
        self._stopReactor()

    def _lameDuck(self) -> None:
        self.stopBegun = True

    def _hammerAsWorker(self) -> None:
        self._hammerAsked = True
        self._stopAsWorker("the master hammers")
        self.hammer()

    # Stop

    def stop(self) -> None:
        """
        Stop: after C{shutdownDelay} seconds of serving on, stop the reactor,
        which drains.  A successor still starting is killed at once (it
        never gets C{GO}), and no restart is started from now on.
        """
        self.stopBegun = True
        if self.workers is not None:
            self.workers.lameDuck()
        if self._successor is not None:
            # A stop wins over a restart in progress, shutdown delay or not:
            # the successor is killed before it gets GO, so it accepts
            # nothing, and this process stops as asked.
            self._successor.kill("was killed: the server is stopping")
        delay = self.settings.shutdownDelay
        if delay > 0 and self.state in (STARTING, SERVING, RESTARTING):
            log.info(
                "Serving {delay}s more before stopping (shutdown delay)", delay=delay
            )
            self._stopCall = self._reactor.callLater(delay, self._stopReactor)
        else:
            self._stopReactor()

    def _stopReactor(self) -> None:
        if self._stopCall is not None and self._stopCall.active():
            self._stopCall.cancel()
        self._stopCall = None
        if not self._stopping:
            try:
                self._reactor.stop()
            except Exception as e:  # ReactorNotRunning: already stopping
                log.debug("reactor.stop: {error}", error=e)

    def hammer(self) -> None:
        """
        Abort every remaining connection now, instead of at the deadline;
        during a shutdown delay, stop at once.
        """
        self._hammerAsked = True
        if self._stopCall is not None:
            self._stopReactor()
        if self._drain is not None:
            self._drain.hammer()
        if self.workers is not None and self._stopping:
            self.workers.hammer()

    def _beforeShutdown(self) -> Deferred[Any]:
        return self.shutdown(exiting=True)

    def shutdown(self, exiting: bool = False) -> Deferred[Any]:
        """
        Stop listening (this process's copies only), drain, and on a final
        stop remove the pidfile.  Every caller gets a Deferred that fires
        when that is done; it runs once.

        @param exiting: Whether the process exits afterwards (the reactor is
            shutting down).
        """
        waiter: Deferred[Any] = Deferred()
        if self._shutdownWaiters is None:
            self._shutdownWaiters = [waiter]
            self._startShutdown(exiting)
        elif self._shutdownResult is not None:
            waiter.callback(None)
        else:
            self._shutdownWaiters.append(waiter)
        return waiter

    def _startShutdown(self, exiting: bool) -> None:
        self._stopping = True
        self.stopBegun = True
        if self._stopCall is not None and self._stopCall.active():
            self._stopCall.cancel()
        if self._successor is not None:
            self._successor.kill("was killed: the server is stopping")
        # A process that never served (a successor whose hold failed) leaves
        # the sockets, their queues and the pidfile to the one that serves.
        final = (
            self.state != HANDED_OVER and not self._registry.handingOver and self._served
        )
        if self.state != HANDED_OVER:
            self.state = STOPPING
        if final and not self.worker:
            self._notify("STOPPING=1")
            self._stoppingSent = True
        done: Deferred[Any]
        if self.workers is not None:
            done = self.workers.stop(self.settings.hammerTimeout)
            if self._hammerAsked:
                self.workers.hammer()
        else:
            ports = list(self._registry.ports.values())
            if final or (self.worker and self._served):
                # Connections already queued would be reset when the last
                # copy of the socket closes; a worker's master may be closing.
                for port in ports:
                    acceptBacklog = getattr(port, "acceptBacklog", None)
                    if acceptBacklog is not None:
                        acceptBacklog()
            done = stopListening(ports)
            if self._drainWaiters is not None:
                # The drain began at the handover (see _startProbation).
                done.addCallback(lambda ignored: self._whenDrained())
            else:
                upstream = self._control.sender if self._control is not None else None
                done.addCallback(lambda ignored: self._startDrain(upstream))
            done.addCallback(lambda result: self._drained(result, exiting))
        if final and self.settings.pidFile is not None and not self.worker:
            pidFile = self.settings.pidFile

            def removeFiles(result: object) -> object:
                removePidFile(pidFile, os.getpid())
                removeRestartStatus(pidFile, os.getpid())
                return result

            done.addCallback(removeFiles)
        if not final and self._terminalLeader and exiting:
            done.addCallback(self._waitForProcessGroup)
        done.addErrback(
            lambda reason: log.failure("The stop failed", reason)  # type: ignore[func-returns-value]
        )
        done.addBoth(self._shutdownDone)

    def _shutdownDone(self, result: object) -> None:
        self._shutdownResult = True
        waiters, self._shutdownWaiters = self._shutdownWaiters or [], []
        for waiter in waiters:
            waiter.callback(None)

    def _startDrain(self, handoff: Any = None) -> Deferred[DrainResult]:
        """
        Drain this process's connections, moving those that can move through
        C{handoff} (a L{txgrace.handoff.HandoffSender}), if given.
        """
        self._drain, done = drainConnections(
            self._reactor,
            self._registry,
            self.settings.hammerTimeout,
            self.settings.drainRate,
            idleGrace=self.settings.idleGrace,
            handoff=handoff,
        )
        if self._hammerAsked:
            self._drain.hammer()
        self._draining = True
        waiters, self._drainingWaiters = self._drainingWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        return done

    def whenDraining(self) -> Deferred[None]:
        """
        A Deferred that fires when this process begins to drain (after a
        handover, or at a stop once the shutdown delay is over): long-lived
        requests, streams and background work should then end.
        """
        if self._draining:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._drainingWaiters.append(waiter)
        return waiter

    def _whenDrained(self) -> Deferred[DrainResult]:
        if self._drainResult is not None:
            return succeed(self._drainResult)
        waiter: Deferred[DrainResult] = Deferred()
        assert self._drainWaiters is not None
        self._drainWaiters.append(waiter)
        return waiter

    # Probation

    def _startProbation(self, successor: Any) -> None:
        """
        After the handover: stop accepting, drain, and keep this process's
        copies of the sockets until the drain is done and C{probation}
        seconds have passed; if the successor dies meanwhile, serve again.
        """
        self._handedOverAt = self._reactor.seconds()
        self.stopBegun = True
        self._registry.pauseAccepting()
        for port in list(self._registry.ports.values()):
            stopReading = getattr(port, "stopReading", None)
            if stopReading is not None:
                stopReading()
        ended = getattr(successor, "ended", None)
        if ended is not None:
            ended.addCallback(self._successorEnded, successor.pid)
        self._drainResult = None
        self._drainWaiters = []
        token = self._probationToken = object()

        def finished(result: DrainResult) -> DrainResult:
            if self._probationToken is not token:
                return result  # Given up: this process serves again.
            self._drainResult = result
            waiters, self._drainWaiters = self._drainWaiters or [], []
            for waiter in waiters:
                waiter.callback(result)
            self._leaveIfDone()
            return result

        self._startDrain(getattr(successor, "handoff", None)).addCallback(finished)
        probation = self.settings.probation
        if probation > 0:
            self._probationCall = self._reactor.callLater(probation, self._elapsed)
        else:
            self._probationElapsed = True
        self._leaveIfDone()

    def _elapsed(self) -> None:
        self._probationCall = None
        self._probationElapsed = True
        self._leaveIfDone()

    def _leaveIfDone(self) -> None:
        if self._probationElapsed and self._drainResult is not None:
            self._leave()

    def _leave(self) -> None:
        """
        End the probation: close this process's copies and exit once the
        drain is done.
        """
        if self._leaving or self.state != HANDED_OVER:
            return
        self._leaving = True
        if self._probationCall is not None and self._probationCall.active():
            self._probationCall.cancel()
        self._probationCall = None
        self._stopReactor()

    def _successorEnded(self, status: str, pid: int) -> None:
        """
        The successor exited.  If it died (not a clean exit, status 0) while
        this process still holds the sockets, serve again.
        """
        if self.state != HANDED_OVER or self._leaving or self._stopping:
            return
        if status == "status 0":
            return
        if self._drain is not None:
            self._drain.abandon()
            try:
                self._registry.removeConnectionLostObserver(self._drain.connectionLost)
            except ValueError:
                pass
            self._drain = None
        self._drainWaiters = None
        self._drainResult = None
        self._probationToken = None
        if self._probationCall is not None and self._probationCall.active():
            self._probationCall.cancel()
        self._probationCall = None
        self._probationElapsed = False
        self._stopAsked = False
        self.stopBegun = False
        self._draining = False
        self.state = SERVING
        self._handedOver = None
        waiters, self._reportWaiters = self._reportWaiters, []
        for waiter in waiters:
            waiter.errback(
                SuccessorFailed(f"successor pid {pid} died after it was ready ({status})")
            )
        self._registry.handingOver = False
        self._registry.resumeAccepting()
        pidNow = os.getpid()
        self._notify(f"MAINPID={pidNow}", "READY=1", f"STATUS=Successor pid {pid} died; serving again")
        self._writePidFile(pidNow)
        # Logged last: whoever reads this line finds the pidfile right.
        seconds = self._reactor.seconds() - self._handedOverAt
        log.error(
            "Successor pid {successor} died {seconds}s after ready ({status}); "
            "pid {pid} serves again",
            successor=pid,
            seconds=round(seconds, 1),
            status=status,
            pid=os.getpid(),
        )

    def whenRestarted(self) -> Deferred[RestartReport]:
        """
        A Deferred that fires with the L{RestartReport} of the restart in
        progress once this process's part is over (its drain and probation;
        in master mode, the roll), or fails with
        L{txgrace.restart.SuccessorFailed} if the successor died first.
        """
        waiter: Deferred[RestartReport] = Deferred()
        self._reportWaiters.append(waiter)
        return waiter

    def _report(self, successor: int, readyAt: float, inFlight: int, result: DrainResult) -> None:
        began, before = self._restartBegan
        report = RestartReport(
            oldPid=os.getpid(),
            successor=successor,
            handedOff=result.handedOff,
            drained=result.opened - result.handedOff - result.aborted,
            aborted=result.aborted,
            requestsInFlight=inFlight,
            triggerToReady=readyAt - began,
            readyToExit=self._reactor.seconds() - readyAt,
            before=before,
            after=listenCounters(),
        ).logged()
        waiters, self._reportWaiters = self._reportWaiters, []
        for waiter in waiters:
            waiter.callback(report)

    def _drained(self, result: DrainResult, exiting: bool) -> DrainResult:
        if self.state == HANDED_OVER and self._handedOver is not None:
            (successor, readyAt, inFlight), self._handedOver = self._handedOver, None
            self._report(successor, readyAt, inFlight, result)
        self.lastDrain = result
        self._drain = None
        if result.aborted:
            self.exitStatus = HAMMERED_EXIT_STATUS
            if exiting:
                _exitIfStuck(EXIT_AFTER_HAMMER_SECONDS, lambda: self.exitStatus)
        if exiting:
            # The process is about to exit: spare the interpreter's final
            # collection of every object (100-800 ms measured after a drain).
            gc.freeze()
        return result

    def _waitForProcessGroup(self, result: object) -> Deferred[object]:
        """
        In a terminal, stay until the successors in this process group have
        exited: the shell's job then goes on, Ctrl-C reaches the serving
        generation, and the terminal is not hung up under it.
        """
        pid = os.getpid()
        done: Deferred[object] = Deferred()

        def check() -> None:
            if not processGroupMembers(pid, pid):
                if poll.running:
                    poll.stop()
                done.callback(result)

        members = processGroupMembers(pid, pid)
        if not members:
            return succeed(result)
        log.info(
            "Pid {pid} stays in the terminal until pids {pids} exit "
            "(Ctrl-C stops the server)",
            pid=pid,
            pids=", ".join(str(m) for m in members),
        )
        poll = LoopingCall(check)
        poll.clock = self._reactor
        poll.start(0.2, now=False)
        return done

    # Restart

    def restart(self) -> Deferred[int]:
        """
        Start a successor and hand over to it once it is ready (in master
        mode: roll the workers).

        @return: A Deferred that fires with the successor's pid once it is
            ready (with this process's pid once a roll is done), or fails
            with L{RestartRefused} or L{txgrace.restart.SuccessorFailed};
            after a failure this process goes on serving.
        """
        asked = time.time()
        refusal = {
            STARTING: "this process is not ready yet",
            RESTARTING: (
                "a rolling restart is in progress"
                if self.workers is not None
                else f"successor pid {self._successor and self._successor.pid} "
                "is still starting"
            ),
            HANDED_OVER: "this process has handed over and is draining",
            STOPPING: "this process is stopping",
        }.get(self.state)
        if refusal is None and (self._stopping or self.stopBegun):
            # A stop was asked for (its shutdown delay may still run).
            refusal = "this process is stopping"
        if refusal is not None:
            log.warn("Restart refused: {why}", why=refusal)
            self._recordRestart(asked, "refused", reason=refusal)
            return fail(RestartRefused(refusal))
        self.state = RESTARTING
        # A refused trigger (above) does not restart the clock of the
        # restart in progress.
        self._restartBegan = (self._reactor.seconds(), listenCounters())
        self._relayedBefore = getattr(self.workers, "handedOff", 0)
        self._notify(*sdnotify.reloading())
        if self.workers is not None:
            rolled = self.workers.roll()
            return rolled.addCallbacks(
                lambda ignored: self._rolled(asked),
                self._restartFailed,
                errbackArgs=(asked,),
            )
        environment = {
            OWNED_SOCKETS_VARIABLE: ":".join(
                port.key
                for port in self._registry.ports.values()
                if getattr(port, "boundHere", False)
            )
        }
        if self.settings.pidFile is not None:
            environment[ENVIRONMENT["pidFile"]] = self.settings.pidFile
        command = successorCommand()
        output = None
        if self._host is not None:
            command = self._host.successorArguments(command)
            output = self._host.successorOutput()
        # The restart signals stay blocked from here to the successor's
        # first instructions (the mask survives exec; its trampoline then
        # ignores them, and its lifecycle unblocks them once it handles
        # them): one sent to it while it starts cannot kill it.
        blocked = blockSignals(self.settings.restartSignals)
        try:
            self._successor = self._spawn(
                self._reactor,
                list(self._registry.ports.values()),
                self.settings.readyTimeout,
                command=command,
                environment=environment,
                output=output,
                ignoreSignals=self.settings.restartSignals,
                handoff=self.settings.handoff,
            )
            started = self._successor.start()
        finally:
            restoreSignals(blocked)
            if output is not None:
                os.close(output)
        return started.addCallbacks(
            self._handOver,
            self._restartFailed,
            callbackArgs=(asked,),
            errbackArgs=(asked,),
        )

    def _rolled(self, asked: float) -> int:
        if self.state == RESTARTING:
            self.state = SERVING
            self._notify("READY=1")
        self._recordRestart(asked, "ready", successor=os.getpid())
        # The connections passed on through the master during this roll.
        handedOff = getattr(self.workers, "handedOff", 0) - self._relayedBefore
        self._report(
            os.getpid(),
            self._reactor.seconds(),
            0,
            DrainResult(opened=handedOff, aborted=0, seconds=0.0, handedOff=handedOff),
        )
        return os.getpid()

    def _handOver(self, pid: int, asked: float) -> int:
        successor, self._successor = self._successor, None
        if self.state != RESTARTING:
            return pid
        log.info(
            "Successor pid {successor} is ready; pid {pid} hands over and drains",
            successor=pid,
            pid=os.getpid(),
        )
        self.state = HANDED_OVER
        self._registry.handingOver = True
        self._handedOver = (pid, self._reactor.seconds(), requestsInFlight(self._registry.connections))
        self._notify(f"MAINPID={pid}", "READY=1")
        self._writePidFile(pid)
        self._recordRestart(asked, "ready", successor=pid)
        self._startProbation(successor)
        return pid

    def _restartFailed(self, reason: Failure, asked: float) -> Failure:
        self._successor = None
        why = reason.getErrorMessage()
        log.error(
            "Restart failed, pid {pid} goes on serving: {why}",
            pid=os.getpid(),
            why=why,
        )
        self._recordRestart(asked, "failed", reason=why)
        if self.state == RESTARTING:
            self.state = SERVING
            self._notify("READY=1", f"STATUS=Restart failed: {why}")
        return reason

    # Bookkeeping

    def _notify(self, *assignments: str) -> None:
        # READY=1 must never follow STOPPING=1.
        if self._stoppingSent and "READY=1" in assignments:
            return
        if self.worker:
            return
        sdnotify.notify(*assignments)

    def _writePidFile(self, pid: int) -> None:
        path = self.settings.pidFile
        if path is None or self.worker:
            return
        try:
            writePidFile(path, pid)
        except OSError as e:
            log.error("Cannot write pidfile {path!r}: {error}", path=path, error=e)

    def _recordRestart(self, asked: float, outcome: str, **details: Any) -> None:
        path = self.settings.pidFile
        if path is None or self.worker:
            return
        try:
            writeRestartStatus(
                path, {"pid": os.getpid(), "time": asked, "outcome": outcome, **details}
            )
        except OSError as e:
            log.error(
                "Cannot record the restart beside {path!r}: {error}", path=path, error=e
            )


def blockSignals(signals: Any) -> Any:
    """
    Block C{signals} in this thread; returns what to restore.
    """
    import signal as _signal

    return _signal.pthread_sigmask(_signal.SIG_BLOCK, set(signals))


def restoreSignals(mask: Any) -> None:
    import signal as _signal

    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)


def _exitIfStuck(seconds: float, status: Callable[[], int]) -> None:
    """
    Exit C{seconds} from now if the process is still alive then: a thread
    that never ends (a WSGI request still running after the hammer) must
    not keep it alive forever.  Exit handlers run and open files are
    flushed first.
    """

    def exitNow() -> None:
        stuck = [
            t.name
            for t in threading.enumerate()
            if t is not threading.current_thread() and t is not threading.main_thread()
        ]
        log.error(
            "Still running {seconds}s after the hammer (threads: {threads}); "
            "exiting now",
            seconds=seconds,
            threads=", ".join(stuck) or "none",
        )
        exitProcess(status())

    timer = threading.Timer(seconds, exitNow)
    timer.daemon = True
    timer.start()


def flushOpenFiles() -> None:
    """
    Flush every open file object that Python would flush at a normal exit.
    """
    import io

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    gc.unfreeze()  # Frozen objects (see _drained) are not listed otherwise.
    for obj in gc.get_objects():
        if isinstance(obj, io.IOBase):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except Exception:
                pass


def exitProcess(status: int, runExitHandlers: bool = True) -> None:
    """
    End the process now with C{status}, after running the exit handlers
    (unless called from one: they are running) and flushing open files, as a
    normal exit would.
    """
    try:
        if runExitHandlers:
            atexit._run_exitfuncs()
    finally:
        flushOpenFiles()
        os._exit(status)


_lifecycles: weakref.WeakKeyDictionary[SocketRegistry, ProcessLifecycle] = (
    weakref.WeakKeyDictionary()
)


def lifecycleFor(
    registry: SocketRegistry | None = None, reactor: Any = None
) -> ProcessLifecycle:
    """
    The lifecycle of the process whose sockets C{registry} holds (default:
    this process's), made on first use.
    """
    registry = processRegistry if registry is None else registry
    lifecycle = _lifecycles.get(registry)
    if lifecycle is None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        lifecycle = ProcessLifecycle(reactor, registry)
        _lifecycles[registry] = lifecycle
    return lifecycle


def whenDraining() -> Deferred[None]:
    """
    A Deferred that fires when this process begins to drain; see
    L{ProcessLifecycle.whenDraining}.
    """
    return lifecycleFor().whenDraining()


def configure(**settings: Any) -> None:
    """
    Configure this process's lifecycle from code: C{hammerTimeout},
    C{readyTimeout}, C{pidFile}, C{restartSignals}, C{shutdownDelay},
    C{probation}, C{drainRate}, C{handoff}, C{idleGrace}.
    These override the C{TXGRACE_*} environment variables.

    @raise txgrace.settings.SettingError: For an unknown setting or a bad
        value, naming it.
    """
    lifecycleFor().configure(**settings)
