"""
C{twist txgrace} as a user types it: one line for each mistake, the right
version and usage line, and where an app that fails to import failed.
Settings from C{TXGRACE_*} in any program.  (What C{--app} may name is in
L{txgrace.test.test_units.LoadAppTests}.)
"""

from __future__ import annotations

import os
import textwrap
import subprocess
import sys

from twisted.trial.unittest import TestCase

from txgrace.test.test_process import shortTemporaryDirectory


def twist(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twisted", *arguments],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env=dict(os.environ, **(env or {})),
    )


class CommandLineTests(TestCase):
    def assertOneLine(self, result: subprocess.CompletedProcess[str], expected: str) -> None:
        output = (result.stdout + result.stderr).strip().splitlines()
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(output[0], expected)
        self.assertLessEqual(len(output), 2, output)
        self.assertNotIn("Traceback", result.stderr)

    def test_version(self) -> None:
        """
        C{--version} prints txgrace's version and Twisted's.
        """
        from twisted import __version__ as twistedVersion

        from txgrace import __version__

        result = twist("txgrace", "--version")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(result.stdout, f"txgrace {__version__} (Twisted {twistedVersion})\n")

    def test_usageLine(self) -> None:
        result = twist("txgrace", "--help")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(
            result.stdout.splitlines()[0],
            "Usage: python -m twisted [twist options] txgrace [options] --endpoint "
            "grace:tcp:8080 [--endpoint ...] --app pkg.module.site",
        )

    def test_errorIsOneLineAndAHint(self) -> None:
        """
        A parse error prints one line and a hint, not the whole usage.
        """
        result = twist("txgrace", "--endpoint", "grace:tcp:0", "--app", "x.y", "--bogus")
        self.assertEqual(result.returncode, 64)
        self.assertEqual(
            result.stderr,
            "twist txgrace: error: option --bogus not recognized\n"
            "(see 'twist txgrace --help' for the options)\n",
        )

    def test_restartSignalsThatCannotRestart(self) -> None:
        """
        A restart signal that does not exist, cannot be caught, or stops the
        server is refused with one line saying why.
        """
        for name, why in [
            ("NOPE", "no such signal"),
            ("KILL", "SIGKILL cannot restart: it cannot be caught"),
            ("STOP", "SIGSTOP cannot restart: it cannot be caught"),
            ("TERM", "SIGTERM cannot restart: it stops the server"),
            ("INT", "SIGINT cannot restart: it stops the server"),
        ]:
            result = twist(
                "txgrace", "--restart-signal", name, "--endpoint", "grace:tcp:0",
                "--app", "x.y",
            )
            self.assertOneLine(
                result, f"twist txgrace: error: --restart-signal {name!r}: {why}"
            )

    def test_nanHammerTimeout(self) -> None:
        """
        C{nan} is not a number of seconds; the message does not claim that
        negative values are refused (they mean never).
        """
        result = twist(
            "txgrace", "--hammer-timeout", "nan", "--endpoint", "grace:tcp:0", "--app", "x.y"
        )
        self.assertOneLine(
            result,
            "twist txgrace: error: --hammer-timeout 'nan': not a finite number of "
            "seconds (a negative value means never)",
        )

    def test_badEnvironmentInTwistTxgrace(self) -> None:
        result = twist(
            "txgrace", "--endpoint", "grace:tcp:0:interface=127.0.0.1",
            "--app", "txgrace.test._apps.site", env={"TXGRACE_READY_TIMEOUT": "-3"},
        )
        self.assertOneLine(
            result,
            "twist txgrace: error: TXGRACE_READY_TIMEOUT='-3': must be 0 or more seconds",
        )

    def test_badEnvironmentInTwistWeb(self) -> None:
        """
        Any program with a grace: port refuses a bad TXGRACE_* value with one
        line naming it.
        """
        result = twist(
            "web", "--listen", "grace:tcp:0:interface=127.0.0.1",
            env={"TXGRACE_HAMMER_TIMEOUT": "soon"},
        )
        self.assertOneLine(
            result, "txgrace: error: TXGRACE_HAMMER_TIMEOUT='soon': not a number of seconds"
        )

    def test_badEnvironmentWithGraceService(self) -> None:
        """
        A bad C{TXGRACE_*} value ends a L{txgrace.GraceService}'s start with
        one line naming it, in a plain script and under C{twistd -n -y}
        (which logs the line from its stderr), and no traceback.
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "serve.py"), "w") as f:
            f.write(textwrap.dedent("""\
                from twisted.internet import reactor
                from txgrace import GraceService
                from txgrace.test._apps import site

                service = GraceService()
                service.listen("grace:tcp:0:interface=127.0.0.1", site)
                service.startService()
                reactor.run()
                """))
        with open(os.path.join(directory, "app.tac"), "w") as f:
            f.write(textwrap.dedent("""\
                from twisted.application import service
                from txgrace import GraceService
                from txgrace.test._apps import site

                application = service.Application("bad-environment")
                grace = GraceService()
                grace.listen("grace:tcp:0:interface=127.0.0.1", site)
                grace.setServiceParent(application)
                """))
        expected = "txgrace: error: TXGRACE_HAMMER_TIMEOUT='soon': not a number of seconds"
        environment = dict(os.environ, TXGRACE_HAMMER_TIMEOUT="soon")
        script = subprocess.run(
            [sys.executable, "serve.py"], capture_output=True, text=True,
            timeout=60, cwd=directory, env=environment, stdin=subprocess.DEVNULL,
        )
        self.assertOneLine(script, expected)
        twistd = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n",
             "--pidfile=", "-y", "app.tac"],
            capture_output=True, text=True, timeout=60, cwd=directory,
            env=environment, stdin=subprocess.DEVNULL,
        )
        output = twistd.stdout + twistd.stderr
        self.assertNotEqual(twistd.returncode, 0, output)
        self.assertNotIn("Traceback", output)
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        self.assertEqual(len(errors), 1, output)
        self.assertTrue(errors[0].endswith(" " + expected), errors[0])

    def test_importErrorSaysWhere(self) -> None:
        """
        An app that fails to import says where (file and line).
        """
        directory = shortTemporaryDirectory(self)
        with open(os.path.join(directory, "brokenapp.py"), "w") as f:
            f.write("import os\n\nraise RuntimeError('no database')\n")
        result = subprocess.run(
            [sys.executable, "-m", "twisted", "txgrace", "--endpoint",
             "grace:tcp:0:interface=127.0.0.1", "--app", "brokenapp.site"],
            capture_output=True, text=True, timeout=60, cwd=directory,
        )
        self.assertOneLine(
            result,
            "twist txgrace: error: --app 'brokenapp.site': importing 'brokenapp' raised "
            f"RuntimeError: no database (at {os.path.join(directory, 'brokenapp.py')}:3)",
        )
