# -*- test-case-name: txgrace.test.test_inherit -*-
"""
Listening sockets inherited through the systemd protocol.

A predecessor (or systemd socket activation) passes listening sockets as
file descriptors 3, 4, ... and describes them with C{LISTEN_FDS} (how many),
C{LISTEN_PID} (the pid they are meant for) and C{LISTEN_FDNAMES} (their names,
separated by colons).  This module reads that description, checks every
descriptor, and builds it again for a child.

Importing it makes every passed descriptor (the listening sockets and the
control channel named by C{TXGRACE_CONTROL_FD}) close-on-exec at once, so
that a subprocess the application starts before it listens holds none of
them; L{txgrace} imports it before anything else.
"""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import stat
import sys
from dataclasses import dataclass
from typing import MutableMapping, Sequence

from twisted.logger import Logger, LogPublisher

log = Logger()

LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# The control channel from a predecessor (see txgrace.restart, which takes it).
CONTROL_FD_VARIABLE = "TXGRACE_CONTROL_FD"

# Sets LISTEN_PID to the pid that the exec'd program will have: only the child
# knows its own pid.  "$0" is the program, "$@" its arguments.
_TRAMPOLINE = 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"'


@dataclass(frozen=True)
class InheritedSocket:
    """
    A listening stream socket received from a predecessor or from systemd.

    @ivar fd: The descriptor number in this process.
    @ivar name: Its name from C{LISTEN_FDNAMES} (C{"unknown"} when none).
    @ivar family: C{AF_INET}, C{AF_INET6} or C{AF_UNIX}.
    @ivar address: Its bound address, normalized by L{normalizeAddress}.
    """

    fd: int
    name: str
    family: int
    address: object


def normalizeAddress(family: int, address: object) -> object:
    """
    Reduce a socket address to what identifies a listening socket: host and
    port for IP sockets (without IPv6 flow info or scope), the absolute path
    for a UNIX socket.
    """
    if family in (socket.AF_INET, socket.AF_INET6):
        assert isinstance(address, tuple)
        host, port = address[0], address[1]
        if host in ("", "0.0.0.0") and family == socket.AF_INET:
            host = "0.0.0.0"
        elif host in ("", "::") and family == socket.AF_INET6:
            host = "::"
        return (str(host), int(port))
    if isinstance(address, bytes):
        address = os.fsdecode(address)
    assert isinstance(address, str)
    if address.startswith("\0") or not address:
        return address
    return os.path.abspath(address)


