"""
The process lifecycle as a state machine (L{txgrace.lifecycle}), transition
by transition, on L{MemoryReactorClock} with no process: readiness, restart,
handover, rollback, stop, hammer, signals, settings.
"""

from __future__ import annotations

import os
import signal
import weakref
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

import txgrace
from txgrace import lifecycle as lifecycleModule
from txgrace.adopt import SocketRegistry
from txgrace.drain import DrainResult
from txgrace.lifecycle import (
    HANDED_OVER,
    RESTARTING,
    SERVING,
    STARTING,
    STOPPING,
    ProcessLifecycle,
    RestartRefused,
    lifecycleFor,
)
from txgrace.pidfile import readRestartStatus
from txgrace.service import GraceService
from txgrace.restart import GO_TIMEOUT, ControlChannel, SuccessorFailed
from txgrace.settings import SettingError, resolve
from txgrace.test.test_process import shortTemporaryDirectory as temporaryDirectory


class FakePort:
    """
    A listening port that records what the lifecycle does to it.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self.backlogAccepted = 0
        self.stopped = 0
        self.factory = None

    def describe(self) -> str:
        return f"tcp:127.0.0.1:{self.key}"

    def acceptBacklog(self) -> None:
        self.backlogAccepted += 1

    def stopListening(self) -> Deferred[None]:
        self.stopped += 1
        return succeed(None)

    def fileno(self) -> int:
        return -1


class FakeSuccessor:
    """
    Stands in for L{Successor}: the test decides when it is ready or fails.
    """

    made: list[FakeSuccessor]

    def __init__(self, reactor: Any, ports: list[Any], readyTimeout: float, **kw: Any):
        self.ports = ports
        self.readyTimeout = readyTimeout
        self.options = kw
        self.pid = 4000 + len(FakeSuccessor.made)
        self.result: Deferred[int] = Deferred()
        self.killed: str | None = None
        FakeSuccessor.made.append(self)

    def start(self) -> Deferred[int]:
        return self.result

    def kill(self, why: str) -> None:
        if self.result.called:
            return
        self.killed = why
        self.result.errback(SuccessorFailed(f"successor pid {self.pid} {why}"))


class MemoryReactorWithProcesses(MemoryReactorClock):
    """
    A memory reactor whose spawned processes never do anything.
    """

    def __init__(self) -> None:
        MemoryReactorClock.__init__(self)
        self.spawned: list[Any] = []
        self.signalled: list[str] = []

    def run(self) -> None:
        """
        Run the start hooks, and go on "running" (L{MemoryReactorClock.run}
        stops at once).
        """
        self.running = True
        self.hasRun = True
        for f, args, kwargs in self.whenRunningHooks:
            f(*args, **kwargs)

    def spawnProcess(self, protocol: Any, executable: str, args: Any, **kw: Any) -> Any:
        reactor = self

        class Process:
            pid = 5150

            def signalProcess(self, name: str) -> None:
                reactor.signalled.append(name)

        self.spawned.append((executable, args, kw))
        return Process()


def shutDown(reactor: MemoryReactorClock) -> list[Deferred[Any]]:
    """
    Run the reactor's before-shutdown triggers, as C{reactor.stop()} would.
    """
    return [
        f(*a, **kw) for f, a, kw in reactor.triggers.get("before", {}).get("shutdown", [])
    ]


class LifecycleTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        FakeSuccessor.made = []
        self.reactor = MemoryReactorWithProcesses()
        self.registry = SocketRegistry(inherit=lambda: [])
        self.port = FakePort("8080")
        self.registry.ports["tcp/*/8080"] = self.port
        self.notified: list[tuple[str, ...]] = []
        self.patch(lifecycleModule.sdnotify, "notify", self._notify)
        self.drains: list[Any] = []
        self.drainOptions: list[dict[str, Any]] = []
        self.patch(lifecycleModule, "drainConnections", self._drainConnections)
        self.pidFile = os.path.join(temporaryDirectory(self), "app.pid")

    def _notify(self, *assignments: str) -> bool:
        self.notified.append(assignments)
        return True

    def _drainConnections(
        self, clock: Any, registry: Any, hammerTimeout: Any, drainRate: Any = 0, **kw: Any
    ) -> Any:
        drain = FakeDrain()
        self.drains.append((drain, hammerTimeout))
        self.drainOptions.append(kw)
        return drain, drain.done

    def makeLifecycle(self, environ: dict[str, str] | None = None, **settings: Any) -> ProcessLifecycle:
        lifecycle = ProcessLifecycle(
            self.reactor,
            self.registry,
            spawn=FakeSuccessor,
            environ={} if environ is None else environ,
            host=lambda: None,
        )
        lifecycle.installSignalHandlers = False
        lifecycle.configure(pidFile=self.pidFile, **settings)
        return lifecycle

    def serving(self, **settings: Any) -> ProcessLifecycle:
        lifecycle = self.makeLifecycle(**settings)
        lifecycle.install()
        self.reactor.run()
        self.assertEqual(lifecycle.state, SERVING)
        self.notified.clear()
        return lifecycle

    def readPidFile(self) -> int:
        with open(self.pidFile) as f:
            return int(f.read())

    def servingWithSuccessors(self, **settings: Any) -> ProcessLifecycle:
        """
        A serving lifecycle that spawns real L{Successor}s (on the memory
        reactor, whose processes do nothing).
        """
        lifecycle = ProcessLifecycle(
            self.reactor, self.registry, environ={}, host=lambda: None
        )
        lifecycle.installSignalHandlers = False
        lifecycle.configure(pidFile=self.pidFile, **settings)
        lifecycle.install()
        self.reactor.run()
        self.assertEqual(lifecycle.state, SERVING)
        self.notified.clear()
        return lifecycle

    def successorControl(self) -> tuple[Any, StringTransport]:
        """
        Connect this process's end of the last successor's control channel
        to a L{StringTransport}: the protocol is fed what the successor
        says, and the transport holds what this process says to it.
        """
        _, _, factory = self.reactor.adoptedStreamConnections[-1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


class FakeDrain:
    def __init__(self) -> None:
        self.done: Deferred[DrainResult] = Deferred()
        self.hammered = 0

    def hammer(self) -> None:
        self.hammered += 1

    def abandon(self) -> None:
        self.abandoned = True

    def connectionLost(self, connection: Any) -> None:
        pass

    def finish(self, aborted: int = 0) -> None:
        self.done.callback(DrainResult(1, aborted, 0.5))


class StartTests(LifecycleTestCase):
    def test_installOnce(self) -> None:
        """
        Installing twice registers one shutdown trigger and one start hook.
        """
        lifecycle = self.makeLifecycle()
        lifecycle.install()
        lifecycle.install()
        self.assertEqual(len(self.reactor.triggers["before"]["shutdown"]), 1)
        self.assertEqual(len(self.reactor.whenRunningHooks), 1)

    def test_notAcceptingUntilReady(self) -> None:
        """
        Ports accept nothing until the reactor runs and every hold has fired;
        then the process serves, tells systemd, and writes its pidfile.
        """
        lifecycle = self.makeLifecycle()
        hold: Deferred[None] = Deferred()
        lifecycle.install()
        lifecycle.holdReadiness(hold)
        self.assertFalse(self.registry.accepting)
        self.reactor.run()
        self.assertEqual(lifecycle.state, STARTING)
        self.assertFalse(self.registry.accepting)
        hold.callback(None)
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)
        self.assertEqual(self.notified, [("READY=1", f"MAINPID={os.getpid()}")])
        self.assertEqual(self.readPidFile(), os.getpid())

    def test_failedHoldStops(self) -> None:
        """
        A hold that fails stops the process with status 1; it never serves.
        """
        lifecycle = self.makeLifecycle()
        lifecycle.install()
        lifecycle.holdReadiness(fail(RuntimeError("cache warm-up failed")))
        self.reactor.run()
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(lifecycle.state, STARTING)
        self.assertEqual(lifecycle.exitStatus, 1)
        self.assertFalse(self.registry.accepting)
        self.assertEqual(self.notified, [])
        self.assertFalse(os.path.exists(self.pidFile))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_listenFailureStops(self) -> None:
        """
        A listen that fails after it started (its Deferred fails later)
        stops the process instead of letting it become ready without the
        port; the listen's own caller still sees the failure.
        """
        lifecycle = self.makeLifecycle()
        lifecycle.install()
        listened: Deferred[Any] = Deferred()
        seen: list[Failure] = []
        lifecycle.listening(listened).addErrback(seen.append)
        self.reactor.run()
        self.assertEqual(lifecycle.state, STARTING)
        listened.errback(RuntimeError("address in use"))
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(len(seen), 1)
        seen[0].trap(RuntimeError)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_neverServedStopLeavesTheSockets(self) -> None:
        """
        A process that stops before it served (a successor whose hold
        failed) takes nothing queued, and says nothing to systemd.
        """
        lifecycle = self.makeLifecycle()
        lifecycle.install()
        lifecycle.holdReadiness(Deferred())
        self.reactor.run()
        shutDown(self.reactor)
        self.assertEqual(lifecycle.state, STOPPING)
        self.assertEqual(self.port.backlogAccepted, 0)
        self.assertEqual(self.port.stopped, 1)
        self.assertEqual(self.notified, [])


class RestartTests(LifecycleTestCase):
    def test_refusedWhileStarting(self) -> None:
        """
        A restart before the process is ready is refused.
        """
        lifecycle = self.makeLifecycle()
        lifecycle.install()
        failure = self.failureResultOf(lifecycle.restart(), RestartRefused)
        self.assertEqual(failure.getErrorMessage(), "this process is not ready yet")
        self.assertEqual(FakeSuccessor.made, [])
        status = readRestartStatus(self.pidFile)
        assert status is not None
        self.assertEqual(status["outcome"], "refused")

    def test_handOver(self) -> None:
        """
        A restart spawns a successor with the ports, the ready timeout and
        the restart signals ignored; once it is ready this process tells
        systemd and the pidfile, and stops the reactor (which drains).
        """
        lifecycle = self.serving(readyTimeout=7)
        result = lifecycle.restart()
        self.assertEqual(lifecycle.state, RESTARTING)
        self.assertEqual(self.notified[0][0], "RELOADING=1")
        [successor] = FakeSuccessor.made
        self.assertEqual(successor.ports, [self.port])
        self.assertEqual(successor.readyTimeout, 7.0)
        self.assertEqual(
            successor.options["ignoreSignals"], (signal.SIGHUP, signal.SIGUSR2)
        )
        self.assertEqual(
            successor.options["environment"],
            {"TXGRACE_OWNED_SOCKETS": "", "TXGRACE_PIDFILE": self.pidFile},
        )
        successor.result.callback(successor.pid)
        self.assertEqual(self.successResultOf(result), successor.pid)
        self.assertEqual(lifecycle.state, HANDED_OVER)
        self.assertTrue(self.registry.handingOver)
        self.assertEqual(self.notified[-1], (f"MAINPID={successor.pid}", "READY=1"))
        self.assertEqual(self.readPidFile(), successor.pid)
        # The drain begins at once; the sockets stay until it is done and
        # the default probation (5 s) is over.
        [(drain, _)] = self.drains
        self.assertEqual(self.port.stopped, 0)
        self.assertFalse(self.registry.accepting)
        self.assertFalse(self.reactor.hasStopped)
        drain.finish()
        self.assertFalse(self.reactor.hasStopped)
        self.reactor.advance(5)
        self.assertTrue(self.reactor.hasStopped)
        status = readRestartStatus(self.pidFile)
        assert status is not None
        self.assertEqual((status["outcome"], status["successor"]), ("ready", successor.pid))

    def test_ownedSocketsHandedOn(self) -> None:
        """
        The successor is told, in C{TXGRACE_OWNED_SOCKETS}, the keys of the
        ports whose UNIX socket paths this process owns (C{boundHere}), and
        only those: its final stop then removes them.
        """
        owned, other = FakePort("unix/web"), FakePort("unix/api")
        owned.boundHere = True  # type: ignore[attr-defined]
        other.boundHere = False  # type: ignore[attr-defined]
        self.registry.ports = {"unix/web": owned, "unix/api": other, "tcp/*/8080": self.port}
        lifecycle = self.serving()
        lifecycle.restart()
        [successor] = FakeSuccessor.made
        self.assertEqual(
            successor.options["environment"]["TXGRACE_OWNED_SOCKETS"], "unix/web"
        )

    def test_secondRestartRefused(self) -> None:
        """
        A restart while a successor starts is refused, and so is one after
        the handover.
        """
        lifecycle = self.serving()
        lifecycle.restart()
        failure = self.failureResultOf(lifecycle.restart(), RestartRefused)
        self.assertIn("is still starting", failure.getErrorMessage())
        FakeSuccessor.made[0].result.callback(4000)
        failure = self.failureResultOf(lifecycle.restart(), RestartRefused)
        self.assertEqual(
            failure.getErrorMessage(), "this process has handed over and is draining"
        )
        self.assertEqual(len(FakeSuccessor.made), 1)

    def test_failedRestartGoesOnServing(self) -> None:
        """
        A successor that fails leaves this process serving; systemd hears
        READY=1 with the reason, and a later restart works.
        """
        lifecycle = self.serving()
        result = lifecycle.restart()
        FakeSuccessor.made[0].kill("exited with status 1 before it was ready")
        self.failureResultOf(result, SuccessorFailed)
        self.assertEqual(lifecycle.state, SERVING)
        self.assertEqual(self.notified[-1][0], "READY=1")
        self.assertIn("exited with status 1", self.notified[-1][1])
        self.assertEqual(self.readPidFile(), os.getpid())
        status = readRestartStatus(self.pidFile)
        assert status is not None
        self.assertEqual(status["outcome"], "failed")
        lifecycle.restart()
        self.assertEqual(len(FakeSuccessor.made), 2)
        self.assertEqual(lifecycle.state, RESTARTING)

    def test_successorNeverAnswers(self) -> None:
        """
        A real L{Successor} that never reports ready is killed at the ready
        timeout, and the process goes on serving.
        """
        lifecycle = ProcessLifecycle(
            self.reactor, self.registry, environ={}, host=lambda: None
        )
        lifecycle.installSignalHandlers = False
        lifecycle.configure(readyTimeout=3)
        lifecycle.install()
        self.reactor.run()
        result = lifecycle.restart()
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(2.9)
        self.assertNoResult(result)
        self.reactor.advance(0.2)
        failure = self.failureResultOf(result, SuccessorFailed)
        self.assertEqual(
            failure.getErrorMessage(),
            "successor pid 5150 was not ready within 3s and was killed",
        )
        self.assertEqual(self.reactor.signalled, ["KILL"])
        self.assertEqual(lifecycle.state, SERVING)


class StopTests(LifecycleTestCase):
    def test_finalStop(self) -> None:
        """
        A final stop accepts the queued connections, stops listening,
        drains, says STOPPING=1 and removes the pidfile once drained.
        """
        lifecycle = self.serving(hammerTimeout=9)
        [stopped] = shutDown(self.reactor)
        self.assertEqual(lifecycle.state, STOPPING)
        self.assertEqual((self.port.backlogAccepted, self.port.stopped), (1, 1))
        self.assertEqual(self.notified, [("STOPPING=1",)])
        [(drain, hammerTimeout)] = self.drains
        self.assertEqual(hammerTimeout, 9.0)
        self.assertNoResult(stopped)
        self.assertTrue(os.path.exists(self.pidFile))
        drain.finish()
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(self.pidFile))
        self.assertEqual(lifecycle.exitStatus, 0)

    def test_twoStops(self) -> None:
        """
        A second stop (the service's stopService after the reactor's
        trigger) waits for the same drain; the drain runs once.
        """
        lifecycle = self.serving()
        [first] = shutDown(self.reactor)
        second = lifecycle.shutdown()
        self.assertEqual(len(self.drains), 1)
        self.assertEqual(self.port.backlogAccepted, 1)
        self.drains[0][0].finish()
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(lifecycle.shutdown())

    def test_servedWorkerTakesItsShareOfTheBacklog(self) -> None:
        """
        A worker that served takes what is queued when it stops, even when
        it is only retiring (it cannot tell a rolling restart from its
        master's final stop), but within an accept limit of 1: one
        connection per wakeup, its share alongside the other workers.  It
        leaves the sockets to its master.
        """
        self.patch(lifecycleModule, "takeControlChannel", lambda environ: (None, True))
        lifecycle = self.serving()
        self.assertTrue(lifecycle.worker)
        self.assertEqual(self.registry.acceptLimit, 1)
        self.assertTrue(self.registry.handingOver)
        shutDown(self.reactor)
        self.assertEqual((self.port.backlogAccepted, self.port.stopped), (1, 1))
        self.assertEqual(self.notified, [])

    def test_handedOverStop(self) -> None:
        """
        After a handover the stop leaves the queue, the pidfile and systemd
        to the successor.
        """
        lifecycle = self.serving()
        lifecycle.restart()
        FakeSuccessor.made[0].result.callback(4000)
        [stopped] = shutDown(self.reactor)
        self.assertEqual(lifecycle.state, HANDED_OVER)
        self.assertEqual((self.port.backlogAccepted, self.port.stopped), (0, 1))
        self.drains[0][0].finish()
        self.successResultOf(stopped)
        self.assertEqual(self.readPidFile(), 4000)
        self.assertNotIn(("STOPPING=1",), self.notified)

    def test_stopWhileRestarting(self) -> None:
        """
        A stop while a successor starts kills it, and it never gets GO: a
        READY it sends afterwards is not answered, so it accepts nothing.
        This process makes the final stop (it takes the queued connections)
        and tells systemd READY=1 (the restart failed) before STOPPING=1,
        never after.
        """
        lifecycle = self.servingWithSuccessors()
        result = lifecycle.restart()
        control, transport = self.successorControl()
        [stopped] = shutDown(self.reactor)
        self.assertEqual(self.reactor.signalled, ["KILL"])
        failure = self.failureResultOf(result, SuccessorFailed)
        self.assertEqual(
            failure.getErrorMessage(),
            "successor pid 5150 was killed: the server is stopping",
        )
        control.dataReceived(b"READY\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(lifecycle.state, STOPPING)
        self.assertEqual(self.readPidFile(), os.getpid())
        self.assertEqual((self.port.backlogAccepted, self.port.stopped), (1, 1))
        self.assertEqual(
            [n[0] for n in self.notified], ["RELOADING=1", "READY=1", "STOPPING=1"]
        )
        self.drains[0][0].finish()
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(self.pidFile))

    def test_noReadyAfterStopping(self) -> None:
        """
        Once STOPPING=1 is sent, a READY=1 that anything asks for is
        dropped (systemd would take the stopping unit for ready again).
        """
        lifecycle = self.serving()
        shutDown(self.reactor)
        self.assertEqual(self.notified, [("STOPPING=1",)])
        lifecycle._notify("READY=1", "STATUS=late")
        lifecycle._notify("STATUS=still stopping")
        self.assertEqual(
            self.notified, [("STOPPING=1",), ("STATUS=still stopping",)]
        )

    def test_goAfterReady(self) -> None:
        """
        Without a stop, a successor's READY is answered with GO once this
        process has handed over (the counterpart of the tests above: the
        transport does carry GO when there is one).
        """
        lifecycle = self.servingWithSuccessors()
        result = lifecycle.restart()
        control, transport = self.successorControl()
        control.dataReceived(b"READY\n")
        self.assertEqual(self.successResultOf(result), 5150)
        self.assertEqual(lifecycle.state, HANDED_OVER)
        self.assertEqual(transport.value(), b"GO\n")

    def test_restartRefusedWhileStopping(self) -> None:
        """
        A restart is refused once a stop was asked for: after the stop
        signal, before the reactor's shutdown began, and while stopping.
        """
        lifecycle = self.serving()
        lifecycle._onStopSignal(signal.SIGTERM)
        failure = self.failureResultOf(lifecycle.restart(), RestartRefused)
        self.assertEqual(failure.getErrorMessage(), "this process is stopping")
        shutDown(self.reactor)
        failure = self.failureResultOf(lifecycle.restart(), RestartRefused)
        self.assertEqual(failure.getErrorMessage(), "this process is stopping")
        self.assertEqual(FakeSuccessor.made, [])
        self.assertEqual(lifecycle.state, STOPPING)
        status = readRestartStatus(self.pidFile)
        assert status is not None
        self.assertEqual(status["outcome"], "refused")

    def test_hammerExitStatus(self) -> None:
        """
        A drain that had to abort connections sets the exit status to 1.
        """
        lifecycle = self.serving()
        self.patch(lifecycleModule, "_exitIfStuck", lambda seconds, status: None)
        [stopped] = shutDown(self.reactor)
        self.drains[0][0].finish(aborted=2)
        self.successResultOf(stopped)
        self.assertEqual(lifecycle.exitStatus, 1)


class ProbationTests(LifecycleTestCase):
    """
    After a handover the process keeps its copies of the sockets while it
    drains (and at least C{probation} seconds), and serves again if its
    successor dies meanwhile.
    """

    def handOver(self, **settings: Any) -> tuple[ProcessLifecycle, FakeSuccessor]:
        lifecycle = self.serving(**settings)
        lifecycle.restart()
        successor = FakeSuccessor.made[-1]
        successor.ended = Deferred()
        successor.result.callback(successor.pid)
        self.assertEqual(lifecycle.state, HANDED_OVER)
        return lifecycle, successor

    def test_successorDiesDuringDrain(self) -> None:
        """
        A successor that dies after ready, while this process drains: this
        process serves again (accepting, pidfile, MAINPID), its drain is
        given up, and a later restart works.
        """
        lifecycle, successor = self.handOver()
        drain = self.drains[0][0]
        successor.ended.callback("signal 9")
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)
        self.assertFalse(self.registry.handingOver)
        self.assertEqual(self.readPidFile(), os.getpid())
        self.assertEqual(self.notified[-1][:2], (f"MAINPID={os.getpid()}", "READY=1"))
        self.assertEqual(self.port.stopped, 0)
        self.assertTrue(drain.abandoned)
        drain.finish()  # The abandoned drain finishing does not stop us.
        self.assertFalse(self.reactor.hasStopped)
        again = lifecycle.restart()
        self.assertEqual(len(FakeSuccessor.made), 2)
        # A final stop now drains anew.
        FakeSuccessor.made[-1].kill("exited with status 1 before it was ready")
        self.failureResultOf(again, SuccessorFailed)
        [stopped] = shutDown(self.reactor)
        self.assertEqual(len(self.drains), 2)
        self.assertNoResult(stopped)
        self.drains[1][0].finish()
        self.successResultOf(stopped)

    def test_cleanExitIsNoDeath(self) -> None:
        """
        A successor that exits 0 (it handed over in turn, or was stopped)
        is not taken over from.
        """
        lifecycle, successor = self.handOver()
        successor.ended.callback("status 0")
        self.assertEqual(lifecycle.state, HANDED_OVER)
        self.assertEqual(self.readPidFile(), successor.pid)

    def test_defaultProbation(self) -> None:
        """
        By default the sockets are kept 5 s after the handover even when the
        drain ends at once, so a successor that dies 1 s after ready is
        taken over.
        """
        lifecycle, successor = self.handOver()
        self.drains[0][0].finish()
        self.reactor.advance(1)
        self.assertFalse(self.reactor.hasStopped)
        successor.ended.callback("status 4")
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)

    def test_noProbation(self) -> None:
        """
        With C{probation=0} the sockets are kept only while the drain lasts.
        """
        lifecycle, successor = self.handOver(probation=0)
        self.assertFalse(self.reactor.hasStopped)
        self.drains[0][0].finish()
        self.assertTrue(self.reactor.hasStopped)

    def test_probationOutlastsDrain(self) -> None:
        """
        With C{probation}, the sockets are kept that long even if the drain
        is over sooner; a death within it is taken over, one after it is not.
        """
        lifecycle, successor = self.handOver(probation=5)
        self.drains[0][0].finish()
        self.reactor.advance(4.9)
        self.assertFalse(self.reactor.hasStopped)
        self.reactor.advance(0.2)
        self.assertTrue(self.reactor.hasStopped)
        successor.ended.callback("signal 9")
        self.assertEqual(lifecycle.state, HANDED_OVER)

    def test_stopSignalEndsProbation(self) -> None:
        """
        A stop signal during the probation ends it: a successor that dies
        afterwards is not taken over.
        """
        lifecycle, successor = self.handOver(probation=30)
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertTrue(self.reactor.hasStopped)
        successor.ended.callback("signal 9")
        self.assertEqual(lifecycle.state, HANDED_OVER)


class SignalTests(LifecycleTestCase):
    def test_secondSignalHammers(self) -> None:
        """
        The first SIGTERM stops the reactor; the second hammers the drain.
        """
        lifecycle = self.serving()
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertTrue(self.reactor.hasStopped)
        shutDown(self.reactor)
        [(drain, _)] = self.drains
        self.assertEqual(drain.hammered, 0)
        lifecycle._onStopSignal(signal.SIGINT)
        self.assertEqual(drain.hammered, 1)

    def test_shutdownDelay(self) -> None:
        """
        With a shutdown delay the process serves on that long; a second
        signal meanwhile stops at once and hammers.
        """
        lifecycle = self.serving(shutdownDelay=5)
        lifecycle._onStopSignal(signal.SIGTERM)
        self.reactor.advance(4.9)
        self.assertFalse(self.reactor.hasStopped)
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertTrue(self.reactor.hasStopped)
        shutDown(self.reactor)
        self.assertEqual(self.drains[0][0].hammered, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_shutdownDelayServesOn(self) -> None:
        """
        During the shutdown delay the process is lame: a health check fails
        (C{stopBegun}) but it still accepts, nothing drains and systemd has
        heard nothing; once the delay is over the reactor stops and the
        final stop drains.
        """
        lifecycle = self.serving(shutdownDelay=5)
        draining = lifecycle.whenDraining()
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertTrue(lifecycle.stopBegun)
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)
        self.reactor.advance(4.9)
        self.assertFalse(self.reactor.hasStopped)
        self.assertNoResult(draining)
        self.assertEqual((self.drains, self.notified), ([], []))
        self.reactor.advance(0.2)
        self.assertTrue(self.reactor.hasStopped)
        shutDown(self.reactor)
        self.successResultOf(draining)
        self.assertEqual(self.notified, [("STOPPING=1",)])
        self.assertEqual(self.port.backlogAccepted, 1)

    def test_reactorStopDuringShutdownDelay(self) -> None:
        """
        A C{reactor.stop()} from application code during the shutdown delay
        drains at once; the delayed stop is cancelled.
        """
        lifecycle = self.serving(shutdownDelay=5)
        lifecycle._onStopSignal(signal.SIGTERM)
        [stopped] = shutDown(self.reactor)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(len(self.drains), 1)
        self.drains[0][0].finish()
        self.successResultOf(stopped)

    def test_restartRefusedDuringShutdownDelay(self) -> None:
        """
        A restart signal during the shutdown delay starts no successor: the
        process stops as asked when the delay is over.
        """
        lifecycle = self.serving(shutdownDelay=5)
        lifecycle._onStopSignal(signal.SIGTERM)
        lifecycle._onRestartSignal(signal.SIGHUP)
        failure = self.failureResultOf(lifecycle.restart(), RestartRefused)
        self.assertEqual(failure.getErrorMessage(), "this process is stopping")
        self.assertEqual(FakeSuccessor.made, [])
        self.assertEqual(lifecycle.state, SERVING)
        self.reactor.advance(5)
        self.assertTrue(self.reactor.hasStopped)
        shutDown(self.reactor)
        self.assertEqual(lifecycle.state, STOPPING)
        self.assertEqual(self.notified[-1], ("STOPPING=1",))

    def test_stopWhileRestartingWithShutdownDelay(self) -> None:
        """
        With a shutdown delay, a stop while a successor starts kills it at
        once: it never gets GO (its READY is not answered), this process
        serves on through the delay and then makes the final stop, instead
        of handing over.
        """
        lifecycle = self.servingWithSuccessors(shutdownDelay=5)
        result = lifecycle.restart()
        control, transport = self.successorControl()
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertEqual(self.reactor.signalled, ["KILL"])
        self.failureResultOf(result, SuccessorFailed)
        control.dataReceived(b"READY\n")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(lifecycle.stopBegun)
        self.assertTrue(self.registry.accepting)
        self.assertFalse(self.registry.handingOver)
        self.reactor.advance(4.9)
        self.assertFalse(self.reactor.hasStopped)
        self.reactor.advance(0.2)
        self.assertTrue(self.reactor.hasStopped)
        [stopped] = shutDown(self.reactor)
        self.assertEqual(lifecycle.state, STOPPING)
        self.assertEqual(self.port.backlogAccepted, 1)
        self.assertEqual(self.notified[-1], ("STOPPING=1",))
        self.assertEqual(self.readPidFile(), os.getpid())
        self.drains[0][0].finish()
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(self.pidFile))

    def test_handedOverSurvivesFirstSignal(self) -> None:
        """
        A process draining after its handover goes on draining after the
        first SIGTERM (systemctl stop signals every process of the unit);
        the second one hammers.
        """
        lifecycle = self.serving()
        lifecycle.restart()
        FakeSuccessor.made[0].result.callback(4000)
        drain = self.drains[0][0]
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertEqual(drain.hammered, 0)
        lifecycle._onStopSignal(signal.SIGTERM)
        self.assertEqual(drain.hammered, 1)


class HandshakeTests(LifecycleTestCase):
    """
    A successor's side of the READY / GO handshake: ready, it tells its
    predecessor and accepts nothing until C{GO} (or its predecessor is gone,
    or says nothing within L{GO_TIMEOUT}).
    """

    def successor(self, **settings: Any) -> tuple[ProcessLifecycle, ControlChannel, StringTransport]:
        """
        A lifecycle started as a successor (with a control channel on a
        L{StringTransport}), once its reactor runs.
        """
        transport = StringTransport()
        channels: list[ControlChannel] = []

        def adopt(reactor: Any, fd: int, channel: ControlChannel) -> ControlChannel:
            channel.makeConnection(transport)
            channels.append(channel)
            return channel

        self.patch(lifecycleModule, "takeControlChannel", lambda environ: (99, False))
        self.patch(lifecycleModule, "adoptControlChannel", adopt)
        lifecycle = self.makeLifecycle(**settings)
        lifecycle.install()
        self.reactor.run()
        return lifecycle, channels[0], transport

    def test_acceptsOnlyAfterGo(self) -> None:
        """
        A ready successor says READY and accepts nothing until GO; then it
        serves, and leaves systemd's MAINPID and the pidfile to its
        predecessor (which wrote them before it said GO).
        """
        lifecycle, channel, transport = self.successor()
        self.assertEqual(transport.value(), b"HANDOFF\nREADY\n")
        self.assertEqual(lifecycle.state, STARTING)
        self.assertFalse(self.registry.accepting)
        self.reactor.advance(GO_TIMEOUT - 0.1)
        self.assertFalse(self.registry.accepting)
        channel.dataReceived(b"GO\n")
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)
        self.assertEqual(self.notified, [])
        self.assertFalse(os.path.exists(self.pidFile))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noGoAcceptsAnyway(self) -> None:
        """
        A predecessor that does not say GO within L{GO_TIMEOUT} is hung:
        the successor accepts anyway, says why, and tells systemd and the
        pidfile itself.
        """
        with capturedLogs() as events:
            lifecycle, channel, transport = self.successor()
            self.reactor.advance(GO_TIMEOUT - 0.1)
            self.assertEqual(lifecycle.state, STARTING)
            self.assertFalse(self.registry.accepting)
            self.reactor.advance(0.2)
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)
        self.assertEqual(self.notified, [("READY=1", f"MAINPID={os.getpid()}")])
        self.assertEqual(self.readPidFile(), os.getpid())
        self.assertIn(
            f"No GO from the predecessor within {GO_TIMEOUT}s; accepting anyway",
            [formatEvent(e) for e in events],
        )
        channel.dataReceived(b"GO\n")  # Too late: nothing changes.
        self.assertEqual(len(self.notified), 1)

    def test_predecessorGone(self) -> None:
        """
        A predecessor that is gone (the channel closes) leaves the successor
        to serve on its own at once.
        """
        lifecycle, channel, transport = self.successor()
        channel.connectionLost(Failure(Exception("gone")))
        self.assertEqual(lifecycle.state, SERVING)
        self.assertTrue(self.registry.accepting)
        self.assertEqual(self.notified, [("READY=1", f"MAINPID={os.getpid()}")])

    def test_stopBeforeGo(self) -> None:
        """
        A successor stopped before its GO (its predecessor kills it; a
        C{systemctl stop} signals it too) never accepts, even if GO comes:
        it leaves the queued connections to the socket's other holder.
        """
        lifecycle, channel, transport = self.successor()
        lifecycle._onStopSignal(signal.SIGTERM)
        shutDown(self.reactor)
        channel.dataReceived(b"GO\n")
        self.assertEqual(lifecycle.state, STOPPING)
        self.assertFalse(self.registry.accepting)
        self.assertEqual(self.port.backlogAccepted, 0)
        self.assertEqual(self.notified, [])


class ControlChannelTests(SynchronousTestCase):
    """
    The child's end of the READY / GO handshake.
    """

    def test_readyThenGo(self) -> None:
        channel = ControlChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        go = channel.ready()
        self.assertEqual(transport.value(), b"READY\n")
        self.assertNoResult(go)
        channel.dataReceived(b"GO\n")
        self.assertEqual(self.successResultOf(go), "go")

    def test_handoffAnnounced(self) -> None:
        """
        A child that takes connections says C{HANDOFF} before C{READY}; one
        sent to a child that does not is refused, not left unanswered.
        """
        from txgrace.handoff import HandoffReceiver

        channel = ControlChannel(handoff=HandoffReceiver(SocketRegistry(inherit=lambda: [])))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.ready()
        self.assertEqual(transport.value(), b"HANDOFF\nREADY\n")
        plain = ControlChannel()
        transport = StringTransport()
        plain.makeConnection(transport)
        plain.dataReceived(b"CONN 7 - dGNw\n")
        self.assertEqual(transport.value(), b"REFUSED 7 this process takes no handoffs\n")

    def test_parentGone(self) -> None:
        channel = ControlChannel()
        channel.makeConnection(StringTransport())
        go = channel.ready()
        channel.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.successResultOf(go), "gone")

    def test_workerStopAndHammer(self) -> None:
        stops: list[str] = []
        hammers: list[bool] = []
        channel = ControlChannel(stops.append, lambda: hammers.append(True))
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"STOP\nHAMMER\n")
        self.assertEqual(stops, ["the master asked this worker to stop"])
        self.assertEqual(hammers, [True])


class SettingsTests(SynchronousTestCase):
    def test_order(self) -> None:
        """
        Code wins over the environment, which wins over the defaults.
        """
        settings = resolve(
            {"hammerTimeout": 5.0},
            {"TXGRACE_HAMMER_TIMEOUT": "7", "TXGRACE_READY_TIMEOUT": "8"},
        )
        self.assertEqual(
            (settings.hammerTimeout, settings.readyTimeout, settings.shutdownDelay),
            (5.0, 8.0, 0.0),
        )

    def test_signalsFromEnvironment(self) -> None:
        settings = resolve({}, {"TXGRACE_RESTART_SIGNALS": "HUP, SIGUSR1"})
        self.assertEqual(settings.restartSignals, (signal.SIGHUP, signal.SIGUSR1))

    def test_badEnvironment(self) -> None:
        """
        A bad value names the variable and the value.
        """
        for variable, value, message in [
            ("TXGRACE_HAMMER_TIMEOUT", "soon", "TXGRACE_HAMMER_TIMEOUT='soon': not a number of seconds"),
            ("TXGRACE_READY_TIMEOUT", "-1", "TXGRACE_READY_TIMEOUT='-1': must be 0 or more seconds"),
            ("TXGRACE_SHUTDOWN_DELAY", "nan", "TXGRACE_SHUTDOWN_DELAY='nan': not a finite number of seconds"),
            ("TXGRACE_RESTART_SIGNALS", "TERM", "TXGRACE_RESTART_SIGNALS='TERM': SIGTERM cannot restart: it stops the server"),
            ("TXGRACE_RESTART_SIGNALS", "KILL", "TXGRACE_RESTART_SIGNALS='KILL': SIGKILL cannot restart: it cannot be caught"),
            ("TXGRACE_RESTART_SIGNALS", "BOGUS", "TXGRACE_RESTART_SIGNALS='BOGUS': no such signal"),
            ("TXGRACE_PIDFILE", "/nonexistent/x.pid", "TXGRACE_PIDFILE='/nonexistent/x.pid': directory '/nonexistent' does not exist"),
        ]:
            with self.assertRaises(SettingError) as raised:
                resolve({}, {variable: value})
            self.assertEqual(str(raised.exception), message)

    def test_badCode(self) -> None:
        lifecycle = ProcessLifecycle(MemoryReactorClock(), SocketRegistry(lambda: []))
        with self.assertRaises(SettingError) as raised:
            lifecycle.configure(hammerTimout=3)
        self.assertIn("hammerTimout=: no such setting", str(raised.exception))
        with self.assertRaises(SettingError) as raised:
            lifecycle.configure(restartSignals=["INT"])
        self.assertIn("SIGINT cannot restart", str(raised.exception))


class ProcessWideTests(SynchronousTestCase):
    """
    One lifecycle per process, whoever configures it: L{txgrace.configure},
    L{GraceService}, C{twist txgrace}'s service and a bare C{grace:} port
    all reach the same L{ProcessLifecycle}.  These tests put a lifecycle of
    their own (on a memory reactor, with an environment of their own) in
    the table, keyed by this process's socket registry, and restore both.
    """

    def setUp(self) -> None:
        from txgrace.adopt import registry

        self.registry = registry
        self.reactor = MemoryReactorClock()
        self.patch(lifecycleModule, "_lifecycles", weakref.WeakKeyDictionary())
        self.patch(registry, "accepting", registry.accepting)

    def processLifecycle(self, environ: dict[str, str]) -> ProcessLifecycle:
        """
        Make this process's lifecycle, reading C{environ}.
        """
        lifecycle = ProcessLifecycle(
            self.reactor, self.registry, environ=environ, host=lambda: None
        )
        lifecycle.installSignalHandlers = False
        lifecycleModule._lifecycles[self.registry] = lifecycle
        return lifecycle

    def test_configureOrder(self) -> None:
        """
        The public L{txgrace.configure} sets this process's lifecycle: code
        beats the environment, which beats the defaults; a call after the
        install applies too.
        """
        lifecycle = self.processLifecycle(
            {"TXGRACE_HAMMER_TIMEOUT": "7", "TXGRACE_READY_TIMEOUT": "8"}
        )
        txgrace.configure(hammerTimeout=5)
        lifecycle.install()
        settings = lifecycle.settings
        self.assertEqual(
            (settings.hammerTimeout, settings.readyTimeout, settings.shutdownDelay),
            (5.0, 8.0, 0.0),
        )
        self.assertEqual(settings.restartSignals, (signal.SIGHUP, signal.SIGUSR2))
        txgrace.configure(readyTimeout=2, shutdownDelay=3)
        self.assertEqual(
            (lifecycle.settings.readyTimeout, lifecycle.settings.shutdownDelay),
            (2.0, 3.0),
        )
        with self.assertRaises(SettingError) as raised:
            txgrace.configure(hammerTimeout="soon")
        self.assertIn("hammerTimeout", str(raised.exception))

    def test_oneLifecycle(self) -> None:
        """
        L{GraceService}, C{twist txgrace}'s service, L{txgrace.configure}
        and a C{grace:} endpoint made by C{serverFromString} use the one
        lifecycle of the process; L{GraceService}'s settings are the
        process's.
        """
        from twisted.internet.endpoints import serverFromString

        from txgrace.endpoints import GraceServerEndpoint
        from txgrace.tap import _CommandLineService

        lifecycle = self.processLifecycle({})
        service = GraceService(hammerTimeout=0.5, reactor=self.reactor)
        command = _CommandLineService(reactor=self.reactor)
        txgrace.configure(readyTimeout=9)
        endpoint = serverFromString(self.reactor, "grace:tcp:0:interface=127.0.0.1")
        assert isinstance(endpoint, GraceServerEndpoint)
        self.assertIs(service.lifecycle, lifecycle)
        self.assertIs(command.lifecycle, lifecycle)
        self.assertIs(lifecycleFor(endpoint.registry, self.reactor), lifecycle)
        lifecycle.install()
        self.assertEqual(
            (lifecycle.settings.hammerTimeout, lifecycle.settings.readyTimeout),
            (0.5, 9.0),
        )

    def test_bindsInPrivilegedStartService(self) -> None:
        """
        L{GraceService}'s ports listen in C{privilegedStartService}, which
        twistd calls before C{--uid}/C{--gid} drop privileges (so a port
        below 1024 can be had); C{startService} listens on nothing more.  A
        listen that fails at once fails the privileged start.
        """
        from twisted.application.service import Application, IService
        from twisted.internet.error import CannotListenError
        from twisted.internet.protocol import Factory
        from twisted.internet.testing import StringTransport
        from zope.interface import implementer
        from twisted.internet.interfaces import IStreamServerEndpoint

        @implementer(IStreamServerEndpoint)
        class RecordingEndpoint:
            def __init__(self, fails: bool = False) -> None:
                self.listened = 0
                self.fails = fails

            def listen(self, factory: Any) -> Deferred[Any]:
                self.listened += 1
                if self.fails:
                    return fail(CannotListenError("127.0.0.1", 80, OSError("denied")))
                return succeed(StringTransport())

        lifecycle = self.processLifecycle({})
        endpoint = RecordingEndpoint()
        application = Application("privileged")
        service = GraceService(reactor=self.reactor)
        service.listen(endpoint, Factory())
        service.setServiceParent(application)
        IService(application).privilegedStartService()  # as twistd does
        self.assertTrue(lifecycle.installed)
        self.assertEqual(endpoint.listened, 1)
        IService(application).startService()
        self.assertEqual(endpoint.listened, 1)

        failing = GraceService(reactor=self.reactor)
        failing.listen(RecordingEndpoint(fails=True), Factory())
        self.assertRaises(CannotListenError, failing.privilegedStartService)

    def test_badEnvironmentIsOneLine(self) -> None:
        """
        A bad C{TXGRACE_*} value ends L{GraceService}'s start with one line
        naming the variable and the value, not a traceback.
        """
        self.processLifecycle({"TXGRACE_HAMMER_TIMEOUT": "soon"})
        service = GraceService(reactor=self.reactor, installSignalHandlers=False)
        for start in (service.privilegedStartService, service.startService):
            with self.assertRaises(SystemExit) as raised:
                start()
            self.assertEqual(
                str(raised.exception),
                "txgrace: error: TXGRACE_HAMMER_TIMEOUT='soon': not a number of seconds",
            )
