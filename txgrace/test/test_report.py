"""
Tests for L{txgrace.report}: the kernel's listen-queue counters and the
report of one restart, logged and given to L{GraceService.restart}'s caller.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from txgrace.drain import DrainResult
from txgrace.report import ListenCounters, RestartReport, listenCounters
from txgrace.restart import SuccessorFailed
from txgrace.test.test_lifecycle import FakeSuccessor, LifecycleTestCase

NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPHPHits
TcpExt: 0 0 7 9 1234
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


class ListenCountersTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_read(self) -> None:
        """
        C{ListenOverflows} and C{ListenDrops} are read from the TcpExt table.
        """
        self.assertEqual(listenCounters(self.write(NETSTAT)), ListenCounters(7, 9))

    def test_missing(self) -> None:
        """
        No file, or no such counters: L{None}.
        """
        self.assertIsNone(listenCounters(self.mktemp()))
        self.assertIsNone(listenCounters(self.write("IpExt: A\nIpExt: 1\n")))

    def test_thisKernel(self) -> None:
        """
        This machine's kernel gives them (Linux).
        """
        if not os.path.exists("/proc/net/netstat"):
            raise self.skipTest("no /proc/net/netstat")
        self.assertIsInstance(listenCounters(), ListenCounters)

    def test_dropped(self) -> None:
        """
        What the counters grew by, or L{None} when either reading is missing.
        """
        report = RestartReport(1, 2, 3, 4, 0, 5, 0.5, 0.1, ListenCounters(7, 9), ListenCounters(8, 11))
        self.assertEqual(report.listenDropped, 3)
        self.assertIsNone(RestartReport(1, 2, 3, 4, 0, 5, 0.5, 0.1, None, None).listenDropped)


class LifecycleReportTests(LifecycleTestCase):
    """
    The lifecycle reports a restart once its part is over.
    """

    def test_report(self) -> None:
        """
        After the drain and the probation, the report counts what the drain
        did and when, and L{whenRestarted} fires with it.
        """
        lifecycle = self.serving(probation=1)
        lifecycle.restart()
        self.reactor.advance(2)
        [successor] = FakeSuccessor.made
        successor.result.callback(successor.pid)
        reported = lifecycle.whenRestarted()
        [(drain, _)] = self.drains
        self.reactor.advance(0.5)
        drain.done.callback(DrainResult(10, 1, 0.5, handedOff=7))
        self.reactor.advance(1)
        self.assertTrue(self.reactor.hasStopped)
        # What the reactor's shutdown does, without its exit (a timer that
        # would end this test process after a hammer).
        lifecycle.shutdown(exiting=False)
        report = self.successResultOf(reported)
        self.assertEqual(
            (report.oldPid, report.successor, report.handedOff, report.drained, report.aborted),
            (os.getpid(), successor.pid, 7, 2, 1),
        )
        self.assertEqual((report.triggerToReady, report.readyToExit), (2.0, 1.5))

    def test_successorDies(self) -> None:
        """
        A successor that dies during the probation fails the report: the
        restart did not take.
        """
        lifecycle = self.serving(probation=5)
        lifecycle.restart()
        [successor] = FakeSuccessor.made
        successor.ended = __import__("twisted.internet.defer", fromlist=["x"]).Deferred()
        successor.result.callback(successor.pid)
        reported = lifecycle.whenRestarted()
        successor.ended.callback("signal 9")
        self.failureResultOf(reported, SuccessorFailed)


class GraceServiceReportTests(LifecycleTestCase):
    def test_restartFiresWithReport(self) -> None:
        """
        L{GraceService.restart} fires with the report once the old process's
        part is over, not with the pid at readiness.
        """
        from txgrace import lifecycle as lifecycleModule
        from txgrace.service import GraceService

        lifecycle = self.serving(probation=0)
        self.patch(lifecycleModule, "_lifecycles", {self.registry: lifecycle})
        service = GraceService(registry=self.registry, reactor=self.reactor)
        self.assertIs(service.lifecycle, lifecycle)
        result = service.restart()
        [successor] = FakeSuccessor.made
        successor.result.callback(successor.pid)
        self.assertNoResult(result)
        [(drain, _)] = self.drains
        drain.done.callback(DrainResult(4, 0, 0.1, handedOff=4))
        lifecycle.shutdown(exiting=False)
        report = self.successResultOf(result)
        self.assertIsInstance(report, RestartReport)
        self.assertEqual((report.successor, report.handedOff), (successor.pid, 4))
