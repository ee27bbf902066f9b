"""Long-poll, the way Discourse's message_bus does it.

The request names the last id the client has seen. If the history holds
anything newer on its channels, the answer is immediate; otherwise the
connection is held (no head written yet) until a message arrives or the
timeout passes, and then gets one complete ``200`` JSON response and is
closed. The client polls again with the ``last_id`` it was given.

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

    def frame(self, message: Message) -> bytes:
        return response([message.as_dict()], message.id)

    def opening(self, replay: Replay) -> bytes:
        if not replay.messages and not replay.gap:
            return b""  # nothing yet: hold
        last = replay.messages[-1].id if replay.messages else replay.last_id
        return response([m.as_dict() for m in replay.messages], last, replay.gap)

    def timeout(self, last_id: int) -> bytes:
        return response([], last_id)
