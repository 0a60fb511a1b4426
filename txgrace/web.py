# -*- test-case-name: txgrace.test.test_web -*-
"""
Helpers for C{twisted.web} applications: a health check that takes the
process out of a load balancer's rotation before it drains, and requests
that end cleanly when the drain begins (server-sent event streams, long
polls).
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from txgrace.lifecycle import HANDED_OVER, RESTARTING, SERVING, ProcessLifecycle, lifecycleFor


class HealthResource(Resource):
    """
    Answers C{200 ok} while this process serves, and C{503} while it is not
    ready yet and from the moment a stop begins (through the shutdown
    delay, so that a load balancer's health check takes it out of rotation
    before the drain), and after it handed over.
    """

    isLeaf = True

    def __init__(self, lifecycle: ProcessLifecycle | None = None) -> None:
        Resource.__init__(self)
        self._lifecycle = lifecycle

    def render_GET(self, request: Request) -> bytes:
        lifecycle = self._lifecycle or lifecycleFor()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if lifecycle.state in (SERVING, RESTARTING) and not lifecycle.stopBegun:
            return b"ok\n"
        request.setResponseCode(503)
        state = "stopping" if lifecycle.stopBegun and lifecycle.state != HANDED_OVER else lifecycle.state
        return f"{state}\n".encode()

    render_HEAD = render_GET


class WithHealth(Resource):
    """
    C{resource}, with a L{HealthResource} at C{path} (such as
    C{b"/healthz"}).
    """

    def __init__(self, resource: IResource, path: bytes, health: IResource | None = None) -> None:
        Resource.__init__(self)
        self._resource = resource
        self._path = path
        self._health = HealthResource() if health is None else health

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        if request.path == self._path:
            return self._health
        if getattr(self._resource, "isLeaf", False):
            # Site already took the segment for us: give it back.
            request.postpath.insert(0, request.prepath.pop())
            return self._resource
        return self._resource.getChildWithDefault(name, request)

    def render(self, request: Any) -> Any:
        return self._resource.render(request)


def finishOnDrain(
    request: Request,
    last: Callable[[], bytes | None] | bytes | None = None,
    lifecycle: ProcessLifecycle | None = None,
) -> None:
    """
    Finish C{request}, a request held open (a stream, a long poll), when
    this process begins to drain: write C{last} (bytes, or a callable that
    returns them) and finish.  Nothing happens if it finished before.
    """
    draining = (lifecycle or lifecycleFor()).whenDraining()
    finished = [False]

    def done(ignored: object) -> None:
        finished[0] = True

    request.notifyFinish().addBoth(done)

    def drain(ignored: object) -> None:
        if finished[0]:
            return
        data = last() if callable(last) else last
        if data:
            request.write(data)
        request.finish()

    draining.addCallback(drain)


def lastEvent(data: str, retryMilliseconds: int = 1000, event: str | None = None) -> bytes:
    """
    A server-sent event to end a stream with: C{data}, and a C{retry:} hint
    so that the browser reconnects (to the successor) after that long.
    """
    lines = [f"retry: {retryMilliseconds}"]
    if event is not None:
        lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.splitlines() or [""]]
    return ("\n".join(lines) + "\n\n").encode("utf-8")