def _declaredDescriptors(
    environ: MutableMapping[str, str], pid: int, logger: Logger = log
) -> list[tuple[int, str]] | None:
    """
    Read the descriptors that C{environ} declares for process C{pid}.

    @param logger: Where to say why declared descriptors are ignored.
    @return: C{(fd, name)} pairs, or L{None} when C{environ} declares nothing
        for this process.
    """
    listenPID = environ.get("LISTEN_PID")
    listenFDs = environ.get("LISTEN_FDS")
    if listenPID is None and listenFDs is None:
        return None
    if listenPID != str(pid):
        logger.info(
            "Ignoring inherited sockets: LISTEN_PID={listenPID!r} is not "
            "this process ({pid})",
            listenPID=listenPID,
            pid=pid,
        )
        return []
    try:
        count = int(listenFDs or "")
        if not 0 <= count <= _mostDescriptors():
            raise ValueError(count)
    except ValueError:
        logger.error(
            "Ignoring inherited sockets: LISTEN_FDS={listenFDs!r} is not a "
            "count of descriptors",
            listenFDs=listenFDs,
        )
        return []
    names: Sequence[str] = ["unknown"] * count
    rawNames = environ.get("LISTEN_FDNAMES")
    if rawNames is not None:
        given = rawNames.split(":") if rawNames else []
        if len(given) == count:
            names = given
        else:
            logger.error(
                "LISTEN_FDNAMES={rawNames!r} names {named} descriptors but "
                "LISTEN_FDS={count}: matching them by address only",
                rawNames=rawNames,
                named=len(given),
                count=count,
            )
    return [(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def _mostDescriptors() -> int:
    """
    The most descriptors this process can hold.
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def _setCloseOnExec(fd: int) -> None:
    """
    Make C{fd} close-on-exec, if it is open.
    """
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    except OSError:
        pass


def _closeOnExecAtImport(environ: MutableMapping[str, str], pid: int) -> None:
    """
    Keep every descriptor passed to this process (the listening sockets and
    the control channel from a predecessor) out of the subprocesses that
    the application may start before it listens: make them close-on-exec
    now, long before they are claimed.  Nothing is removed from C{environ}.
    """
    # Quiet: inheritSockets reads the same variables again and logs then.
    declared = _declaredDescriptors(environ, pid, Logger(observer=LogPublisher()))
    if declared is None and "twisted.internet.endpoints" in sys.modules:
        # Twisted's systemd: parser was imported first and took the variables.
        declared = _twistedsCopy()
    for fd, name in declared or ():
        _setCloseOnExec(fd)
    control = environ.get(CONTROL_FD_VARIABLE, "")
    if control.isascii() and control.isdigit():
        _setCloseOnExec(int(control))


def _twistedsCopy() -> list[tuple[int, str]]:
    """
    The descriptors that Twisted's C{systemd:} endpoint parser took from the
    environment when L{twisted.internet.endpoints} was imported first.
    """
    from txgrace._twisted import listenFDNames, systemdParserDescriptors

    listenFDs = systemdParserDescriptors()
    if listenFDs is None:
        return []
    fds = list(listenFDs.inheritedDescriptors())
    names = listenFDNames(listenFDs) or ["unknown"] * len(fds)
    return list(zip(fds, names))


def _check(fd: int, name: str) -> InheritedSocket | None:
    """
    Check that C{fd} is an open, listening stream socket and describe it.

    @return: The socket, or L{None} (with one logged line saying why) when it
        is not one that can be adopted.
    """
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        log.error(
            "Ignoring inherited fd {fd} ({name}): {error}",
            fd=fd,
            name=name,
            error=e.strerror,
        )
        return None
    if not stat.S_ISSOCK(mode):
        log.error("Ignoring inherited fd {fd} ({name}): not a socket", fd=fd, name=name)
        return None
    skt = socket.socket(fileno=fd)
    try:
        family = skt.family
        kind = skt.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = skt.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        address = skt.getsockname()
    finally:
        skt.detach()
    if family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        why = f"address family {family} is not supported"
    elif kind != socket.SOCK_STREAM:
        why = "not a stream socket"
    elif not listening:
        why = "not a listening socket"
    else:
        why = ""
    if why:
        log.error(
            "Ignoring inherited fd {fd} ({name}): {why}", fd=fd, name=name, why=why
        )
        return None
    # PEP 446: make sure the application's own subprocesses never see it, and
    # that the reactor never blocks in accept().
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    os.set_blocking(fd, False)
    return InheritedSocket(fd, name, family, normalizeAddress(family, address))


def inheritSockets(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> list[InheritedSocket]:
    """
    Take the listening sockets that this process inherited.

    This works whichever module reads the environment first: Twisted's
    C{systemd:} endpoint parser removes C{LISTEN_PID} and C{LISTEN_FDS} when
    L{twisted.internet.endpoints} is first imported, and then its copy is
    used.  Afterwards the C{LISTEN_*} variables are removed, so that the
    application's subprocesses do not see them.

    @return: The inherited sockets that can be adopted, in descriptor order.
    """
    pid = os.getpid() if pid is None else pid
    if environ is None:
        environ = os.environ
        if "LISTEN_FDS" not in environ and _atImport.get("LISTEN_PID") == str(pid):
            environ.update(_atImport)
            _atImport.clear()
    declared = _declaredDescriptors(environ, pid)
    # Twisted's systemd: parser takes its own copy on import; let it, so that
    # systemd: strings keep working next to grace: ones.
    from twisted.internet import endpoints  # noqa: F401

    if declared is None:
        declared = _twistedsCopy()
    for variable in _LISTEN_VARIABLES:
        environ.pop(variable, None)
    checked = (_check(fd, name) for fd, name in declared)
    return [inherited for inherited in checked if inherited is not None]


def listenEnvironment(
    base: MutableMapping[str, str], names: Sequence[str]
) -> dict[str, str]:
    """
    The environment for a child that receives the listening sockets C{names}
    as descriptors 3, 4, ...; C{LISTEN_PID} is set by L{trampoline}.

    @raise ValueError: If a name cannot be carried in C{LISTEN_FDNAMES}.
    """
    for name in names:
        if ":" in name or "\0" in name or not name:
            raise ValueError(f"socket name {name!r} cannot be passed in LISTEN_FDNAMES")
    environment = {
        key: value for key, value in base.items() if key not in _LISTEN_VARIABLES
    }
    environment["LISTEN_FDS"] = str(len(names))
    environment["LISTEN_FDNAMES"] = ":".join(names)
    return environment


def trampoline(argv: Sequence[str], ignoreSignals: Sequence[int] = ()) -> list[str]:
    """
    Wrap C{argv} so that the program starts with C{LISTEN_PID} equal to its
    own pid, as the systemd protocol requires.

    @param ignoreSignals: Signals the program starts with ignored: an ignored
        disposition survives C{exec}, so a restart signal that reaches it
        before it installs its handlers cannot kill it.
    """
    script = _TRAMPOLINE
    if ignoreSignals:
        script = f"trap '' {' '.join(str(int(s)) for s in ignoreSignals)}; " + script
    return ["/bin/sh", "-c", script, *argv]


# What the environment said when this module was first imported: Twisted's
# systemd: parser removes LISTEN_PID and LISTEN_FDS when it is imported, and
# keeps nothing when LISTEN_FDNAMES is missing (as older launchers leave it).
_atImport = {
    key: os.environ[key] for key in _LISTEN_VARIABLES if key in os.environ
}
_closeOnExecAtImport(os.environ, os.getpid())
