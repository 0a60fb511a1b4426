"""
The type hints hold: mypy (with the zope plugin) passes on the package.
"""

from __future__ import annotations

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
        result = subprocess.run(
            [sys.executable, "-m", "mypy", "--cache-dir", self.mktemp()],
            cwd=source,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
