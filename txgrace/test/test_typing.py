"""
The type hints hold: mypy (with the zope plugin) passes on the package.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

from txgrace.test.test_install import _sourceTree


class TypingTests(TestCase):
    """
    mypy, as configured in pyproject.toml.
    """

    def test_mypy(self) -> None:
        """
        C{mypy} reports no error.
        """
        source = _sourceTree()
        # mktemp() is relative to the test's working directory; mypy runs in
        # the source tree, where a relative cache would be left behind.
        cache = os.path.abspath(self.mktemp())
        before = set(os.listdir(source))
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--cache-dir", cache],
            cwd=source,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertTrue(os.path.isdir(cache))
        added = set(os.listdir(source)) - before
        self.assertEqual({a for a in added if not a.startswith("_trial_temp")}, set())
