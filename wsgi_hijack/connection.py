"""A held connection: the smallest record the reactor needs per client.

No socket object, no greenlet, no watcher: an fd number, the protocol it
speaks, bytes still waiting to be sent, the channels it listens to, the
request line it was hijacked for (interned: connections on one route share
one string; a successor runs it through the app again when the connection
moves, :mod:`wsgi_hijack.handoff`), and where it is in its life. With
``__slots__`` it is one small object, so memory per held connection is
dominated by the reactor's dict entries and the kernel, not by Python
objects (benchmarks/results/results.md: RSS per held connection).
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .protocols.base import Protocol
    from .tls import TLSSession


class State(IntEnum):
    """Where a held connection is in its life (:mod:`wsgi_hijack.reactor.core`).

    Each step goes forward only. A drop (:meth:`Reactor._drop`) is the one
    transition to ``CLOSED``, from any state: its fd is closed and it leaves
    every structure of the reactor at once.
    """

    #: In the reactor's inbox: handed over from some thread, not yet stored.
    HANDED_OVER = 0
    #: Stored: written to each heartbeat and message, read for the client's input.
    HELD = 1
    #: Its response is complete (or its goodbye written): closed once flushed.
    CLOSING = 2
    #: Dropped: its fd is closed, and no structure of the reactor holds it.
    CLOSED = 3


class CatchUp:
    """What a connection missed, still on its way: frames handed to the wire
    as its socket drains (:meth:`wsgi_hijack.reactor.wire.Wire.pump`), so a
    replay is never cut for being large and costs no more buffer than live
    traffic. Live frames that arrive meanwhile queue behind it, capped as live
    traffic is. Exists only while a catch-up drains."""

    __slots__ = ("frames", "replayed", "live")

    def __init__(self, frames: list[bytes]) -> None:
        self.frames: deque[bytes] = deque(frames)
        #: Frames at the front that are the replay (not counted against the cap).
        self.replayed = len(frames)
        #: Bytes of live frames queued behind it (counted against the cap).
        self.live = 0


class Connection:
    __slots__ = ("fd", "protocol", "outbuf", "channels", "state", "ip", "beat", "request",
                 "tls", "catch_up", "__weakref__")

    def __init__(self, fd: int, protocol: Protocol) -> None:
        #: The client's socket fd, owned by the reactor; -1 once closed.
        self.fd = fd
        self.protocol = protocol
        #: Bytes the kernel would not take yet (b"" when none); on a TLS
        #: connection, records already encrypted.
        self.outbuf = b""
        #: Channels it is subscribed to (set by the reactor when stored).
        self.channels: tuple[str, ...] = ()
        self.state = State.HANDED_OVER
        #: The client address, kept only when a per-address cap is set.
        self.ip: str | None = None
        #: Its heartbeat as read when it was stored (None: none, or stopped).
        self.beat: bytes | None = None
        #: ``METHOD /target HTTP/x.y`` of the request it was hijacked for
        #: (None when held directly, not through the middleware).
        self.request: str | None = None
        #: Its TLS state when the client speaks TLS (every write is encrypted
        #: for it, :mod:`wsgi_hijack.tls`); None for clear text.
        self.tls: TLSSession | None = None
        #: Its replay while it drains (None the rest of the time).
        self.catch_up: CatchUp | None = None

    @property
    def closing(self) -> bool:
        """Its response is complete: it is closed once outbuf is flushed."""
        return self.state is State.CLOSING

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def __repr__(self) -> str:
        where = self.state.name.lower() + ("" if self.fd < 0 else f" fd={self.fd}")
        return f"<Connection {where} {self.protocol.name} outbuf={len(self.outbuf)}>"
