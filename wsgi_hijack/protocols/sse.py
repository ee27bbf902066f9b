"""Server-Sent Events (``text/event-stream``), per the HTML standard.

Given a message, produce its event block::

    id: 42
    event: chat
    data: first line
    data: second line

Data containing CR, LF or CRLF is split into several ``data:`` lines (the
client joins them with LF, so line breaks arrive as LF whatever they were).
Ids are integers and event names are checked when published, so neither can
carry a newline and inject a field. Heartbeats are comment lines, which
every client ignores but which keep proxies and the TCP path from timing out.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from .. import config
from .base import Protocol, framed

if TYPE_CHECKING:
    from ..bus.base import Message, Replay

HEAD_HEADERS = [
    ("Content-Type", "text/event-stream; charset=utf-8"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),  # nginx: do not buffer the stream
    ("Connection", "close"),
]

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(data: str, event: str | None = None, id: int | str | None = None) -> bytes:
    """One SSE event block. ``event`` and ``id`` must not contain CR or LF."""
    parts = []
    if id is not None:
        id = str(id)
        if "\r" in id or "\n" in id or "\x00" in id:
            raise ValueError(f"SSE id {id!r} contains CR, LF or NUL")
        parts.append(f"id: {id}\n")
    if event is not None:
        if "\r" in event or "\n" in event:
            raise ValueError(f"SSE event name {event!r} contains CR or LF")
        parts.append(f"event: {event}\n")
    for line in _LINE_BREAK.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode("utf-8")


class ServerSentEvents(Protocol):
    name = "sse"
    movable = True
    heartbeat = b": ping\n\n"

    def __init__(self, retry_ms: int | None = None, restart_retry_ms: int | None = None) -> None:
        self.retry_ms = retry_ms if retry_ms is not None else config.sse_retry_ms()
        if restart_retry_ms is None:
            restart_retry_ms = config.sse_restart_retry_ms()
        # Written when the worker exits (restart, reload): reconnect soon, with
        # Last-Event-ID, to whichever worker takes over.
        self.goodbye = f"retry: {restart_retry_ms}\n\n".encode()

    def frame(self, message: Message) -> bytes:
        return encode_event(message.data, message.event, message.id)

    def opening_frames(self, replay: Replay) -> list[bytes]:
        out = [f"retry: {self.retry_ms}\n\n".encode()]
        if replay.gap:
            # No id: the client's Last-Event-ID must not move past what it missed.
            out.append(encode_event(json.dumps({"last_id": replay.last_id}), "gap"))
        out.extend(framed(self, m) for m in replay.messages)
        return out

    def receive_data(self, data: bytes) -> bytes | None:
        # EventSource never sends after the request; whatever comes is ignored.
        return None
