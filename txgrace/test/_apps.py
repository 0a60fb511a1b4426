"""
Applications for the process tests, served with
C{twist txgrace --app txgrace.test._apps.site}.

  /                       "hello from pid N"
  /sleep?duration=SECONDS answers after that long ("slept ... from pid N")
  /forever                never answers

  /spawn                  runs a subprocess and answers with the environment
                          and descriptors it saw

If the file named by C{$TXGRACE_TEST_FAULT} exists when the module is
imported, its content makes this process misbehave: C{crash} raises at
import, C{hang} never becomes ready, C{exit-after-bind} exits with status 3
once its ports listen but before it is ready, C{exit-after-ready} exits
with status 4 0.3 s after its reactor starts (just after it is ready),
C{exit-1s-after-ready} exits with status 4 one second after it began to
serve, C{slow-start} takes 1.5 s to import,
C{hold-fails} holds its readiness with a Deferred that fails 0.3 s after
the reactor starts (so it stops without ever serving),
C{die-mid-handoff} exits with status 9 once it has taken a few connections
from its predecessor, C{no-handoff} takes none (as an older txgrace).
Tests write it to make a successor fail.

  POST /body              answers "got N bytes from pid N" once the whole
                          body (Content-Length) has arrived
  /stream?duration=S      a chunked response, a chunk every 0.1 s for S s
  /peer?duration=S        "peer PORT from pid N", PORT the client's port on
                          this connection (for a proxy, its upstream
                          connection), after S s (default 0)
"""

import os
import subprocess

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
if os.environ.get("TXGRACE_TEST_ATEXIT"):
    import atexit

    def _ranAtExit(path=os.environ["TXGRACE_TEST_ATEXIT"]):
        with open(path, "a") as f:
            f.write(f"exit handler of pid {os.getpid()}\n")

    atexit.register(_ranAtExit)
    # An application's own buffered file, never flushed by the app.
    _buffered = open(os.environ["TXGRACE_TEST_ATEXIT"] + ".buffered", "a")
    _buffered.write("written, not flushed\n")
if _FAULT == "crash":
    raise RuntimeError("crashing on purpose (TXGRACE_TEST_FAULT)")
if _FAULT == "hang":
    holdReadiness(Deferred())
if _FAULT == "exit-after-bind":
    holdReadiness(Deferred())
    reactor.callWhenRunning(reactor.callLater, 0.2, os._exit, 3)
if _FAULT == "hold-fails":
    _failingHold: Deferred = Deferred()
    holdReadiness(_failingHold)
    reactor.callWhenRunning(
        reactor.callLater,
        0.3,
        _failingHold.errback,
        RuntimeError("readiness check failed on purpose (TXGRACE_TEST_FAULT)"),
    )
if _FAULT == "slow-start":
    # Still starting for a while: a signal meanwhile must not kill it.
    import time

    time.sleep(1.5)
if _FAULT == "no-handoff":
    import txgrace

    txgrace.configure(handoff=False)
if _FAULT == "die-mid-handoff":
    from txgrace.restart import ControlChannel

    _lineReceived = ControlChannel.lineReceived

    def _dieAfterAFew(self, line):
        if getattr(self, "_taken", 0) == 5:
            return  # Read no more; die once the answers are out.
        _lineReceived(self, line)
        if line.startswith(b"CONN "):
            self._taken = getattr(self, "_taken", 0) + 1
            if self._taken == 5:
                log.info("dying after taking {count} connections", count=5)
                self.transport.stopReading()
                reactor.callLater(0.3, os._exit, 9)

    ControlChannel.lineReceived = _dieAfterAFew
if _FAULT == "exit-after-ready":
    reactor.callWhenRunning(reactor.callLater, 0.3, os._exit, 4)
if _FAULT == "exit-1s-after-ready":
    # A bug that shows under real traffic: status 4, one second after this
    # process began to serve (its lifecycle's state, once it accepts).
    from twisted.internet.task import LoopingCall

    from txgrace.lifecycle import SERVING, lifecycleFor

    def _exitOnceServing():
        if lifecycleFor().state == SERVING:
            _watch.stop()
            reactor.callLater(1.0, os._exit, 4)

    _watch = LoopingCall(_exitOnceServing)
    reactor.callWhenRunning(_watch.start, 0.01)


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


class Body(Resource):
    isLeaf = True

    def render_POST(self, request):
        body = request.content.read()
        return f"got {len(body)} bytes from pid {os.getpid()}\n".encode()


class Stream(Resource):
    isLeaf = True

    def render_GET(self, request):
        duration = float((request.args.get(b"duration") or [b"1"])[0])
        log.info("streaming {duration}", duration=duration)
        chunks = max(1, int(duration / 0.1))
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def more(left):
            if gone:
                return
            if left == 0:
                request.write(f"streamed from pid {os.getpid()}\n".encode())
                request.finish()
                return
            request.write(b".")
            reactor.callLater(0.1, more, left - 1)

        more(chunks)
        return NOT_DONE_YET


