"""
Tests for txgrace.

The process tests run their servers with no probation
(C{TXGRACE_PROBATION=0}): with the default, every old process lingers 5 s
after its handover, and the suite restarts servers hundreds of times.  The
tests of probation itself run with the default, through
L{defaultEnvironment}.
"""

import os
import sys

if "twisted.trial.runner" in sys.modules:
    # In the test runner only (its servers inherit it), not in a server
    # that imports the test apps from this package.
    os.environ.setdefault("TXGRACE_PROBATION", "0")


def defaultEnvironment(**variables: str) -> dict[str, str]:
    """
    This environment with C{variables}, and with txgrace's defaults where the
    test suite changes them (the probation).
    """
    environment = dict(os.environ, **variables)
    environment.pop("TXGRACE_PROBATION", None)
    return environment
