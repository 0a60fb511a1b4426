"""
Packaging: installing the project makes the C{grace} endpoint prefix and the
C{twist txgrace} subcommand discoverable, and the plugin module stays light.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import venv

from twisted.trial.unittest import SkipTest, TestCase

from txgrace.test.test_process import startServer
from txgrace.testing import HTTPLoad, isAlive, waitUntil

# The source tree, when the tests run from a checkout or an sdist-like tree.
_SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sourceTree() -> str:
    """
    The project's source tree, or skip when the tests run from an installed
    copy without one (set C{TXGRACE_SOURCE} to point at it).
    """
    source = os.environ.get("TXGRACE_SOURCE", _SOURCE)
    if not os.path.exists(os.path.join(source, "pyproject.toml")):
        source = os.getcwd()
        while source != "/" and not os.path.exists(os.path.join(source, "pyproject.toml")):
            source = os.path.dirname(source)
    if not os.path.exists(os.path.join(source, "twisted", "plugins", "txgrace_plugin.py")):
        raise SkipTest("no txgrace source tree found; set TXGRACE_SOURCE")
    return source


def _skipUnlessBuildRequirementsMet(source: str) -> None:
    """
    Skip unless this environment's setuptools is as new as the project's
    C{build-system} asks: the install test builds without isolation (and so
    without the network), with this environment's setuptools.
    """
    import tomllib
    from importlib.metadata import version

    with open(os.path.join(source, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    for requirement in requires:
        match = re.fullmatch(r"setuptools>=([0-9.]+)", requirement)
        if match is None:
            continue
        wanted = tuple(int(part) for part in match.group(1).split("."))
        have = version("setuptools")
        if tuple(int(part) for part in re.findall(r"[0-9]+", have)[:3]) < wanted:
            raise SkipTest(
                f"this environment has setuptools {have}; building txgrace "
                f"needs {requirement} (pip install -U 'txgrace[test]' or "
                f"'{requirement}')"
            )


def virtualenvSharingPackages(directory: str, withPip: bool) -> tuple[str, str]:
    """
    Create a virtualenv in C{directory} that also sees this one's packages
    (through a C{.pth} file), so that no test needs the network.

    @return: Its python and its site-packages directory.
    """
    venv.create(directory, with_pip=withPip)
    python = os.path.join(directory, "bin", "python")
    purelib = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True,
    ).strip()
    # This environment's site-packages, and what its own .pth files add
    # (a strict editable install's link tree): .pth files inside a
    # directory that a .pth file names are not read.
    shared = [sysconfig.get_paths()["purelib"]]
    shared += [
        entry
        for entry in sys.path
        if entry
        and os.path.isdir(entry)
        and entry not in shared
        and not entry.startswith(sys.base_prefix)
        and not entry.startswith(sys.prefix)
    ]
    with open(os.path.join(purelib, "_txgrace_test_deps.pth"), "w") as pth:
        pth.write("".join(entry + "\n" for entry in shared))
    return python, purelib


class InstallTests(TestCase):
    """
    C{pip install .} into a throwaway virtualenv.
    """

    def test_pipInstallDiscoversPlugins(self) -> None:
        """
        After C{pip install .} in a fresh virtualenv, C{serverFromString}
        knows C{grace:}, C{twist txgrace --help} works, and no
        C{twisted/__init__.py} or C{twisted/plugins/__init__.py} was shipped.

        The fresh virtualenv reuses this one's packages through a C{.pth}
        file, so the test needs no network.
        """
        source = _sourceTree()
        _skipUnlessBuildRequirementsMet(source)
        target = os.path.abspath(self.mktemp())
        python, purelib = virtualenvSharingPackages(target, withPip=True)
        subprocess.run(
            [
                python, "-m", "pip", "install", "-q", "--no-deps",
                "--no-build-isolation", "--no-index", source,
            ],
            check=True,
            capture_output=True,
            cwd=target,
            # Build with this environment's setuptools and wheel (the test
            # extra), not the older ones a new virtualenv may bundle.
            env=dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"]),
        )
        plugins = os.path.join(purelib, "twisted", "plugins")
        self.assertTrue(os.path.exists(os.path.join(plugins, "txgrace_plugin.py")))
        self.assertFalse(os.path.exists(os.path.join(plugins, "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(purelib, "twisted", "__init__.py")))
        check = subprocess.run(
            [
                python, "-c",
                "import txgrace, os\n"
                "assert os.path.dirname(txgrace.__file__).startswith(%r), txgrace.__file__\n"
                "from twisted.internet import reactor\n"
                "from twisted.internet.endpoints import serverFromString\n"
                "print(type(serverFromString(reactor, 'grace:tcp:0')).__name__)\n"
                % purelib,
            ],
            capture_output=True, text=True, cwd=target,
        )
        self.assertEqual(check.stdout.strip(), "GraceServerEndpoint", check.stderr)
        helped = subprocess.run(
            [os.path.join(target, "bin", "twist"), "txgrace", "--help"]
            if os.path.exists(os.path.join(target, "bin", "twist"))
            else [python, "-m", "twisted", "txgrace", "--help"],
            capture_output=True, text=True, cwd=target,
        )
        self.assertEqual(helped.returncode, 0, helped.stderr)
        self.assertIn("--endpoint", helped.stdout)
        metadata = subprocess.run(
            [
                python, "-c",
                "from importlib.metadata import distribution\n"
                "d = distribution('txgrace')\n"
                "print(d.metadata['License-Expression'])\n"
                "print(sorted(f.name for f in d.files if 'licenses' in f.parts))\n",
            ],
            capture_output=True, text=True, cwd=target,
        )
        self.assertEqual(metadata.stdout.split("\n")[:2], ["MIT", "['LICENSE']"], metadata.stderr)

    def test_pluginModuleIsLight(self) -> None:
        """
        Importing the plugin module imports neither the reactor nor
        L{twisted.internet.endpoints}.
        """
        code = (
            "import sys\n"
            "import twisted.plugins.txgrace_plugin\n"
            "print('twisted.internet.reactor' in sys.modules,"
            " 'twisted.internet.endpoints' in sys.modules)\n"
        )
        out = subprocess.check_output([sys.executable, "-c", code], text=True)
        self.assertEqual(out.split(), ["False", "False"])


def twistedCopy(test: TestCase) -> str:
    """
    A copy of the installed C{twisted} package in a temporary directory,
    without its C{dropin.cache}: its directories are new and its files link
    to the originals, so what Twisted writes there (the plugin cache,
    bytecode) stays in the copy.

    @return: The directory to put first on C{PYTHONPATH}.
    """
    import twisted

    root = os.path.abspath(test.mktemp())
    shutil.copytree(
        os.path.dirname(twisted.__file__),
        os.path.join(root, "twisted"),
        copy_function=os.symlink,
        ignore=shutil.ignore_patterns("dropin.cache"),
    )
    return root


class PluginCacheTests(TestCase):
    """
    Inheritance works whichever module reads the environment first: with a
    cold C{dropin.cache}, the plugin scan imports Twisted's own endpoint
    parsers (which take C{LISTEN_FDS}) before txgrace runs.
    """

    def test_coldAndWarmCache(self) -> None:
        """
        A successor started with no C{dropin.cache} (a cold plugin scan) and
        one started with a warm cache both adopt the sockets: no request
        fails under load, and the port stays the same.  The servers run a
        copy of Twisted, whose cache the test removes; the environment's own
        is never touched.
        """
        root = twistedCopy(self)
        cache = os.path.join(root, "twisted", "plugins", "dropin.cache")
        path = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        server, serving = startServer(self, env=env)
        # The first process's scan wrote the copy's cache: it runs the copy.
        self.assertTrue(os.path.exists(cache))
        load = HTTPLoad("127.0.0.1", serving.port(), clients=4).start()
        self.addCleanup(load.stop)
        current = serving
        for cold in (True, False):
            if cold:
                os.unlink(cache)
            os.kill(current.pid, signal.SIGHUP)
            successor = server.waitServing(current.generation + 1)
            self.assertTrue(waitUntil(lambda: not isAlive(current.pid), 30))
            self.assertEqual(successor.addresses, serving.addresses)
            # The successor's scan (cold: it found no cache) wrote it again.
            self.assertTrue(os.path.exists(cache))
            current = successor
        result = load.stop()
        self.assertEqual(dict(result.failures), {})
        self.assertIn(current.pid, result.pids)
