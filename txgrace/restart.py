# -*- test-case-name: txgrace.test.test_restart -*-
"""
Where the successor is spawned: the same command in the same directory and
environment, with the listening sockets as descriptors 3..n, and a private
control channel (a socketpair) on which it reports that it is ready.  A
successor that exits first, or is not ready in time, is killed and the
restart fails: the caller goes on serving.

The handshake on the control channel is C{READY} up, then C{GO} down: a
successor (or worker) accepts no connection before its parent says C{GO}.
A parent that is stopping, or that gave up on it, kills it instead, so a
successor never takes a queued connection and then dies with it.  A
successor whose predecessor is gone (the channel closes) takes over.

A successor that takes connections (L{txgrace.handoff}) says C{HANDOFF}
before C{READY}; its predecessor then keeps the channel open after C{GO} and
passes it the connections that are between two requests, each answered
with C{TOOK} or C{REFUSED}.  A successor that does not say it (an older
txgrace) is drained as before.

A master's worker is a successor whose supervisor stays: it keeps the
control channel open, drains when the master writes C{STOP}, and drains too
when the channel closes because the master is gone.

Both ends of the control channel live here: L{Successor} in the parent,
L{takeControlChannel} and L{ControlChannel} in the child.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from typing import Any, Callable, Mapping, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.protocols.basic import LineOnlyReceiver
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgrace.handoff import (
    CONN,
    HANDOFF,
    REFUSED,
    TOOK,
    HandoffReceiver,
    HandoffRelay,
    HandoffSender,
)
from txgrace.inherit import LISTEN_FDS_START, listenEnvironment, trampoline

log = Logger()

CONTROL_FD_VARIABLE = "TXGRACE_CONTROL_FD"
WORKER_VARIABLE = "TXGRACE_WORKER"
GENERATION_VARIABLE = "TXGRACE_GENERATION"
READY = b"READY"
GO = b"GO"
STOP = b"STOP"
HAMMER = b"HAMMER"
LAME_DUCK = b"LAMEDUCK"

CONTROL_LINE_LENGTH = 1 << 20
"""
The longest line on a control channel: a C{CONN} line carries a request
line that is still arriving (Twisted's HTTP allows 16 KiB), in base64.
"""

GO_TIMEOUT = 5.0
"""
Seconds a ready successor waits for C{GO} before it accepts anyway: a
predecessor that does not answer is hung, and serving twice beats serving
nobody.
"""


def _startDirectory(environ: Any = None) -> str:
    """
    The directory this process started in as the user sees it: C{$PWD} when
    it names the same directory as C{getcwd()}, so that a deploy that swaps a
    C{current -> releases/N} symlink restarts into the new release.
    """
    environ = os.environ if environ is None else environ
    cwd = os.getcwd()
    pwd = environ.get("PWD")
    if pwd and os.path.isabs(pwd) and pwd != cwd:
        try:
            if os.path.samefile(pwd, cwd):
                return str(pwd)
        except OSError:
            pass
    return cwd


startDirectory = _startDirectory()
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

    def processEnded(self, reason: Failure) -> None:
        self._successor._ended(reason)


@implementer(IFileDescriptorReceiver)
class _ControlProtocol(LineOnlyReceiver):
    """
    The parent's end of a child's control channel.
    """

    delimiter = b"\n"
    MAX_LENGTH = CONTROL_LINE_LENGTH

    def __init__(self, successor: Successor) -> None:
        self._successor = successor

    def lineReceived(self, line: bytes) -> None:
        successor = self._successor
        if line == READY:
            successor._becameReady()
        elif line == HANDOFF:
            successor.offersHandoff = True
        elif line.startswith(CONN + b" ") and successor.relay is not None:
            # A retiring worker passes a connection up.
            successor.relay.connectionReceived(line)
        elif successor.handoff is not None:
            successor.handoff.answerReceived(line)

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self._successor.relay is None:
            os.close(descriptor)
        else:
            self._successor.relay.descriptorReceived(descriptor)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._successor.handoff is not None:
            self._successor.handoff.lost()
        if self._successor.relay is not None:
            self._successor.relay.lost()


class Successor:
    """
    One process started with this process's listening sockets: a successor
    that takes over, or (C{worker=True}) a master's worker.

    @ivar pid: Its pid once spawned.
    @ivar controlFD: Its descriptor for the control channel.
    @ivar ended: Fires with a description of its exit status once it exits,
        ready or not.
    @ivar offersHandoff: Whether it said it takes connections.
    @ivar handoff: Once it is ready, the L{HandoffSender} that passes it
        connections, if it takes them and C{handoff} was asked for; else
        L{None}.
    @ivar relay: For a worker asked to stop and pass its connections on,
        the L{HandoffRelay} that does; else L{None}.

    @param environment: Variables to set in its environment.
    @param output: A descriptor for its stdout and stderr (default: ours).
    @param ignoreSignals: Signals it starts with ignored (the restart
        signals: one that reaches it before its handlers are installed must
        not kill it).
    @param handoff: Whether to pass it connections once it is ready (if it
        takes them).
    """

    def __init__(
        self,
        reactor: Any,
        ports: Sequence[Any],
        readyTimeout: float,
        command: Sequence[str] | None = None,
        worker: bool = False,
        environment: Mapping[str, str] | None = None,
        output: int | None = None,
        ignoreSignals: Sequence[int] = (),
        directory: str | None = None,
        handoff: bool = False,
    ) -> None:
        self._reactor = reactor
        self._wantsHandoff = handoff
        self.offersHandoff = False
        self.handoff: HandoffSender | None = None
        self.relay: HandoffRelay | None = None
        self._extraEnvironment = dict(environment or {})
        self._output = output
        self._ignoreSignals = tuple(ignoreSignals)
        self._directory = startDirectory if directory is None else directory
        self._ports = list(ports)
        self._readyTimeout = readyTimeout
        self._command = list(successorCommand() if command is None else command)
        self._worker = worker
        self._kind = "worker" if worker else "successor"
        self.controlFD = LISTEN_FDS_START + len(self._ports)
        self.pid: int | None = None
        self.ended: Deferred[str] = Deferred()
        self._result: Deferred[int] = Deferred()
        self._timeout: Any = None
        self._process: Any = None
        self._control: _ControlProtocol | None = None
        self._outcome: str | None = None

    def start(self) -> Deferred[int]:
        """
        Spawn the successor.

        @return: A Deferred that fires with its pid once it is ready, or fails
            with L{SuccessorFailed} saying why.
        """
        output = self._output
        childFDs: dict[int, Any] = {
            0: 0,
            1: 1 if output is None else output,
            2: 2 if output is None else output,
        }
        for index, port in enumerate(self._ports):
            childFDs[LISTEN_FDS_START + index] = port.fileno()
        environment = listenEnvironment(os.environ, [port.key for port in self._ports])
        environment.update(self._extraEnvironment)
        environment[CONTROL_FD_VARIABLE] = str(self.controlFD)
        if self._worker:
            environment[WORKER_VARIABLE] = "1"
            # The master speaks to systemd for its workers.
            environment.pop("NOTIFY_SOCKET", None)
        else:
            environment.pop(WORKER_VARIABLE, None)
            environment[GENERATION_VARIABLE] = str(generation() + 1)
        argv = trampoline(self._command, self._ignoreSignals)
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as e:
            self._fail(f"could not be started: {e}")
            return self._result
        childFDs[self.controlFD] = theirs.fileno()
        try:
            self._process = self._reactor.spawnProcess(
                _SuccessorProtocol(self),
                argv[0],
                argv,
                env=environment,
                path=self._directory,
                childFDs=childFDs,
            )
        except OSError as e:
            ours.close()
            self._fail(f"could not be started: {e}")
            return self._result
        finally:
            theirs.close()
        self._control = _ControlProtocol(self)
        ours.setblocking(False)
        self._reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, _OneProtocolFactory(self._control)
        )
        ours.close()
        self.pid = self._process.pid
        log.info(
            "Started {kind} pid {pid}: {command}",
            kind=self._kind,
            pid=self.pid,
            command=" ".join(self._command),
        )
        self._timeout = self._reactor.callLater(self._readyTimeout, self._tooSlow)
        return self._result

    def kill(self, why: str) -> None:
        """
        Kill a child that is not ready yet; its start fails with C{why}.
        """
        if self._outcome is not None:
            return
        self.signal("KILL")
        self._fail(why)

    def signal(self, name: str) -> None:
        """
        Send the signal C{name} (such as C{"TERM"}) if the child still runs.
        """
        try:
            self._process.signalProcess(name)
        except (ProcessExitedAlready, AttributeError):
            pass

    def stop(
        self,
        relayTo: Callable[[], HandoffSender | None] | None = None,
        relayed: Callable[[], None] | None = None,
    ) -> None:
        """
        Ask a worker to drain and exit.

        @param relayTo: Where its connections go instead of being closed:
            returns the sender of a worker that stays (or L{None} when none
            does), asked for each connection.  Only a worker that takes
            connections passes its own.
        @param relayed: Called for each connection passed on.
        """
        transport = self._control.transport if self._control is not None else None
        if relayTo is not None and self.offersHandoff and transport is not None:
            self.relay = HandoffRelay(transport, relayTo, relayed)
            self._send(STOP + b" " + HANDOFF)
        else:
            self._send(STOP)

    def hammer(self) -> None:
        """
        Ask a worker to abort its remaining connections now.
        """
        self._send(HAMMER)

    def lameDuck(self) -> None:
        """
        Tell a worker that its master is stopping (its health check then
        fails) while it still serves through the shutdown delay.
        """
        self._send(LAME_DUCK)

    def _send(self, line: bytes) -> None:
        control = self._control
        if control is not None and control.transport is not None:
            control.transport.write(line + b"\n")

    def _tooSlow(self) -> None:
        self._timeout = None
        self.kill(f"was not ready within {self._readyTimeout:g}s and was killed")

    def _becameReady(self) -> None:
        if self._outcome is not None:
            return
        self._outcome = "ready"
        self._cancelTimeout()
        assert self.pid is not None
        transport = self._control.transport if self._control is not None else None
        if self._wantsHandoff and self.offersHandoff and transport is not None:
            self.handoff = HandoffSender(transport)
        # First the caller's bookkeeping (MAINPID= to systemd, the pidfile),
        # then GO: the successor talks to systemd as its main process.  (The
        # caller's drain passes connections from the next reactor turn on,
        # after GO.)
        self._result.callback(self.pid)
        self._send(GO)
        if not self._worker and self.handoff is None and transport is not None:
            # A successor that takes no connections needs nothing more.
            transport.loseConnection()

    def _ended(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        status = f"signal {sig}" if sig is not None else f"status {code}"
        if self._control is not None and self._control.transport is not None:
            self._control.transport.loseConnection()
        self.ended.callback(status)
        if self._outcome == "ready":
            if not self._worker:
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
            Failure(SuccessorFailed(f"{self._kind} pid {self.pid} {why}"))
        )

    def _cancelTimeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


class _OneProtocolFactory(Factory):
    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


def takeControlChannel(environ: Any = None) -> tuple[int | None, bool]:
    """
    Take the control channel that a parent passed, if any: remove its
    variables from the environment and keep the application's subprocesses
    from inheriting it.

    @return: Its descriptor (L{None} when this process has no parent of
        ours), and whether this process is a master's worker.
    """
    environ = os.environ if environ is None else environ
    value = environ.pop(CONTROL_FD_VARIABLE, None)
    worker = environ.pop(WORKER_VARIABLE, None) == "1"
    if value is None:
        return None, False
    try:
        fd = int(value)
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    except (ValueError, OSError):
        log.error("Ignoring {variable}={value!r}", variable=CONTROL_FD_VARIABLE, value=value)
        return None, False
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    return fd, worker


@implementer(IFileDescriptorReceiver)
class ControlChannel(LineOnlyReceiver):
    """
    A child's end of its control channel: C{READY} goes up, C{GO} comes
    down; a worker also gets C{STOP} and C{HAMMER}, and a closed channel
    means its master is gone.  With a L{HandoffReceiver}, the child says
    C{HANDOFF} first and then serves the connections its parent passes.

    @ivar go: Fires with C{"go"} when the parent says C{GO}, or C{"gone"}
        when the channel closes first.
    """

    delimiter = b"\n"
    MAX_LENGTH = CONTROL_LINE_LENGTH

    def __init__(
        self,
        stop: Callable[[str], None] | None = None,
        hammer: Callable[[], None] | None = None,
        lameDuck: Callable[[], None] | None = None,
        handoff: HandoffReceiver | None = None,
    ) -> None:
        self._stop = stop
        self._hammer = hammer
        self._lameDuck = lameDuck
        self._handoff = handoff
        self.go: Deferred[str] = Deferred()
        self.passUp = False
        self.sender: HandoffSender | None = None

    def ready(self) -> Deferred[str]:
        """
        Tell the parent this process is ready (and whether it takes
        connections).

        @return: L{go}.
        """
        if self.transport is not None:
            if self._handoff is not None:
                self.sendLine(HANDOFF)
            self.sendLine(READY)
        return self.go

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self._handoff is None:
            os.close(descriptor)
        else:
            self._handoff.descriptorReceived(descriptor)

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(CONN + b" "):
            if self._handoff is not None:
                # HandoffReceiver answers for every connection, whatever
                # the application's protocol does.
                self.sendLine(self._handoff.connectionReceived(line))
            else:
                ident = line.split(b" ")[1:2] or [b"?"]
                self.sendLine(b"REFUSED " + ident[0] + b" this process takes no handoffs")
        elif line == GO and not self.go.called:
            self.go.callback("go")
        elif line == STOP and self._stop is not None:
            self._stop("the master asked this worker to stop")
        elif line == STOP + b" " + HANDOFF and self._stop is not None:
            # A roll: this worker's connections go to one that stays.
            self.passUp = True
            self._stop("the master asked this worker to stop")
        elif line.startswith((TOOK + b" ", REFUSED + b" ")) and self.sender is not None:
            self.sender.answerReceived(line)
        elif line == HAMMER and self._hammer is not None:
            self._hammer()
        elif line == LAME_DUCK and self._lameDuck is not None:
            self._lameDuck()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.sender is not None:
            self.sender.lost()
        if not self.go.called:
            self.go.callback("gone")
        if self._stop is not None:
            self._stop("the master is gone")


def adoptControlChannel(reactor: Any, fd: int, channel: ControlChannel) -> ControlChannel:
    """
    Speak C{channel} on the control channel descriptor C{fd}, which is
    closed (the reactor works on a copy).
    """
    os.set_blocking(fd, False)
    reactor.adoptStreamConnection(fd, socket.AF_UNIX, _OneProtocolFactory(channel))
    os.close(fd)
    return channel
