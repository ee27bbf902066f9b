"""Long-poll, the way Discourse's message_bus does it.

The request names the last id the client has seen. If the history holds
anything newer on its channels, the answer is immediate; otherwise the
connection is held (no head written yet) until a message arrives or the
timeout passes, and then gets one complete ``200`` JSON response and is
closed. The client polls again with the ``last_id`` it was given.

An answer is one page: the messages after the client's id up to about
``page_bytes`` of data (``WSGI_HIJACK_MAX_BUFFER``, 64 KiB by default; at
least one message), and ``last_id`` is the last one in it, so a client
far behind catches up over several polls at once, and no answer is larger
than a page and one message. A client that polls with the ``last_id`` it
was given misses nothing either way.

Body: ``{"messages": [{"id", "channel", "event", "data"}...], "last_id": N,
"gap": bool}``. ``gap`` is true when some of what the client missed is no
longer in the history.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .base import Protocol

if TYPE_CHECKING:
    from ..bus.base import Message, Replay


def response(messages: list[dict], last_id: int, gap: bool = False) -> bytes:
    body = json.dumps({"messages": messages, "last_id": last_id, "gap": gap},
                      separators=(",", ":")).encode()
    head = ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n").encode()
    return head + body


class LongPoll(Protocol):
    name = "longpoll"
    movable = True
    one_shot = True

    def __init__(self, page_bytes: int | None = None) -> None:
        from .. import config

        self.page_bytes = page_bytes if page_bytes is not None else config.max_buffer()

    def frame(self, message: Message) -> bytes:
        return response([message.as_dict()], message.id)

    def opening_frames(self, replay: Replay) -> list[bytes]:
        if not replay.messages and not replay.gap:
            return []  # nothing yet: hold
        page: list[dict] = []
        size = 0
        for message in replay.messages:
            if page and size + len(message.data) > self.page_bytes:
                break  # the rest in the next poll, from this page's last_id
            page.append(message.as_dict())
            size += len(message.data)
        last = page[-1]["id"] if page else replay.last_id
        return [response(page, last, replay.gap)]

    def timeout(self, last_id: int) -> bytes:
        return response([], last_id)
