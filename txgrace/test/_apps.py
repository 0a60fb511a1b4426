"""
Applications for the process tests, served with
C{twist txgrace --app txgrace.test._apps.site}.

  /                       "hello from pid N"
  /sleep?duration=SECONDS answers after that long ("slept ... from pid N")
  /forever                never answers

If the file named by C{$TXGRACE_TEST_FAULT} exists when the module is
imported, its content makes this process misbehave: C{crash} raises at
import, C{hang} never becomes ready.  Tests write it to make a successor fail.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from txgrace import holdReadiness

log = Logger()


def _fault() -> str:
    path = os.environ.get("TXGRACE_TEST_FAULT")
    if not path or not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read().strip()


_FAULT = _fault()
if _FAULT == "crash":
    raise RuntimeError("crashing on purpose (TXGRACE_TEST_FAULT)")
if _FAULT == "hang":
    holdReadiness(Deferred())


class Sleep(Resource):
    isLeaf = True

    def render_GET(self, request):
        duration = float((request.args.get(b"duration") or [b"0"])[0])
        log.info("sleeping {duration}", duration=duration)

        def answer():
            request.write(f"slept {duration} from pid {os.getpid()}\n".encode())
            request.finish()

        call = deferLater(reactor, duration, answer)
        request.notifyFinish().addErrback(lambda _: call.cancel())
        return NOT_DONE_YET


class Forever(Resource):
    isLeaf = True

    def render_GET(self, request):
        log.info("forever begins")
        return NOT_DONE_YET


class Root(Resource):
    def getChild(self, path, request):
        if path == b"":
            return self
        return Resource.getChild(self, path, request)

    def render_GET(self, request):
        return f"hello from pid {os.getpid()}\n".encode()


root = Root()
root.putChild(b"sleep", Sleep())
root.putChild(b"forever", Forever())
site = Site(root)
