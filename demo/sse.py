"""
Server-sent events and a long poll that end cleanly when the server drains,
with no help from the client: serve with

    twist txgrace --endpoint grace:tcp:28567 --app demo.sse.site --health /healthz

  /events   a stream of ticks, one a second; when the drain begins it sends a
            last event with a retry: hint (the browser reconnects, to the
            successor) and finishes
  /poll     a long poll: answers after 30 s, or at once when the drain begins
  /healthz  200 while serving, 503 from SIGTERM on (through --shutdown-delay)
"""

import os

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from txgrace.web import finishOnDrain, lastEvent


class Events(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        ticks = [0]

        def tick():
            ticks[0] += 1
            request.write(f"data: tick {ticks[0]} from pid {os.getpid()}\n\n".encode())

        loop = LoopingCall(tick)
        loop.start(1.0)

        def stopTicking(ignored):
            if loop.running:
                loop.stop()

        def goodbye():
            stopTicking(None)
            return lastEvent(f"pid {os.getpid()} is going away", 500, "bye")

        request.notifyFinish().addBoth(stopTicking)
        finishOnDrain(request, goodbye)
        return NOT_DONE_YET


class Poll(Resource):
    isLeaf = True

    def render_GET(self, request):
        call = reactor.callLater(30, self._answer, request, b"nothing new\n")

        def cancel(ignored=None):
            if call.active():
                call.cancel()

        def answerNow():
            cancel()
            return b"draining: ask again\n"

        request.notifyFinish().addBoth(cancel)
        finishOnDrain(request, answerNow)
        return NOT_DONE_YET

    def _answer(self, request, body):
        request.write(body)
        request.finish()


root = Resource()
root.putChild(b"events", Events())
root.putChild(b"poll", Poll())
site = Site(root)
