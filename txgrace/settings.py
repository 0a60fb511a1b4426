# -*- test-case-name: txgrace.test.test_lifecycle -*-
"""
The settings of a process's lifecycle, and where they come from: code
(L{txgrace.configure}, L{txgrace.GraceService}, C{twist txgrace}'s options),
then the environment (C{TXGRACE_*}), then the defaults.

Every value is checked the same way wherever it comes from, and a bad one
raises L{SettingError} with one line that names where it came from and the
value.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from txgrace.pidfile import checkPidFileLocation

DEFAULT_RESTART_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)

_UNUSABLE_SIGNALS = {
    signal.SIGKILL: "it cannot be caught",
    signal.SIGSTOP: "it cannot be caught",
    signal.SIGTERM: "it stops the server",
    signal.SIGINT: "it stops the server",
    signal.SIGCHLD: "the reactor uses it",
}


class SettingError(ValueError):
    """
    A setting has a value that cannot be used; the message names the
    setting and the value.
    """


@dataclass(frozen=True)
class Settings:
    """
    How a process restarts and stops.

    @ivar hammerTimeout: Seconds a drain may take before the remaining
        connections are aborted; C{0} aborts at once, a negative value never.
    @ivar readyTimeout: Seconds a successor has to become ready.
    @ivar pidFile: A path kept naming the serving process, or L{None}.
    @ivar restartSignals: The signals that start a restart.
    @ivar shutdownDelay: Seconds to go on serving after a stop signal before
        the drain begins, for load balancers that stop routing only when the
        signal is sent (Kubernetes).
    @ivar drainRate: How many long-lived connections (websockets, other
        L{txgrace.IDrainable} protocols) a drain asks to close per second, so
        that the successor is not hit by every reconnect at once; C{0} asks
        them all at once.  Requests in flight and idle HTTP connections are
        never paced.
    @ivar probation: Seconds after a handover during which this process
        keeps its copies of the sockets (not accepting), to serve again if
        its successor dies; it keeps them as long as its drain lasts in any
        case.  The default, 5 s, covers a successor that crashes a few
        seconds into real traffic, which a drain of idle connections
        (milliseconds) does not.  In master mode: how long an old worker
        serves on beside the new one that replaced it.
    @ivar handoff: Whether connections between two requests move to the
        successor at a handover (L{txgrace.handoff}) instead of being
        closed.
    @ivar idleGrace: Seconds a drain keeps an idle HTTP/1.1 connection
        (never used, or between requests) that cannot move, answering its
        next request with C{Connection: close}.
    """

    hammerTimeout: float = 60.0
    readyTimeout: float = 60.0
    pidFile: str | None = None
    restartSignals: tuple[int, ...] = field(default=DEFAULT_RESTART_SIGNALS)
    shutdownDelay: float = 0.0
    probation: float = 5.0
    drainRate: float = 500.0
    handoff: bool = True
    idleGrace: float = 5.0


ENVIRONMENT = {
    "hammerTimeout": "TXGRACE_HAMMER_TIMEOUT",
    "readyTimeout": "TXGRACE_READY_TIMEOUT",
    "pidFile": "TXGRACE_PIDFILE",
    "restartSignals": "TXGRACE_RESTART_SIGNALS",
    "shutdownDelay": "TXGRACE_SHUTDOWN_DELAY",
    "probation": "TXGRACE_PROBATION",
    "drainRate": "TXGRACE_DRAIN_RATE",
    "handoff": "TXGRACE_HANDOFF",
    "idleGrace": "TXGRACE_IDLE_GRACE",
}
"""
The environment variable of each setting.
"""


def _given(source: str, value: object) -> str:
    # "--hammer-timeout 'x'" for an option; "TXGRACE_HAMMER_TIMEOUT='x'" for
    # a variable or a keyword.
    return f"{source}{value!r}" if source.endswith("=") else f"{source} {value!r}"


def parseSeconds(source: str, value: str, allowNegative: bool = False) -> float:
    """
    Parse a number of seconds given as C{value} by C{source} (an option or
    a variable name, for the message).

    @raise SettingError: If it is not a number, or negative where that is
        not allowed.
    """
    try:
        seconds = float(value)
    except ValueError:
        raise SettingError(f"{_given(source, value)}: not a number of seconds") from None
    if not math.isfinite(seconds):
        hint = " (a negative value means never)" if allowNegative else ""
        raise SettingError(f"{_given(source, value)}: not a finite number of seconds{hint}")
    if seconds < 0 and not allowNegative:
        raise SettingError(f"{_given(source, value)}: must be 0 or more seconds")
    return seconds


def parseRate(source: str, value: str) -> float:
    """
    Parse a number of closes per second (C{0}: no limit).

    @raise SettingError: If it is not a finite number of 0 or more.
    """
    try:
        rate = float(value)
    except ValueError:
        raise SettingError(f"{_given(source, value)}: not a number per second") from None
    if not math.isfinite(rate) or rate < 0:
        raise SettingError(f"{_given(source, value)}: must be 0 (no limit) or more per second")
    return rate


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parseSwitch(source: str, value: str) -> bool:
    """
    Parse an on/off setting: C{1}, C{true}, C{yes}, C{on} or C{0},
    C{false}, C{no}, C{off}.

    @raise SettingError: For anything else.
    """
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingError(f"{_given(source, value)}: must be 1 or 0 (on or off)")


def parseSignal(source: str, name: str) -> int:
    """
    Parse the name of a restart signal, such as C{HUP}, C{SIGUSR2} or C{1}.

    @raise SettingError: If it names no signal, or one that cannot restart.
    """
    text = name.strip()
    number: int | None = None
    if text.isdigit():
        try:
            number = int(signal.Signals(int(text)))
        except ValueError:
            number = None
    else:
        upper = text.upper()
        if not upper.startswith("SIG"):
            upper = "SIG" + upper
        member = getattr(signal.Signals, upper, None)
        number = None if member is None else int(member)
    if number is None:
        raise SettingError(f"{_given(source, name)}: no such signal")
    why = _UNUSABLE_SIGNALS.get(signal.Signals(number))
    if why is not None:
        raise SettingError(
            f"{_given(source, name)}: {signal.Signals(number).name} cannot restart: {why}"
        )
    return number


def parseSignals(source: str, value: str) -> tuple[int, ...]:
    """
    Parse a list of restart signals separated by commas or spaces.
    """
    names = [n for n in value.replace(",", " ").split() if n]
    return tuple(dict.fromkeys(parseSignal(source, n) for n in names))


def parsePidFile(source: str, value: str) -> str:
    """
    Check a pidfile path: its directory must exist and be writable.
    """
    try:
        checkPidFileLocation(value)
    except ValueError as e:
        why = str(e).removeprefix(f"pidfile {value!r}: ")
        raise SettingError(f"{_given(source, value)}: {why}") from None
    return os.path.abspath(value)


def _fromText(key: str, source: str, text: str) -> Any:
    if key == "hammerTimeout":
        return parseSeconds(source, text, allowNegative=True)
    if key == "drainRate":
        return parseRate(source, text)
    if key == "handoff":
        return parseSwitch(source, text)
    if key in ("readyTimeout", "shutdownDelay", "probation", "idleGrace"):
        return parseSeconds(source, text)
    if key == "pidFile":
        return parsePidFile(source, text) if text else None
    return parseSignals(source, text)


def checkValue(key: str, value: Any) -> Any:
    """
    Check a setting given in code, as L{txgrace.configure} does.

    @raise SettingError: If C{key} is no setting or C{value} is bad.
    """
    if key not in ENVIRONMENT:
        raise SettingError(
            f"{key}=: no such setting (settings: {', '.join(ENVIRONMENT)})"
        )
    source = f"{key}="
    if key == "pidFile":
        return None if value is None else parsePidFile(source, os.fspath(value))
    if key == "restartSignals":
        signals = []
        for item in value:
            signals.append(parseSignal(source, str(int(item)) if isinstance(item, int) else item))
        return tuple(dict.fromkeys(signals))
    if key == "handoff":
        if isinstance(value, bool):
            return value
        return parseSwitch(source, str(value))
    try:
        text = repr(float(value))
    except (TypeError, ValueError):
        raise SettingError(f"{_given(source, value)}: not a number of seconds") from None
    return _fromText(key, source, text)


def resolve(code: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """
    The settings: each from C{code} if given there, else from its
    environment variable, else the default.

    @raise SettingError: If an environment variable has a bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, variable in ENVIRONMENT.items():
        if key in code:
            values[key] = code[key]
        elif variable in environ:
            values[key] = _fromText(key, f"{variable}=", environ[variable])
    return replace(Settings(), **values)
