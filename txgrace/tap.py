# -*- test-case-name: txgrace.test.test_units,txgrace.test.test_tap -*-
"""
C{twist txgrace}: serve an application on C{grace:} endpoints with no code.

Errors in what the user typed (an endpoint string, C{--app}, an option
value, a port that cannot be had) end the program with one line on stderr
and a non-zero status, never a traceback.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import traceback
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory
from twisted.python import usage
from twisted.web.resource import IResource
from twisted.web.server import Site

from txgrace.lifecycle import HAMMERED_EXIT_STATUS, exitProcess, lifecycleFor
from txgrace.master import MasterService
from txgrace.restart import WORKER_VARIABLE
from txgrace.service import GraceService
from txgrace.settings import (
    SettingError,
    parsePidFile,
    parseRate,
    parseSeconds,
    parseSignal,
)

__all__ = ["HAMMERED_EXIT_STATUS", "Options", "loadApp", "makeService"]

USAGE_EXIT_STATUS = 64
"""
The exit status for a command-line error (C{EX_USAGE}, as twist uses).
"""


class AppError(ValueError):
    """
    C{--app} names nothing that can be served.
    """


def _isKlein(obj: Any) -> bool:
    klein = sys.modules.get("klein")
    kleinClass = getattr(klein, "Klein", None)
    return kleinClass is not None and isinstance(obj, kleinClass)


def _asFactory(obj: Any) -> IProtocolFactory | None:
    if isinstance(obj, Site) or IProtocolFactory.providedBy(obj):
        return obj  # type: ignore[no-any-return]
    if IResource.providedBy(obj):
        return Site(obj)
    if _isKlein(obj):
        return Site(obj.resource())
    return None


def _where(error: BaseException) -> str:
    """
    Where C{error} was raised: the last frame of its traceback, as
    C{" (at file:line)"}.
    """
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    return f" (at {frames[-1].filename}:{frames[-1].lineno})"


def _importLongest(spec: str, names: Sequence[str]) -> tuple[Any, str, list[str]]:
    """
    Import the longest module that C{names} starts with, parents first (so
    that an error is reported for the module that raised it).

    @return: The module, its name, and the names after it.
    @raise AppError: If none imports, or importing one raises.
    """
    module: Any = None
    moduleName = ""
    for count in range(1, len(names) + 1):
        name = ".".join(names[:count])
        try:
            imported = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                break  # Not a module: the rest are attributes.
            raise AppError(
                f"--app {spec!r}: importing {name!r} failed: {e}{_where(e)}"
            ) from None
        except Exception as e:
            raise AppError(
                f"--app {spec!r}: importing {name!r} raised "
                f"{type(e).__name__}: {e}{_where(e)}"
            ) from None
        module, moduleName = imported, name
    if module is None:
        raise AppError(f"--app {spec!r}: no module named {names[0]!r}")
    return module, moduleName, list(names[len(moduleName.split(".")) :])


def loadApp(spec: str) -> IProtocolFactory:
    """
    Load the application named by C{spec}: C{pkg.mod:attr.path}, or
    C{pkg.mod.attr.path} (the longest importable module, then attributes,
    as in C{mod.app.resource}), naming a L{Site}, an L{IResource} (served
    by a L{Site}), a Klein app (served through its C{resource()}), an
    L{IProtocolFactory}, or a callable with no arguments that returns one
    of these.  The working directory is importable, as it is for
    C{python -m}.

    @raise AppError: With one line naming C{spec} and what is wrong.
    """
    moduleText, colon, attributeText = spec.partition(":")
    names = moduleText.split(".")
    attributes = attributeText.split(".") if colon else []
    if not all(names) or not all(attributes) or (not colon and len(names) < 2):
        raise AppError(
            f"--app {spec!r}: expected pkg.module.attribute or pkg.module:attribute"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if colon:
        module, moduleName, rest = _importLongest(spec, names)
        if rest:
            raise AppError(f"--app {spec!r}: no module named {moduleText!r}")
    else:
        module, moduleName, attributes = _importLongest(spec, names)
        if not attributes:
            raise AppError(
                f"--app {spec!r}: names a module; add what to serve, as in "
                f"{moduleName}.site"
            )
    obj: Any = module
    for index, part in enumerate(attributes):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            path = ".".join(attributes[: index + 1])
            missingModule = ""
            if not colon and index == 0:
                missingModule = f"no module named {moduleName + '.' + part!r}, and "
            raise AppError(
                f"--app {spec!r}: {missingModule}module {moduleName!r} has no "
                f"attribute {path!r}"
            ) from None
    factory = _asFactory(obj)
    if factory is None and callable(obj):
        try:
            made = obj()
        except Exception as e:
            raise AppError(
                f"--app {spec!r}: calling it raised {type(e).__name__}: {e}{_where(e)}"
            ) from None
        factory = _asFactory(made)
        obj = made
    if factory is None:
        raise AppError(
            f"--app {spec!r}: {type(obj).__name__} is not a Site, an IResource, "
            "a Klein app, an IProtocolFactory, or a callable returning one"
        )
    return factory


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
        "exits once the successor is ready.  Unset options come from "
        "TXGRACE_HAMMER_TIMEOUT, TXGRACE_READY_TIMEOUT, TXGRACE_PIDFILE, "
        "TXGRACE_RESTART_SIGNALS, TXGRACE_SHUTDOWN_DELAY, TXGRACE_PROBATION and TXGRACE_DRAIN_RATE."
    )

    optParameters = [
        [
            "app",
            "a",
            None,
            "What to serve: pkg.module.attribute or pkg.module:attribute naming "
            "a Site, an IResource, a Klein app, an IProtocolFactory, or a "
            "callable returning one.",
        ],
        [
            "hammer-timeout",
            None,
            None,
            "Seconds a drain may take before the remaining connections are "
            "aborted; 0 aborts at once, a negative value never (default 60).",
        ],
        [
            "ready-timeout",
            None,
            None,
            "Seconds a successor has to become ready before it is killed and "
            "this process goes on serving (default 60).",
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
            None,
            "Seconds to go on serving after SIGTERM before draining, for load "
            "balancers that stop routing only when they send SIGTERM "
            "(Kubernetes; default 0).",
        ],
        [
            "health",
            None,
            None,
            "Answer health checks at this path (such as /healthz): 200 while "
            "serving, 503 while not ready and from the moment a stop begins "
            "(through --shutdown-delay). Needs a twisted.web app.",
        ],
        [
            "drain-rate",
            None,
            None,
            "How many long-lived connections (websockets, IDrainable protocols) "
            "a drain asks to close per second; 0 asks all at once (default 500).",
        ],
        [
            "probation",
            None,
            None,
            "Seconds after a handover during which this process keeps its "
            "copies of the sockets and serves again if its successor dies; "
            "it keeps them while it drains in any case (default 5; 0: only "
            "while it drains).  In master mode, how long an old worker "
            "serves on beside its replacement.",
        ],
        [
            "idle-grace",
            None,
            None,
            "Seconds a drain keeps an idle HTTP/1.1 connection that cannot move "
            "to the successor (TLS, a final stop), answering its next request "
            "with Connection: close (default 5).",
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
        self["handoff"] = None

    def opt_handoff(self) -> None:
        """Move connections between requests to the successor (default)."""
        self["handoff"] = True

    def opt_no_handoff(self) -> None:
        """Drain idle connections at a restart instead of moving them."""
        self["handoff"] = False

    def getSynopsis(self) -> str:
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "twist"
        if program in ("__main__.py", "-m", "-c", ""):
            program = "python -m twisted"
        return f"Usage: {program} [twist options] txgrace [options] {self.synopsis}"

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse the options; a mistake ends the program with one line and a
        hint, not the whole usage.
        """
        try:
            usage.Options.parseOptions(self, options)
        except usage.UsageError as e:
            if self.parent is None:
                raise  # Not under twist: the caller reports it.
            sys.stderr.write(
                f"twist txgrace: error: {e}\n"
                "(see 'twist txgrace --help' for the options)\n"
            )
            sys.stderr.flush()
            raise SystemExit(USAGE_EXIT_STATUS) from None

    def opt_version(self) -> None:
        """
        Print txgrace's version and Twisted's, and exit.
        """
        from twisted import __version__ as twistedVersion

        from txgrace._version import __version__

        print(f"txgrace {__version__} (Twisted {twistedVersion})")
        sys.exit(0)

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
        try:
            self["restart-signals"].append(parseSignal("--restart-signal", name))
        except SettingError as e:
            raise usage.UsageError(str(e)) from None

    def postOptions(self) -> None:
        if not self["endpoints"]:
            raise usage.UsageError("at least one --endpoint is required")
        if not self["app"]:
            raise usage.UsageError("--app is required")
        try:
            for option, allowNegative in (
                ("hammer-timeout", True),
                ("ready-timeout", False),
                ("shutdown-delay", False),
                ("probation", False),
                ("idle-grace", False),
            ):
                if self[option] is not None:
                    self[option] = parseSeconds(
                        f"--{option}", self[option], allowNegative
                    )
            if self["drain-rate"] is not None:
                self["drain-rate"] = parseRate("--drain-rate", self["drain-rate"])
            if self["pidfile"] is not None:
                self["pidfile"] = parsePidFile("--pidfile", self["pidfile"])
        except SettingError as e:
            raise usage.UsageError(str(e)) from None
        if self["health"] is not None and not self["health"].startswith("/"):
            raise usage.UsageError(
                f"--health {self['health']!r}: must be a path starting with '/'"
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

    def settings(self) -> dict[str, Any]:
        """
        The lifecycle settings given on the command line.
        """
        given = {
            "hammerTimeout": self["hammer-timeout"],
            "readyTimeout": self["ready-timeout"],
            "pidFile": self["pidfile"],
            "restartSignals": self["restart-signals"] or None,
            "shutdownDelay": self["shutdown-delay"],
            "probation": self["probation"],
            "drainRate": self["drain-rate"],
            "handoff": self["handoff"],
            "idleGrace": self["idle-grace"],
        }
        return {key: value for key, value in given.items() if value is not None}


def _flushBufferedLog() -> None:
    """
    twist buffers log events until its logging starts, after the service
    starts: a start that fails would lose them, and they often say why
    (such as which inherited socket was not adopted).  Write them to
    stderr, which a successor shares with its predecessor.
    """
    from twisted.logger import globalLogBeginner, textFileLogObserver

    try:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )
    except Exception:
        pass


