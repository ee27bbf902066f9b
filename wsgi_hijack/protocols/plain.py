"""A plain stream, as Ruby's double hijack trick writes it: raw bytes after the
head, a fixed line per heartbeat.

The response is delimited by closing the connection (the head says
``Connection: close`` and has no length), which is valid HTTP/1.1 and
HTTP/1.0, unlike the Ruby original's ``Transfer-Encoding: binary``. A message is its
data and a newline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Protocol

if TYPE_CHECKING:
    from ..bus.base import Message

HEAD_HEADERS = [
    ("Content-Type", "text/plain"),
    ("Cache-Control", "no-cache"),
    ("Connection", "close"),
]


class PlainStream(Protocol):
    name = "plain"
    movable = True

    def __init__(self, beat: bytes = b"BEEP\n") -> None:
        if not isinstance(beat, bytes):
            raise TypeError(f"beat must be bytes, got {type(beat).__name__}")
        self.heartbeat = beat

    def receive_data(self, data: bytes) -> bytes | None:
        # A plain stream has nothing to say to a client that talks: discard.
        return None

    def frame(self, message: Message) -> bytes:
        return message.data.encode("utf-8") + b"\n"
