"""The protocol interface a held connection speaks through.

A protocol is sans-IO: it turns events (a heartbeat is due, a message was
published, the client sent bytes, the server is going away) into bytes, and
never touches a socket. The reactor does all I/O. Protocols keep no
per-connection state, so one instance serves every connection that speaks
it: its heartbeat is one ``bytes`` object written to all, and a message is
framed once per protocol (cached on the message) whatever the number of
subscribers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..bus import Message, Replay


class ProtocolError(Exception):
    """The client broke the protocol; the reactor closes its connection."""


class Protocol:
    #: Name for logs and metrics.
    name = "protocol"
    #: Bytes written to every connection on each heartbeat round; b"" for none.
    heartbeat: bytes = b""
    #: Bytes written before the reactor closes a connection at shutdown.
    goodbye: bytes = b""
    #: True when one delivery completes the response (long-poll): the
    #: connection then takes no more messages and closes once it is flushed.
    one_shot = False

    def receive_data(self, data: bytes) -> bytes | None:
        """The client sent ``data``. Return bytes to answer with, or None.

        Raise :class:`ProtocolError` to have the connection closed.
        """
        return None

    def frame(self, message: Message) -> bytes:
        """The bytes that carry ``message`` on this protocol."""
        raise NotImplementedError(f"{type(self).__name__} does not carry messages")

    def opening(self, replay: Replay) -> bytes:
        """Bytes written when the connection is stored: what it missed, if anything."""
        return b"".join(self.frame(m) for m in replay.messages)

    def timeout(self, last_id: int) -> bytes:
        """For protocols held with a deadline: the response when it passes."""
        return b""


def framed(protocol: Protocol, message: Message) -> bytes:
    """``protocol.frame(message)``, computed once per message and protocol."""
    frames = message.frames
    data = frames.get(protocol)
    if data is None:
        data = frames[protocol] = protocol.frame(message)
    return data
