"""An HTTP/1.1 chunked stream: each message one chunk, correctly framed.

The head carries ``Transfer-Encoding: chunked``; each message is a chunk
holding its data and a newline; a heartbeat is a chunk holding one newline
(an empty chunk would end the response); the goodbye is the last chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Protocol

if TYPE_CHECKING:
    from ..bus.base import Message

HEAD_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("Transfer-Encoding", "chunked"),
]


def encode_chunk(payload: bytes) -> bytes:
    if not payload:
        raise ValueError("an empty chunk ends the stream; use LAST_CHUNK for that")
    return b"%x\r\n%s\r\n" % (len(payload), payload)


LAST_CHUNK = b"0\r\n\r\n"


class ChunkedStream(Protocol):
    name = "chunked"
    movable = True
    heartbeat = encode_chunk(b"\n")
    goodbye = LAST_CHUNK

    def frame(self, message: Message) -> bytes:
        return encode_chunk(message.data.encode("utf-8") + b"\n")
