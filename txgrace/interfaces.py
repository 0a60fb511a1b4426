"""
Interfaces that applications implement to take part in a drain.
"""

from zope.interface import Interface


class IDrainable(Interface):
    """
    A protocol that knows how to end its connection gracefully, for example
    by sending a websocket close frame with code 1001 ("going away").

    When the server drains, it calls L{drain} once on each connection whose
    protocol provides this interface.  The connection then closes on its own
    terms, or is aborted at the hammer deadline.
    """

    def drain() -> None:
        """
        The server is going away: finish the work in progress and close the
        connection soon.
        """


class IHandoff(Interface):
    """
    A protocol whose connection can move to a successor process between two
    exchanges, instead of being closed by the drain (see
    L{txgrace.handoff}).

    The old process asks L{handoffState} until it answers with bytes; it
    then stops reading the connection and passes it, with those bytes, to
    the successor.  There the port the connection came through builds a
    fresh protocol with its factory, connects it, and calls its
    L{resumeHandoff} with the same bytes.  Twisted's HTTP/1.1 channel is
    adapted to this interface; an application's own protocol provides it
    directly, or through an adapter it registers.
    """

    def handoffState() -> bytes | None:
        """
        What the successor's protocol needs to resume this connection: for
        example the bytes received but not processed yet (a request that
        is still arriving).

        @return: The state, or L{None} while the connection is busy (a
            response is being written): it is asked again shortly.
        """

    def resumeHandoff(state: bytes) -> None:
        """
        Called in the successor, on a protocol just built by the port's
        factory and connected to the moved connection: resume from
        C{state}, which L{handoffState} gave in the old process.
        """
