"""
The server that bench/overhead.py loads: one small static Site on one
endpoint, either plain Twisted or through a GraceService.

    python bench/_serve.py plain "tcp:0:interface=127.0.0.1"
    python bench/_serve.py grace "tcp:0:interface=127.0.0.1"

In "grace" mode the endpoint string gets a "grace:" prefix.  Once listening,
it prints "LISTENING <port>" on stdout.  SIGTERM stops it (gracefully, in
grace mode).

txgrace is imported from $TXGRACE_BENCH_SOURCE if set, else from the
checkout this file is in, so the checkout is measured, not an installed copy.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0,
    os.environ.get("TXGRACE_BENCH_SOURCE")
    or os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
)

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

BODY = b"Hello, world\n"  # 13 bytes


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"content-length", b"%d" % len(BODY))
        return BODY


def makeSite() -> Site:
    site = Site(Hello())
    # Not what is measured: the per-request access log.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def announce(port: object) -> None:
    print(f"LISTENING {port.getHost().port}", flush=True)  # type: ignore[attr-defined]


def main(mode: str, endpoint: str) -> None:
    site = makeSite()
    if mode == "plain":
        results: list[object] = []
        # tcp: and ssl: listen at once: the Deferred has fired (or failed) here.
        serverFromString(reactor, endpoint).listen(site).addBoth(results.append)
        (port,) = results
        if isinstance(port, Failure):
            port.raiseException()
        reactor.callWhenRunning(announce, port)
    elif mode == "grace":
        import txgrace
        from txgrace import GraceService

        print(f"txgrace from {os.path.dirname(txgrace.__file__)}", file=sys.stderr, flush=True)

        service = GraceService(hammerTimeout=5, installSignalHandlers=False)
        service.listen("grace:" + endpoint, site)
        service.startService()
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        (listening,) = list(service)
        reactor.callWhenRunning(announce, listening.port)  # type: ignore[attr-defined]
    else:
        raise SystemExit(f"unknown mode {mode!r}: plain or grace")
    reactor.run()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
