# -*- test-case-name: txgrace.test.test_master -*-
"""
Master mode (C{twist txgrace --workers N}): a small process that holds the
listening sockets, keeps its pid for its whole life, and runs N workers.

A worker is a successor whose supervisor stays (see L{txgrace.restart}): it
receives the sockets as fds 3..n and a control channel, reports C{READY},
and drains on C{STOP} or when the master is gone.  The master never imports
the application and never accepts a connection; the workers accept from the
one shared socket, one connection per wakeup, so the kernel spreads the load.

  - SIGHUP/SIGUSR2: a rolling restart, one slot at a time (start the new
    worker, wait until it is ready, then keep the old one serving beside
    it for the probation and stop it).  A new worker that fails before
    ready, or dies within its probation, aborts the roll; the old workers
    go on serving, and a replacement is started for one that died.
  - A worker that exits on its own is started again, after a delay that
    doubles while it keeps failing.
  - SIGTERM/SIGINT: stop every worker (each drains); a second signal aborts.
  - As pid 1 (in a container) it also reaps orphaned processes.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    gatherResults,
    succeed,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgrace.adopt import HeldSocket, SocketRegistry, registry as processRegistry
from txgrace.lifecycle import IWorkers, blockSignals, restoreSignals, lifecycleFor
from txgrace.restart import Successor, SuccessorFailed

log = Logger()

FIRST_RESPAWN_DELAY = 0.5
MAX_RESPAWN_DELAY = 30.0
STABLE_SECONDS = 10.0
"""
A worker that served this long before it exited is restarted after
L{FIRST_RESPAWN_DELAY} again, not after a longer delay.
"""


class _Slot:
    """
    One of the N places for a worker.

    @ivar worker: The worker serving in it, or L{None}.
    @ivar respawnDelay: The delay before the next respawn.
    @ivar previous: The worker that C{worker} replaced, serving on until
        C{worker} has lasted the probation, or L{None}.
    @ivar probationWaiters: Deferreds that fire when the probation ends:
        with L{None} once C{previous} is stopped, or with the reason if
        C{worker} died first (C{previous} then serves on).
    """

    def __init__(self, number: int) -> None:
        self.number = number
        self.worker: Successor | None = None
        self.readyAt = 0.0
        self.respawnDelay = FIRST_RESPAWN_DELAY
        self.respawnCall: Any = None
        self.previous: Successor | None = None
        self.retireCall: Any = None
        self.probationWaiters: list[Deferred[str | None]] = []

    def endProbation(self, reason: str | None) -> None:
        """
        Tell whoever waits how the probation ended (L{None}: the new worker
        lasted it).
        """
        waiters, self.probationWaiters = self.probationWaiters, []
        for waiter in waiters:
            waiter.callback(reason)


@implementer(IWorkers)
class MasterService(Service):
    """
    Holds the sockets of C{endpoints} and runs C{workers} workers on them.
    The process's lifecycle (L{txgrace.lifecycle}) drives it: its states,
    signals, readiness, pidfile and sd_notify are the lifecycle's, and this
    service is its policy for workers (L{IWorkers}).

    The settings (C{hammerTimeout}, ..., C{drainRate}, C{probation}; see
    L{txgrace.GraceService}) are the master's; L{None} leaves one to the
    environment and its default.  C{probation} keeps an old worker until
    its replacement has served that long.  Workers run C{command} and take
    their own settings from it and the environment (C{twist txgrace}
    passes the same options), so a worker's drain follows its own
    C{drainRate}.

    @ivar workerPids: The pids of the workers serving now, by slot.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        workers: int,
        hammerTimeout: float | None = None,
        readyTimeout: float | None = None,
        pidFile: str | None = None,
        restartSignals: Sequence[int] | None = None,
        shutdownDelay: float | None = None,
        reactor: Any = None,
        registry: SocketRegistry | None = None,
        command: Sequence[str] | None = None,
        drainRate: float | None = None,
        probation: float | None = None,
        handoff: bool | None = None,
        idleGrace: float | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self._reactor = reactor
        self._registry = processRegistry if registry is None else registry
        self.lifecycle = lifecycleFor(self._registry, reactor)
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
        self._descriptions = list(endpoints)
        self._slots = [_Slot(n) for n in range(1, workers + 1)]
        self._command = command
        self._sockets: list[HeldSocket] = []
        self._draining: set[Successor] = set()
        self._relayed = 0
        self._starting: set[Successor] = set()
        self._stopping = False
        self._everReady = False
        self._reaper: LoopingCall | None = None

    @property
    def workerPids(self) -> dict[int, int | None]:
        return {
            slot.number: slot.worker.pid if slot.worker else None for slot in self._slots
        }

    # Start

    def startService(self) -> None:
        """
        Take charge of the process and every socket now (so that a bad
        endpoint fails the start); the lifecycle starts the workers once
        the reactor runs.
        """
        Service.startService(self)
        self.lifecycle.workers = self
        self.lifecycle.install()
        for description in self._descriptions:
            endpoint = serverFromString(self._reactor, description)
            self._sockets.append(endpoint.hold())
        # Inherited sockets that no endpoint claimed stay open (close-on-exec,
        # so no worker gets them) until the lifecycle is ready: it names them
        # to systemd's fd store (FDSTOREREMOVE=1) before it closes them.
        if os.getpid() == 1:
            self._reactor.callWhenRunning(self._startReaper)

    def _startReaper(self) -> None:
        self._reaper = LoopingCall(reapOrphans)
        self._reaper.clock = self._reactor
        self._reaper.start(1.0, now=False)

    def start(self) -> Deferred[None]:
        """
        Start a worker in every slot; fires once all serve, or fails if one
        fails before the first start is done (a bad C{--app} ends the
        master instead of restarting workers that never become ready).
        """
        starts = [self._fill(slot) for slot in self._slots]
        done = gatherResults(starts, consumeErrors=True)

        def ready(ignored: object) -> None:
            self._everReady = True

        def failed(reason: Failure) -> Failure:
            return reason.value.subFailure if isinstance(reason.value, FirstError) else reason

        return done.addCallbacks(ready, failed)

    def announce(self) -> None:
        """
        Log C{Master pid N serving <addresses> with K workers (pids ...)}.
        """
        log.info(
            "Master pid {pid} serving {addresses} with {count} workers (pids {pids})",
            pid=os.getpid(),
            addresses=", ".join(s.describe() for s in self._sockets),
            count=len(self._slots),
            pids=", ".join(str(p) for p in self.workerPids.values()),
        )

    def _spawn(self) -> tuple[Successor, Deferred[int]]:
        worker = Successor(
            self._reactor,
            self._sockets,
            self.lifecycle.settings.readyTimeout,
            self._command,
            worker=True,
            ignoreSignals=self.lifecycle.settings.restartSignals,
            handoff=self.lifecycle.settings.handoff,
        )
        self._starting.add(worker)
        blocked = blockSignals(self.lifecycle.settings.restartSignals)
        try:
            started = worker.start()
        finally:
            restoreSignals(blocked)

        def done(result: Any) -> Any:
            self._starting.discard(worker)
            return result

        started.addBoth(done)
        return worker, started

    def _fill(self, slot: _Slot) -> Deferred[None]:
        """
        Start a worker in C{slot}; retry with backoff until one is ready.

        @return: A Deferred that fires once a worker serves in C{slot}.
        """
        if self._stopping:
            return succeed(None)
        worker, started = self._spawn()
        filled: Deferred[None] = Deferred()

        def ready(pid: int) -> None:
            self._serveIn(slot, worker)
            filled.callback(None)

        def failed(reason: Failure) -> None:
            if self._stopping:
                filled.callback(None)
                return
            if not self._everReady:
                log.error(
                    "Worker for slot {slot} failed before the master was ready: "
                    "{why}; stopping",
                    slot=slot.number,
                    why=reason.getErrorMessage(),
                )
                filled.errback(reason)
                return
            delay = self._nextDelay(slot)
            log.error(
                "Worker for slot {slot} failed: {why}; retrying in {delay}s",
                slot=slot.number,
                why=reason.getErrorMessage(),
                delay=delay,
            )
            slot.respawnCall = self._reactor.callLater(
                delay, lambda: self._fill(slot).chainDeferred(filled)
            )

        started.addCallbacks(ready, failed)
        return filled

    def _nextDelay(self, slot: _Slot) -> float:
        delay = slot.respawnDelay
        slot.respawnDelay = min(delay * 2, MAX_RESPAWN_DELAY)
        return delay

    def _serveIn(self, slot: _Slot, worker: Successor) -> None:
        if slot.respawnCall is not None and slot.respawnCall.active():
            slot.respawnCall.cancel()
        old = slot.worker
        slot.worker = worker
        slot.readyAt = self._reactor.seconds()
        worker.ended.addCallback(self._workerEnded, slot, worker)
        if old is not None and old is not worker:
            # A roll and a respawn can meet in one slot: one worker each.
            self._draining.add(old)
            self._retire(slot)
            probation = self.lifecycle.settings.probation
            if probation > 0 and not self._stopping:
                # On probation: the old worker serves on beside the new one
                # and stops only once the new one has served that long; if
                # the new one dies first, the old one serves on alone.
                slot.previous = old
                slot.retireCall = self._reactor.callLater(probation, self._retire, slot)
            else:
                old.stop(relayTo=lambda: self._handoffTarget(slot), relayed=self._countRelayed)

    @property
    def handedOff(self) -> int:
        """
        How many connections retiring workers passed on to the workers that
        stay, through this master.
        """
        return self._relayed

    def _countRelayed(self) -> None:
        self._relayed += 1

    def _handoffTarget(self, slot: _Slot) -> Any:
        """
        The sender of the worker that takes a retiring worker's connections:
        the one now serving in its slot, else any that serves and takes
        them; L{None} when the master is stopping or none does.
        """
        if self._stopping:
            return None
        slots = [slot] + [s for s in self._slots if s is not slot]
        for candidate in slots:
            worker = candidate.worker
            if worker is not None and worker not in self._draining and worker.handoff is not None:
                return worker.handoff
        return None

    def _retire(self, slot: _Slot) -> None:
        """
        Stop the worker a slot kept on probation, if any.
        """
        if slot.retireCall is not None and slot.retireCall.active():
            slot.retireCall.cancel()
        slot.retireCall = None
        previous, slot.previous = slot.previous, None
        if previous is not None:
            previous.stop(relayTo=lambda: self._handoffTarget(slot), relayed=self._countRelayed)
        slot.endProbation(None)

    def _workerEnded(self, status: str, slot: _Slot, worker: Successor) -> None:
        self._draining.discard(worker)
        if slot.previous is worker:
            # The old worker is gone anyway: nothing left to fall back on.
            if slot.retireCall is not None and slot.retireCall.active():
                slot.retireCall.cancel()
            slot.retireCall = slot.previous = None
            slot.endProbation(None)
        if slot.worker is not worker:
            log.info("Worker pid {pid} exited with {status}", pid=worker.pid, status=status)
            return
        slot.worker = None
        if self._stopping:
            return
        previous = slot.previous
        if previous is not None:
            if slot.retireCall is not None and slot.retireCall.active():
                slot.retireCall.cancel()
            slot.retireCall = slot.previous = None
            self._draining.discard(previous)
            slot.worker = previous
            seconds = round(self._reactor.seconds() - slot.readyAt, 1)
            # The old worker serves until a replacement has lasted its own
            # probation; the replacement is started as any respawn is.
            delay = self._nextDelay(slot)
            slot.respawnCall = self._reactor.callLater(delay, self._fill, slot)
            log.error(
                "Worker pid {pid} (slot {slot}) died {seconds}s after ready "
                "({status}); worker pid {previous} serves on, and a "
                "replacement starts in {delay}s",
                pid=worker.pid,
                slot=slot.number,
                seconds=seconds,
                status=status,
                previous=previous.pid,
                delay=delay,
            )
            slot.endProbation(
                f"worker pid {worker.pid} (slot {slot.number}) died {seconds}s "
                f"after ready ({status})"
            )
            return
        if self._reactor.seconds() - slot.readyAt >= STABLE_SECONDS:
            slot.respawnDelay = FIRST_RESPAWN_DELAY
        delay = self._nextDelay(slot)
        log.error(
            "Worker pid {pid} (slot {slot}) exited with {status}; starting "
            "another in {delay}s",
            pid=worker.pid,
            slot=slot.number,
            status=status,
            delay=delay,
        )
        slot.respawnCall = self._reactor.callLater(delay, self._fill, slot)

    # Rolling restart

    def roll(self) -> Deferred[None]:
        """
        Replace every worker, one slot at a time (the lifecycle calls this
        for a restart; call L{txgrace.lifecycle.ProcessLifecycle.restart}
        to have the refusals and bookkeeping too).

        @return: A Deferred that fires when the roll is done (every new
            worker has lasted the probation), or fails with
            L{SuccessorFailed}: a new worker failed before it was ready, or
            died within its probation (the old workers go on serving).
        """
        log.info("Rolling restart of {count} workers", count=len(self._slots))
        return Deferred.fromCoroutine(self._roll())

    async def _roll(self) -> None:
        died: list[str] = []
        probations: list[Deferred[None]] = []

        def noteDeath(reason: str | None) -> None:
            if reason is not None:
                died.append(reason)

        try:
            for slot in self._slots:
                if died:
                    # A new worker died within its probation: the next
                    # slots keep their old workers.
                    raise SuccessorFailed(died[0])
                worker, started = self._spawn()
                await started
                self._serveIn(slot, worker)
                if self._stopping:
                    return
                probations.append(self._probationOf(slot).addCallback(noteDeath))
            for ended in probations:
                await ended
            if self._stopping:
                return
            if died:
                raise SuccessorFailed(died[0])
        except SuccessorFailed as e:
            log.error("Rolling restart aborted; the old workers go on serving: {why}", why=e)
            raise
        log.info(
            "Rolling restart done: workers {pids}",
            pids=", ".join(str(p) for p in self.workerPids.values()),
        )

    def _probationOf(self, slot: _Slot) -> Deferred[str | None]:
        """
        A Deferred that fires when the probation of C{slot}'s new worker
        ends (see L{_Slot.probationWaiters}); at once if there is none.
        """
        if slot.previous is None:
            return succeed(None)
        ended: Deferred[str | None] = Deferred()
        slot.probationWaiters.append(ended)
        return ended

    # Stop

    def stopService(self) -> Deferred[Any]:
        """
        Stop as the reactor's shutdown does (both wait for the same stop).
        """
        Service.stopService(self)
        return self.lifecycle.shutdown()

    def stop(self, hammerTimeout: float) -> Deferred[None]:
        """
        Stop every worker (each drains within its hammer deadline), then
        close the sockets.  Workers still running after the hammer deadline
        and a few seconds more are killed.
        """
        self._stopping = True
        if self._reaper is not None and self._reaper.running:
            self._reaper.stop()
        for slot in self._slots:
            if slot.respawnCall is not None and slot.respawnCall.active():
                slot.respawnCall.cancel()
            if slot.retireCall is not None and slot.retireCall.active():
                slot.retireCall.cancel()
            slot.retireCall = slot.previous = None
            slot.endProbation(None)
        for worker in list(self._starting):
            worker.kill("was killed: the master is stopping")
        workers = self._liveWorkers()
        # Close the master's copies first: the last worker to stop listening
        # closes each socket after taking what is queued on it.
        for held in self._sockets:
            held.close(final=False)
        for worker in workers:
            worker.stop()
        waits = [w.ended for w in workers]
        deadline = None
        if hammerTimeout >= 0:
            deadline = self._reactor.callLater(hammerTimeout + 5, self._killAll, workers)

        def stopped(_: object) -> None:
            if deadline is not None and deadline.active():
                deadline.cancel()
            for held in self._sockets:
                held.close(final=True)
            log.info("Master pid {pid} stopped", pid=os.getpid())

        return DeferredList(waits).addCallback(stopped)

    def _liveWorkers(self) -> list[Successor]:
        return [s.worker for s in self._slots if s.worker] + list(self._draining)

    def hammer(self) -> None:
        """
        Have every worker abort its remaining connections now.
        """
        log.warn("Hammering every worker")
        for worker in self._liveWorkers():
            worker.hammer()

    def lameDuck(self) -> None:
        """
        Tell every worker that the master is stopping.
        """
        for worker in self._liveWorkers():
            worker.lameDuck()

    def _killAll(self, workers: list[Successor]) -> None:
        for worker in workers:
            log.error("Worker pid {pid} did not stop; killing it", pid=worker.pid)
            worker.signal("KILL")


def zombieChildren(parent: int) -> list[int]:
    """
    The children of C{parent} that have exited and are waiting to be reaped.
    """
    zombies = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == b"Z" and int(fields[1]) == parent:
            zombies.append(int(name))
    return zombies


def reapOrphans() -> None:
    """
    As pid 1, reap the zombies of processes that were orphaned and handed to
    us, leaving Twisted's own children to Twisted.
    """
    from twisted.internet import process

    ours = set(process.reapProcessHandlers)
    for pid in zombieChildren(os.getpid()):
        if pid not in ours:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
