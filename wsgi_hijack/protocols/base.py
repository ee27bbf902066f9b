"""The protocol interface a held connection speaks through.

A protocol is sans-IO: it turns events (a heartbeat is due, the client sent
bytes, the server is going away) into bytes, and never touches a socket.
The reactor does all I/O. Protocols without per-connection state are shared
by every connection that speaks them, so their heartbeat is one ``bytes``
object written to all, framed once.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """The client broke the protocol; the reactor closes its connection."""


class Protocol:
    #: Name for logs and metrics.
    name = "protocol"
    #: Bytes written to every connection on each heartbeat round; b"" for none.
    heartbeat: bytes = b""
    #: Bytes written before the reactor closes a connection at shutdown.
    goodbye: bytes = b""

    def receive_data(self, data: bytes) -> bytes | None:
        """The client sent ``data``. Return bytes to answer with, or None.

        Raise :class:`ProtocolError` to have the connection closed.
        """
        return None
