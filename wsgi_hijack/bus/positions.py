"""Where a client is in its channels, when each channel counts its own ids.

Most buses number every message of the deployment with one counter, so one
integer says where a client is on all its channels (:mod:`.base`). On Redis
Cluster each channel lives on its shard and counts its own ids, and the
shards' messages reach a worker in no common order: one integer cannot say
where a client listening to channels on two shards is. Its position is then
one id per channel, written ``news=1796105478457829,tick=1796105478459088``
(channel names hold no ``=`` or ``,``). This text is the SSE event id, the
WebSocket message's ``id`` and the long-poll's ``last_id``, and comes back
as ``Last-Event-ID``, ``?last_id=`` or ``?since=``.

A plain integer is still a position: the same id on every channel. A
channel a position does not name starts from now (nothing replayed).
"""

from __future__ import annotations

from .base import CHANNEL_RE

#: A client's position: one id for every channel, or one per channel.
Position = int | dict[str, int]

_MAX_DIGITS = 19  # ids fit a signed 64-bit integer


def parse_position(text: str) -> Position:
    """A position as a client sends it; ValueError says what is wrong."""
    if text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS:
        return int(text)
    marks: dict[str, int] = {}
    for part in text.split(","):
        channel, eq, value = part.partition("=")
        if not eq or not CHANNEL_RE.fullmatch(channel):
            raise ValueError(f"{part!r} is not channel=id")
        if not (value.isascii() and value.isdigit() and len(value) <= _MAX_DIGITS):
            raise ValueError(f"the id of {channel!r} must be a non-negative integer, "
                             f"not {value!r}")
        if channel in marks:
            raise ValueError(f"channel {channel!r} is named twice")
        marks[channel] = int(value)
    return marks


def format_position(marks: dict[str, int]) -> str:
    """The text of a per-channel position, channels in name order."""
    return ",".join(f"{channel}={marks[channel]}" for channel in sorted(marks))


def after_on(position: Position | None, channel: str) -> int | None:
    """The id after which ``channel`` goes on (None: from now)."""
    if position is None or type(position) is int:
        return position
    return position.get(channel)