class Peer(Resource):
    isLeaf = True

    def render_GET(self, request):
        duration = float((request.args.get(b"duration") or [b"0"])[0])
        port = request.transport.getPeer().port

        def answer():
            request.write(f"peer {port} from pid {os.getpid()}\n".encode())
            request.finish()

        if duration <= 0:
            answer()
            return NOT_DONE_YET
        call = deferLater(reactor, duration, answer)
        request.notifyFinish().addErrback(lambda _: call.cancel())
        return NOT_DONE_YET


class Forever(Resource):
    isLeaf = True

    def render_GET(self, request):
        log.info("forever begins")
        return NOT_DONE_YET


class Spawn(Resource):
    isLeaf = True

    def render_GET(self, request):
        # What an application's own subprocess inherits, spawned carelessly
        # (close_fds=False, as os.system would): only close-on-exec
        # descriptors stay out of it.
        return subprocess.run(
            ["/bin/sh", "-c", "env; echo FDS $(ls /proc/self/fd | tr '\\n' ' ')"],
            capture_output=True,
            check=True,
            close_fds=False,
        ).stdout


class Orphan(Resource):
    isLeaf = True

    def render_GET(self, request):
        # Leaves a process whose parent exits at once: it is handed to pid 1,
        # which must reap it when it exits.
        subprocess.run(["/bin/sh", "-c", "sleep 0.3 & exit 0"], check=True)
        return b"orphaned\n"


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
root.putChild(b"spawn", Spawn())
root.putChild(b"orphan", Orphan())
root.putChild(b"body", Body())
root.putChild(b"stream", Stream())
root.putChild(b"peer", Peer())
site = Site(root)


class AppRoot(Root):
    """
    The same resources as L{root}, made by a zero-argument call, for
    C{twist web --class txgrace.test._apps.AppRoot}.
    """

    def __init__(self):
        Root.__init__(self)
        self.putChild(b"sleep", Sleep())
        self.putChild(b"forever", Forever())


def jsonStdoutObserver():
    """
    A log observer that writes JSON events to stdout, for
    C{twistd --logger txgrace.test._apps.jsonStdoutObserver}.
    """
    import sys

    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout, "")


def _slowWSGI(environ, startResponse):
    import time

    time.sleep(float(environ.get("QUERY_STRING", "").partition("=")[2] or "0"))
    startResponse("200 OK", [("Content-Type", "text/plain")])
    return [f"wsgi from pid {os.getpid()}\n".encode()]


def wsgiSite():
    """
    A WSGI app (C{/?duration=SECONDS} sleeps in its thread), for
    C{--app txgrace.test._apps.wsgiSite}.
    """
    from twisted.web.wsgi import WSGIResource

    return Site(WSGIResource(reactor, reactor.getThreadPool(), _slowWSGI))


class _Echo:
    """
    A websocket protocol of L{twisted.web.websocket}: answers each text
    message with C{"<message> from pid N"}.
    """

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        pass

    def pongReceived(self, payload):
        pass

    def textMessageReceived(self, message):
        self.transport.sendTextMessage(f"{message} from pid {os.getpid()}")

    def bytesMessageReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


class _EchoFactory:
    def buildProtocol(self, request):
        return _Echo()


def webSocketSite():
    """
    Twisted's own websockets at C{/ws}, for
    C{--app txgrace.test._apps.webSocketSite}.
    """
    from twisted.web.websocket import WebSocketResource

    root = Root()
    root.putChild(b"ws", WebSocketResource(_EchoFactory()))
    return Site(root)


def _autobahnEchoFactory():
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    class Echo(WebSocketServerProtocol):
        def onMessage(self, payload, isBinary):
            self.sendMessage(payload + f" from pid {os.getpid()}".encode(), False)

    factory = WebSocketServerFactory()
    factory.protocol = Echo
    # Autobahn aborts a peer that has not answered its close frame within
    # closeHandshakeTimeout (1 s by default): hundreds of client threads on
    # a loaded test machine can be that slow, and the abort can discard the
    # close frame before the client reads it.
    factory.setProtocolOptions(closeHandshakeTimeout=30)
    return factory


def autobahnFactory():
    """
    An autobahn websocket echo server as a plain factory, for
    C{--app txgrace.test._apps.autobahnFactory}.
    """
    return _autobahnEchoFactory()


def autobahnSite():
    """
    The autobahn echo server served through C{twisted.web} at C{/ws}
    (autobahn's own C{WebSocketResource} takes the connection over from the
    C{HTTPChannel}), for C{--app txgrace.test._apps.autobahnSite}.
    """
    from autobahn.twisted.resource import WebSocketResource as AutobahnResource

    root = Root()
    root.putChild(b"ws", AutobahnResource(_autobahnEchoFactory()))
    return Site(root)


def backgroundSite():
    """
    L{site}, plus background work that stops through the drain notice: a
    L{LoopingCall} that logs C{"background tick in pid N"} every 0.1 s until
    L{txgrace.whenDraining} fires, which logs C{"background work stopped in
    pid N"}.  For C{--app txgrace.test._apps.backgroundSite}.
    """
    from twisted.internet.task import LoopingCall

    from txgrace import whenDraining

    loop = LoopingCall(lambda: log.info("background tick in pid {pid}", pid=os.getpid()))
    loop.start(0.1)

    def stop(ignored):
        loop.stop()
        log.info("background work stopped in pid {pid}", pid=os.getpid())

    whenDraining().addCallback(stop)
    return site
