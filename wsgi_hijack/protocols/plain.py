"""The seed's stream: raw bytes after the head, a fixed line per heartbeat.

The response is delimited by closing the connection (the head says
``Connection: close`` and has no length), which is valid HTTP/1.1 and
HTTP/1.0, unlike the seed's ``Transfer-Encoding: binary``.
"""

from __future__ import annotations

from .base import Protocol

HEAD_HEADERS = [
    ("Content-Type", "text/plain"),
    ("Cache-Control", "no-cache"),
    ("Connection", "close"),
]


class PlainStream(Protocol):
    name = "plain"

    def __init__(self, beat: bytes = b"BEEP\n") -> None:
        if not isinstance(beat, bytes):
            raise TypeError(f"beat must be bytes, got {type(beat).__name__}")
        self.heartbeat = beat

    def receive_data(self, data: bytes) -> bytes | None:
        # A plain stream has nothing to say to a client that talks: discard.
        return None
