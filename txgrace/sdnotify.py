# -*- test-case-name: txgrace.test.test_units -*-
"""
systemd's notification protocol (sd_notify): datagrams to C{$NOTIFY_SOCKET}.
"""

from __future__ import annotations

import array
import os
import socket
import time
from typing import Mapping, Sequence

from twisted.logger import Logger

log = Logger()


def notify(
    *assignments: str,
    environ: Mapping[str, str] | None = None,
    fds: Sequence[int] = (),
) -> bool:
    """
    Send C{assignments} (such as C{"READY=1"}) to systemd in one datagram,
    with the descriptors C{fds} (for C{FDSTORE=1}).

    Nothing is sent when C{NOTIFY_SOCKET} is not set.  A failure to send is
    logged, never raised: systemd's bookkeeping must not stop a server.

    @return: Whether a datagram was sent.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    message = "\n".join(assignments).encode("utf-8")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as skt:
        try:
            if fds:
                # socket.send_fds() has no address to send to.
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
                skt.sendmsg([message], [rights], 0, address)
            else:
                skt.sendto(message, address)
        except OSError as e:
            log.error(
                "Cannot notify systemd at {path!r}: {error}", path=path, error=e
            )
            return False
    return True


def reloading() -> tuple[str, str]:
    """
    The assignments that begin a reload, for C{Type=notify-reload}.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return ("RELOADING=1", f"MONOTONIC_USEC={usec}")


def fileDescriptorStore(environ: Mapping[str, str] | None = None) -> bool:
    """
    Whether systemd keeps a file descriptor store for this service
    (C{FileDescriptorStoreMax=} above 0 sets C{$FDSTORE}, systemd 254 and
    later) and can be told about it.
    """
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("FDSTORE", "0")) > 0 and bool(environ.get("NOTIFY_SOCKET"))
    except ValueError:
        return False
