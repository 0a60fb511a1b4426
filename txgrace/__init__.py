"""
txgrace: graceful termination and zero-downtime restarts for Twisted servers.

Listen on C{grace:tcp:8080} (or C{grace:ssl:...}, C{grace:unix:...},
C{grace:tcp6:...}) through L{serverFromString}, in any Twisted program, and
the process stops gracefully on SIGTERM and hands over to a new build on
SIGHUP or SIGUSR2.  L{configure} (or C{TXGRACE_*} variables) sets the
timeouts, the pidfile and the signals; L{GraceService} is a convenience.
"""

# First, so that it sees LISTEN_* before Twisted's systemd: parser removes them.
from txgrace import inherit as _inherit  # noqa: F401  # isort: skip
from txgrace._version import __version__
from txgrace.interfaces import IDrainable, IHandoff
from txgrace.lifecycle import RestartRefused, configure, whenDraining
from txgrace.service import GraceService, holdReadiness

__all__ = [
    "GraceService",
    "IDrainable",
    "IHandoff",
    "RestartRefused",
    "configure",
    "holdReadiness",
    "whenDraining",
    "__version__",
]
