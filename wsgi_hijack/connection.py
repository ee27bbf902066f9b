"""A held connection: the smallest record the reactor needs per client.

No socket object, no greenlet, no watcher: an fd number, the protocol it
speaks, bytes still waiting to be sent, the channels it listens to, and
whether it is closing. With ``__slots__`` it is one small object, so memory
per held connection is dominated by the reactor's dict entries and the
kernel, not by Python objects (benchmarks/results/results.md: RSS per held
connection).
"""

from __future__ import annotations

from .protocols.base import Protocol


class Connection:
    __slots__ = ("fd", "protocol", "outbuf", "channels", "closing", "ip", "beat",
                 "__weakref__")

    def __init__(self, fd: int, protocol: Protocol) -> None:
        #: The client's socket fd, owned by the reactor; -1 once closed.
        self.fd = fd
        self.protocol = protocol
        #: Bytes the kernel would not take yet (b"" when none).
        self.outbuf = b""
        #: Channels it is subscribed to (set by the reactor when stored).
        self.channels: tuple[str, ...] = ()
        #: Its response is complete: close it once outbuf is flushed.
        self.closing = False
        #: The client address, kept only when a per-address cap is set.
        self.ip: str | None = None
        #: Its heartbeat as read when it was stored (None: none, or stopped).
        self.beat: bytes | None = None

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def __repr__(self) -> str:
        state = "closed" if self.fd < 0 else f"fd={self.fd}"
        return f"<Connection {state} {self.protocol.name} outbuf={len(self.outbuf)}>"
