# -*- test-case-name: txgrace.test.test_report -*-
"""
What one restart did, from the old process's side: logged as one structured
line when its part is over, and the result of L{GraceService.restart}.

The kernel's C{ListenOverflows} and C{ListenDrops} counters (TcpExt in
C{/proc/net/netstat}, for the whole network namespace) are read at the
trigger and at the end, so an operator can see that no connection was
dropped from a full listen queue meanwhile (by this server or any other in
the namespace).
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.logger import Logger

log = Logger()

NETSTAT = "/proc/net/netstat"


@dataclass(frozen=True)
class ListenCounters:
    """
    The kernel's counters of connections lost to a full listen queue.

    @ivar overflows: C{ListenOverflows}.
    @ivar drops: C{ListenDrops}.
    """

    overflows: int
    drops: int


def listenCounters(path: str = NETSTAT) -> ListenCounters | None:
    """
    Read C{ListenOverflows} and C{ListenDrops} from C{path}.

    @return: The counters, or L{None} where the kernel does not give them.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if not names.startswith("TcpExt:"):
            continue
        table = dict(zip(names.split()[1:], values.split()[1:]))
        try:
            return ListenCounters(int(table["ListenOverflows"]), int(table["ListenDrops"]))
        except (KeyError, ValueError):
            return None
    return None


@dataclass(frozen=True)
class RestartReport:
    """
    One restart, seen by the process that handed over.

    @ivar oldPid: The process that handed over.
    @ivar successor: The pid that serves now (the master's own in master
        mode, where workers were rolled).
    @ivar handedOff: Connections that moved to the successor.
    @ivar drained: Connections that ended here on their own terms.
    @ivar aborted: Connections the hammer aborted.
    @ivar requestsInFlight: Requests in flight at the handover, which this
        process answered (unless the hammer aborted their connection).
    @ivar triggerToReady: Seconds from the trigger to the successor's
        readiness.
    @ivar readyToExit: Seconds from readiness to the end of this process's
        part (its drain and probation).
    @ivar before: The listen-queue counters at the trigger, or L{None}.
    @ivar after: The same at the end, or L{None}.
    """

    oldPid: int
    successor: int
    handedOff: int
    drained: int
    aborted: int
    requestsInFlight: int
    triggerToReady: float
    readyToExit: float
    before: ListenCounters | None
    after: ListenCounters | None

    @property
    def listenDropped(self) -> int | None:
        """
        How much C{ListenOverflows} plus C{ListenDrops} grew meanwhile, or
        L{None} where they cannot be read.
        """
        if self.before is None or self.after is None:
            return None
        return (self.after.overflows - self.before.overflows) + (
            self.after.drops - self.before.drops
        )

    def logged(self) -> RestartReport:
        """
        Log this report as one structured event; return it.
        """
        log.info(
            "Restart report: pid {oldPid} handed over to pid {successor}; "
            "connections handed off {handedOff}, drained {drained}, aborted "
            "{aborted}; requests in flight finished here {requestsInFlight}; "
            "trigger to ready {triggerToReady}s, ready to exit {readyToExit}s; "
            "listen queue drops meanwhile {listenDropped}",
            oldPid=self.oldPid,
            successor=self.successor,
            handedOff=self.handedOff,
            drained=self.drained,
            aborted=self.aborted,
            requestsInFlight=self.requestsInFlight,
            triggerToReady=round(self.triggerToReady, 3),
            readyToExit=round(self.readyToExit, 3),
            listenDropped=self.listenDropped,
            listenOverflowsBefore=self.before and self.before.overflows,
            listenOverflowsAfter=self.after and self.after.overflows,
            listenDropsBefore=self.before and self.before.drops,
            listenDropsAfter=self.after and self.after.drops,
        )
        return self
