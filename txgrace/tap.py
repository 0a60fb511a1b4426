# -*- test-case-name: txgrace.test.test_tap -*-
"""
C{twist txgrace}: serve an application on C{grace:} endpoints with no code.

Errors in what the user typed (an endpoint string, C{--app}, an option
value, a port that cannot be had) end the program with one line on stderr
and a non-zero status, never a traceback.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import signal
import sys
import os
from typing import Any, Callable

from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.python import usage
from twisted.web.resource import IResource
from twisted.web.server import Site

from twisted.application.service import Service

from txgrace.master import MasterService
from txgrace.pidfile import checkPidFileLocation
from txgrace.restart import WORKER_VARIABLE
from txgrace.service import DEFAULT_RESTART_SIGNALS, GraceService


class AppError(ValueError):
    """
    C{--app} names nothing that can be served.
    """


def _asFactory(obj: Any) -> IProtocolFactory | None:
    if isinstance(obj, Site) or IProtocolFactory.providedBy(obj):
        return obj  # type: ignore[no-any-return]
    if IResource.providedBy(obj):
        return Site(obj)
    return None


def loadApp(spec: str) -> IProtocolFactory:
    """
    Load the application named by C{spec}: C{pkg.mod.attr} or
    C{pkg.mod:attr}, naming a L{Site}, an L{IResource} (served by a
    L{Site}), an L{IProtocolFactory}, or a callable with no arguments that
    returns one of these.  The working directory is importable, as it is
    for C{python -m}.

    @raise AppError: With one line naming C{spec} and what is wrong.
    """
    if ":" in spec:
        moduleName, _, attribute = spec.partition(":")
    else:
        moduleName, _, attribute = spec.rpartition(".")
    if not moduleName or not attribute:
        raise AppError(
            f"--app {spec!r}: expected pkg.module.attribute or pkg.module:attribute"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(moduleName)
    except ModuleNotFoundError as e:
        if e.name and moduleName.startswith(e.name):
            raise AppError(f"--app {spec!r}: no module named {e.name!r}") from None
        raise AppError(f"--app {spec!r}: importing {moduleName!r} failed: {e}") from None
    except Exception as e:
        raise AppError(
            f"--app {spec!r}: importing {moduleName!r} raised "
            f"{type(e).__name__}: {e}"
        ) from None
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(
                f"--app {spec!r}: module {moduleName!r} has no attribute {attribute!r}"
            ) from None
    factory = _asFactory(obj)
    if factory is None and callable(obj):
        try:
            made = obj()
        except Exception as e:
            raise AppError(
                f"--app {spec!r}: calling it raised {type(e).__name__}: {e}"
            ) from None
        factory = _asFactory(made)
        obj = made
    if factory is None:
        raise AppError(
            f"--app {spec!r}: {type(obj).__name__} is not a Site, an IResource, "
            "an IProtocolFactory, or a callable returning one"
        )
    return factory


def _parseSignal(name: str) -> int:
    upper = name.upper()
    if not upper.startswith("SIG"):
        upper = "SIG" + upper
    try:
        return int(signal.Signals[upper])
    except KeyError:
        raise usage.UsageError(f"--restart-signal {name!r}: no such signal") from None


def _parseSeconds(option: str, value: str, allowNegative: bool) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise usage.UsageError(f"{option} {value!r}: not a number of seconds") from None
    if seconds != seconds or (seconds < 0 and not allowNegative):
        raise usage.UsageError(f"{option} {value!r}: must be 0 or more seconds")
    return seconds


class Options(usage.Options):
    """
    Options of C{twist txgrace}.
    """

    synopsis = "--endpoint grace:tcp:8080 [--endpoint ...] --app pkg.module.site"

    longdesc = (
        "Serve one application on every --endpoint.  SIGTERM or SIGINT stops "
        "gracefully: stop listening, let in-flight work finish, abort what is "
        "left after --hammer-timeout (a second signal aborts at once).  SIGHUP "
        "or SIGUSR2 restarts with zero downtime: a successor is started with "
        "the same command and the same sockets, and this process drains and "
        "exits once the successor is ready."
    )

    optParameters = [
        [
            "app",
            "a",
            None,
            "What to serve: pkg.module.attribute or pkg.module:attribute naming "
            "a Site, an IResource, an IProtocolFactory, or a callable returning one.",
        ],
        [
            "hammer-timeout",
            None,
            "60",
            "Seconds a drain may take before the remaining connections are "
            "aborted; 0 aborts at once, a negative value never.",
        ],
        [
            "ready-timeout",
            None,
            "60",
            "Seconds a successor has to become ready before it is killed and "
            "this process goes on serving.",
        ],
        [
            "workers",
            "w",
            None,
            "Run a master that holds the sockets and keeps its pid, with this "
            "many worker processes; SIGHUP then restarts them one at a time.",
        ],
        [
            "shutdown-delay",
            None,
            "0",
            "Seconds to go on serving after SIGTERM before draining, for load "
            "balancers that stop routing only when they send SIGTERM (Kubernetes).",
        ],
        [
            "pidfile",
            None,
            None,
            "Keep this file naming the serving pid; it is rewritten atomically at "
            "each restart and removed on a final stop.",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["endpoints"] = []
        self["restart-signals"] = []

    def opt_endpoint(self, description: str) -> None:
        """
        Listen on this grace: endpoint (repeatable), e.g. grace:tcp:8080,
        grace:ssl:8443:privateKey=key.pem:certKey=cert.pem,
        grace:unix:/run/app.sock:mode=660, grace:tcp6:8080:interface=\\:\\:1.
        """
        if not description.startswith("grace:"):
            raise usage.UsageError(
                f"--endpoint {description!r}: must start with 'grace:' "
                f"(for example 'grace:{description}')"
            )
        from twisted.internet.endpoints import serverFromString

        try:
            # Parsing touches no reactor; the real one is not installed yet.
            serverFromString(None, description)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["endpoints"].append(description)

    opt_e = opt_endpoint

    def opt_restart_signal(self, name: str) -> None:
        """
        A signal that starts a restart (repeatable; default HUP and USR2).
        """
        self["restart-signals"].append(_parseSignal(name))

    def postOptions(self) -> None:
        if not self["endpoints"]:
            raise usage.UsageError("at least one --endpoint is required")
        if not self["app"]:
            raise usage.UsageError("--app is required")
        self["hammer-timeout"] = _parseSeconds(
            "--hammer-timeout", self["hammer-timeout"], allowNegative=True
        )
        self["ready-timeout"] = _parseSeconds(
            "--ready-timeout", self["ready-timeout"], allowNegative=False
        )
        self["shutdown-delay"] = _parseSeconds(
            "--shutdown-delay", self["shutdown-delay"], allowNegative=False
        )
        if self["workers"] is not None:
            try:
                self["workers"] = int(self["workers"])
                if self["workers"] < 1:
                    raise ValueError()
            except ValueError:
                raise usage.UsageError(
                    f"--workers {self['workers']!r}: must be a whole number of 1 or more"
                ) from None
        if not self["restart-signals"]:
            self["restart-signals"] = list(DEFAULT_RESTART_SIGNALS)
        if self["pidfile"] is not None:
            try:
                checkPidFileLocation(self["pidfile"])
            except ValueError as e:
                raise usage.UsageError(f"--pidfile: {e}") from None


def _startOrExit(start: Callable[[], None]) -> None:
    """
    Start a service; an endpoint that cannot be had ends the program with
    one line.
    """
    try:
        start()
    except (CannotListenError, ValueError) as e:
        raise SystemExit(f"twist txgrace: error: {e}") from None


HAMMERED_EXIT_STATUS = 1
"""
The exit status of C{twist txgrace} after a drain that had to abort
connections, so that a supervisor can tell it from a clean stop (status 0).
"""


class _ExitStatus:
    """
    twist has no way to set its exit status: this exit handler, registered
    before the application is imported so that it runs after every handler
    the application registers, ends the process with
    L{HAMMERED_EXIT_STATUS} after a hammer.
    """

    hammered = False

    def __call__(self) -> None:
        if self.hammered:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(HAMMERED_EXIT_STATUS)


_exitStatus = _ExitStatus()


class _CommandLineService(GraceService):
    """
    The service of C{twist txgrace}: a port that cannot be had ends the
    program with one line, and a drain that ended in a hammer ends it with
    L{HAMMERED_EXIT_STATUS}.
    """

    def startService(self) -> None:
        _startOrExit(lambda: GraceService.startService(self))

    def stopService(self) -> Any:
        def drained(result: object) -> object:
            if self.lastDrain is not None and self.lastDrain.aborted:
                _exitStatus.hammered = True
            # The process is about to exit: spare the interpreter's final
            # collection of every object (100-800 ms measured after a drain).
            gc.freeze()
            return result

        return GraceService.stopService(self).addBoth(drained)


class _CommandLineMaster(MasterService):
    """
    The master of C{twist txgrace --workers N}: an endpoint that cannot be
    had ends the program with one line.
    """

    def startService(self) -> None:
        _startOrExit(lambda: MasterService.startService(self))


def makeService(options: Options) -> Service:
    """
    Build the service that C{twist txgrace} runs: a L{GraceService} serving
    the application, or with C{--workers} a L{MasterService} (which never
    imports it) whose workers do.
    """
    from twisted.internet import reactor

    atexit.register(_exitStatus)
    common = dict(
        hammerTimeout=options["hammer-timeout"],
        readyTimeout=options["ready-timeout"],
        pidFile=options["pidfile"],
        restartSignals=options["restart-signals"],
        shutdownDelay=options["shutdown-delay"],
        reactor=reactor,
    )
    if options["workers"] is not None and os.environ.get(WORKER_VARIABLE) != "1":
        return _CommandLineMaster(options["endpoints"], options["workers"], **common)

    try:
        factory = loadApp(options["app"])
    except AppError as e:
        raise SystemExit(f"twist txgrace: error: {e}") from None
    service = _CommandLineService(**common)
    for description in options["endpoints"]:
        service.listen(description, factory)
    return service
