# -*- test-case-name: txgrace.test.test_units -*-
"""
systemd's notification protocol (sd_notify): datagrams to C{$NOTIFY_SOCKET}.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from twisted.logger import Logger

log = Logger()


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """
    Send C{assignments} (such as C{"READY=1"}) to systemd in one datagram.

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
