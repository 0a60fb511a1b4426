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
