"""
What tracking a connection costs, in isolation from the network: the CPU
time to create a server transport, connect a protocol to it and lose the
connection, for Twisted's tcp.Server and for txgrace's TrackedTCPServer.
The socket and the reactor are stand-ins that do nothing, so the difference
is the Python work txgrace adds per connection, free of the run-to-run
noise of a loaded server (bench/overhead.py measures that whole).

    .venv/bin/python bench/tracking.py [--connections 50000] [--rounds 5]

Prints the best round of each, per connection, and the difference.  Nothing
runs per read or write on TCP: how long a connection has been quiet comes
from the kernel (TCP_INFO) when a drain asks.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Any

from _common import machineInfo, printMachineInfo
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from txgrace.adopt import SocketRegistry, TrackedTCPServer


class _Socket:
    family = socket.AF_INET

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 5

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Reactor:
    seconds = staticmethod(time.time)

    def addReader(self, reader: Any) -> None:
        pass

    def removeReader(self, reader: Any) -> None:
        pass

    def removeWriter(self, writer: Any) -> None:
        pass


class _Port:
    registry = SocketRegistry(inherit=lambda: [])
    _realPortNumber = 8080
    _type = "TCP"


def perConnection(transport: type, connections: int) -> float:
    """
    Microseconds of CPU per connection made and lost with C{transport}.
    """
    skt, reactor, port = _Socket(), _Reactor(), _Port()
    reason = Failure(ConnectionDone())
    started = time.process_time()
    for _ in range(connections):
        protocol = Protocol()
        connection = transport(skt, protocol, ("127.0.0.1", 40000), port, 1, reactor)
        protocol.makeConnection(connection)
        connection.connectionLost(reason)
    return (time.process_time() - started) / connections * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    printMachineInfo(machineInfo())
    best = {"tcp.Server": float("inf"), "TrackedTCPServer": float("inf")}
    for _ in range(args.rounds):
        best["tcp.Server"] = min(best["tcp.Server"], perConnection(tcp.Server, args.connections))
        best["TrackedTCPServer"] = min(
            best["TrackedTCPServer"], perConnection(TrackedTCPServer, args.connections)
        )
    for name, value in best.items():
        print(f"{name:18s} {value:6.3f} us per connection (best of {args.rounds})")
    added = best["TrackedTCPServer"] - best["tcp.Server"]
    print(f"{'tracking adds':18s} {added:6.3f} us per connection")


if __name__ == "__main__":
    main()
