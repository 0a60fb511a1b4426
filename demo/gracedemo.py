"""
gracedemo, in Twisted: the demo of facebookgo/grace, served by txgrace.

  /                      says which pid answered
  /sleep/?duration=20s   sleeps, then says when it started, how long it
                         slept and which pid answered

Run it (from the repository root) on three ports:

  twist txgrace --endpoint grace:tcp:28567 --endpoint grace:tcp:28568 \\
      --endpoint grace:tcp:28569 --app demo.gracedemo.site
"""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0}


def parseDuration(text: str) -> float:
    """
    Parse C{"20s"}, C{"500ms"}, C{"1m"} or a plain number of seconds.
    """
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    return float(text)


class Sleep(Resource):
    """
    Answers after C{?duration=}.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes | int:
        raw = (request.args.get(b"duration") or [b"0s"])[0].decode()
        try:
            duration = parseDuration(raw)
        except ValueError:
            request.setResponseCode(400)
            return f"bad duration {raw!r}\n".encode()
        started = time.strftime("%Y-%m-%d %H:%M:%S")

        def answer() -> None:
            request.write(
                f"started at {started} slept for {duration:g} seconds "
                f"from pid {os.getpid()}.\n".encode()
            )
            request.finish()

        sleeping = deferLater(reactor, duration, answer)
        # A client that goes away (or a hammer) cancels the sleep; that is
        # the end of this request, not an error to log.
        sleeping.addErrback(lambda failure: failure.trap(CancelledError))
        request.notifyFinish().addErrback(lambda _: sleeping.cancel())
        return NOT_DONE_YET


class Root(Resource):
    """
    Says which pid answered.
    """

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"":
            return self
        return Resource.getChild(self, path, request)

    def render_GET(self, request: Request) -> bytes:
        return f"hello from pid {os.getpid()}.\n".encode()


root = Root()
root.putChild(b"sleep", Sleep())
site = Site(root)
