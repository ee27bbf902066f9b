"""The protocol interface a held connection speaks through.

A protocol is sans-IO: it turns events (a heartbeat is due, a message was
published, the client sent bytes, the server is going away) into bytes, and
never touches a socket. The reactor does all I/O. Most protocols keep no
per-connection state, so one instance serves every connection that speaks
it: its heartbeat is one ``bytes`` object written to all, and a message is
framed once per protocol (cached on the message) whatever the number of
subscribers. A protocol that does keep state per connection (WebSocket: its
parser, its pongs) points ``framer`` at one shared instance, so messages are
still framed once for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..bus.base import Message, Replay


class ProtocolError(Exception):
    """The client broke the protocol; the reactor writes ``goodbye`` (for
    instance a close frame with the reason), then closes the connection."""

    def __init__(self, reason: str, goodbye: bytes = b"") -> None:
        super().__init__(reason)
        self.goodbye = goodbye


@dataclass(frozen=True, slots=True)
class ConnectionDone:
    """What :meth:`Protocol.receive_data` returns when the conversation ended
    normally (a close handshake): write ``goodbye``, then close once it is
    flushed. An event, as h11 and wsproto return one; only a broken protocol
    is an exception (:class:`ProtocolError`)."""

    goodbye: bytes = b""


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
    #: True when the reactor must ask liveness() each heartbeat round.
    checks_liveness = False
    #: True when a held connection of this protocol may move to a successor
    #: worker (:mod:`wsgi_hijack.handoff`): its per-connection state, if any,
    #: goes through :meth:`handoff_state` and :meth:`resume`. False by
    #: default, so that an own protocol with state of its own is never moved
    #: without it: it says its goodbye instead, and the client reconnects.
    movable = False

    @property
    def framer(self) -> Protocol:
        """The shared instance whose frame() makes this protocol's bytes."""
        return self

    def held(self, conn: object) -> None:
        """The reactor stored ``conn`` (its :class:`~wsgi_hijack.connection.
        Connection` record) for this protocol, in its own thread and before
        any of the client's input. A protocol that acts for the app on one
        connection (WebSocket) keeps it; shared ones ignore it."""

    def receive_data(self, data: bytes) -> bytes | ConnectionDone | None:
        """The client sent ``data``. Return bytes to answer with, None, or
        :class:`ConnectionDone` when the conversation is over.

        Raise :class:`ProtocolError` to have the connection closed.
        """
        return None

    def frame(self, message: Message) -> bytes:
        """The bytes that carry ``message`` on this protocol."""
        raise NotImplementedError(f"{type(self).__name__} does not carry messages")

    def opening_frames(self, replay: Replay) -> list[bytes]:
        """What the connection is sent when it is stored -- what it missed, if
        anything -- as frames, which the reactor writes as the socket drains
        (a replay is never cut for being large). The messages' frames are
        the ones made once for all subscribers (:func:`framed`). A protocol
        that overrides only :meth:`opening` has that sent as one frame."""
        if type(self).opening is not Protocol.opening:
            data = self.opening(replay)
            return [data] if data else []
        return [framed(self, m) for m in replay.messages]

    def opening(self, replay: Replay) -> bytes:
        """:meth:`opening_frames` as one bytes object."""
        return b"".join(self.opening_frames(replay))

    def timeout(self, last_id: int) -> bytes:
        """For protocols held with a deadline: the response when it passes."""
        return b""

    def liveness(self, now: float) -> bytes | None:
        """None while the peer is alive; else last bytes to write before closing."""
        return None

    def handoff_state(self, now: float) -> tuple[dict, bytes]:
        """This connection's state as JSON-safe data, and client bytes to parse
        again in the successor (a half-received frame); for a movable
        protocol. The stateless ones have none."""
        return {}, b""

    def resume(self, state: dict, now: float) -> None:
        """Take up ``state`` from :meth:`handoff_state` of the predecessor;
        raise ValueError if it cannot be trusted."""


def framed(protocol: Protocol, message: Message) -> bytes:
    """``protocol.frame(message)``, computed once per message and protocol."""
    framer = protocol.framer
    frames = message.frames
    data = frames.get(framer)
    if data is None:
        data = frames[framer] = framer.frame(message)
    return data