def _startOrExit(start: Callable[[], None]) -> None:
    """
    Start a service; an endpoint that cannot be had ends the program with
    one line.
    """
    try:
        start()
    except (CannotListenError, ValueError) as e:
        _flushBufferedLog()
        raise SystemExit(f"twist txgrace: error: {e}") from None


class _ExitStatus:
    """
    twist has no way to set its exit status: this exit handler, registered
    before the application is imported so that it runs after every handler
    the application registers, ends the process with the lifecycle's exit
    status when it is not 0 (after a hammer, or a start that never became
    ready), after flushing open files.
    """

    def __call__(self) -> None:
        status = lifecycleFor().exitStatus
        if status:
            # The other exit handlers have run (this one was registered
            # first, so it runs last).
            exitProcess(status, runExitHandlers=False)


class _CommandLineService(GraceService):
    """
    The service of C{twist txgrace}: a port that cannot be had ends the
    program with one line.
    """

    def privilegedStartService(self) -> None:
        _startOrExit(lambda: GraceService.privilegedStartService(self))

    def startService(self) -> None:
        _startOrExit(lambda: GraceService.startService(self))

    def _install(self) -> None:
        # A bad TXGRACE_* value (a SettingError, a ValueError) gets twist
        # txgrace's one line from _startOrExit.
        self.lifecycle.install()


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

    atexit.register(_ExitStatus())
    settings = options.settings()
    try:
        lifecycleFor(reactor=reactor).configure(**settings)
    except SettingError as e:
        raise SystemExit(f"twist txgrace: error: {e}") from None
    if options["workers"] is not None and os.environ.get(WORKER_VARIABLE) != "1":
        return _CommandLineMaster(options["endpoints"], options["workers"], reactor=reactor)

    try:
        factory = loadApp(options["app"])
    except AppError as e:
        raise SystemExit(f"twist txgrace: error: {e}") from None
    if options["health"] is not None:
        if not isinstance(factory, Site):
            raise SystemExit(
                f"twist txgrace: error: --health {options['health']!r}: --app "
                f"{options['app']!r} is not a twisted.web app"
            )
        from txgrace.web import WithHealth

        factory.resource = WithHealth(factory.resource, options["health"].encode())
    service = _CommandLineService(reactor=reactor)
    for description in options["endpoints"]:
        service.listen(description, factory)
    return service
