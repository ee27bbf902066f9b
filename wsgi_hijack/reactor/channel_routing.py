"""Exactly-once routing when each channel counts its own ids (Redis Cluster).

The rules of :mod:`.routing` hold per channel instead of for the whole bus:
a channel's messages arrive in its id order (one shard sends them, in the
order it ran the publishes), but two channels' messages arrive in no common
order. So every watermark is per channel:

- ``delivered[c]``: the id up to which every connection attached to ``c``
  has ``c``'s messages. It starts where the bus stood when the subscription
  went live, and a message at or below it is one the joiners already read.
- a connection whose history read went past ``delivered[c]`` skips, on
  ``c``, the messages it already has (as :class:`.routing.Router` does).

A connection on one channel is framed as on any bus: its event ids are the
channel's ids, and one frame serves the whole group. A connection on several
channels needs its position on each (:mod:`wsgi_hijack.bus.positions`) as
its event id, which no other connection shares: it is grouped alone, and
each message reaches it as a copy whose id is that position.
"""

from __future__ import annotations

from typing import Any

from ..bus.base import Message, Replay
from ..bus.positions import after_on, format_position
from ..connection import Connection
from .routing import (
    CatchUp,
    Delivery,
    Effect,
    FanOut,
    Gathered,
    GroupKey,
    Router,
    group_key,
)

#: The group key of a connection on several channels: its own frames.
_OWN_FRAMES = "own frames"


class PerChannelRouter(Router):
    """:class:`.routing.Router`'s bookkeeping with a watermark per channel."""

    def __init__(self, confirms: bool = True) -> None:
        super().__init__(confirms)
        self.delivered: dict[str, int] = {}
        self._has: dict[Connection, dict[str, int]] = {}
        # channel -> its live messages held back while its subscription is
        # confirmed again (after a reconnection); the others route on
        self._held: dict[str, list[Message]] = {}

    # -- connections --------------------------------------------------------------

    def join(self, conn: Connection, after: Any) -> list[Effect]:
        effects = self._subscribe(conn)
        if not self._ready(conn, after):
            return effects
        upto = tuple((c, self.delivered[c]) for c in conn.channels if c in self.delivered)
        effects.append(self._read(conn, after, upto))
        return effects

    def attach(self, conn: Connection, read_upto: Any, after: Any = None) -> None:
        self._reading.discard(conn)
        delivered = self.delivered
        has = dict(read_upto)
        for channel in conn.channels:
            start = after_on(after, channel)
            if start is not None and start > has.get(channel, 0):
                has[channel] = start
        ahead = {c: i for c, i in has.items() if i > delivered.get(c, 0)}
        if ahead:  # messages still on their way that this connection has read
            self._has[conn] = ahead
        self._add(conn)

    def leave(self, conn: Connection) -> list[Effect]:
        self._has.pop(conn, None)
        return super().leave(conn)

    def group_key(self, conn: Connection) -> GroupKey:
        if len(conn.channels) > 1:
            return (_OWN_FRAMES, conn.fd)
        return group_key(conn)

    def position(self, conn: Connection) -> int | str | None:
        if conn in self._waiting:
            after = self._waiting[conn]
            return after if after is None or type(after) is int else format_position(after)
        marks = self._marks(conn)
        if len(conn.channels) == 1:
            return marks[conn.channels[0]]
        return format_position(marks)

    def _marks(self, conn: Connection) -> dict[str, int]:
        has = self._has.get(conn, {})
        delivered = self.delivered
        return {c: max(delivered.get(c, 0), has.get(c, 0)) for c in conn.channels}

    def shown(self, conn: Connection, after: Any, replay: Replay) -> Replay:
        """The replay with the ids this connection is given: the channel's
        own on one channel; on several, its position after each message."""
        upto = dict(replay.last_id)
        if len(conn.channels) == 1:
            return Replay(replay.messages, replay.gap, upto.get(conn.channels[0], 0))
        marks = {}
        for channel in conn.channels:
            start = after_on(after, channel)
            marks[channel] = upto.get(channel, 0) if start is None else start
        shown = []
        for message in replay.messages:
            marks[message.channel] = message.id
            shown.append(_at(message, format_position(marks)))
        for channel, last in upto.items():
            marks[channel] = max(marks.get(channel, 0), last)
        return Replay(shown, replay.gap, format_position(marks))

    # -- the bus's events -------------------------------------------------------------

    def _confirmed(self, channel: str, live: bool) -> list[Effect]:
        """As :meth:`.Router.confirmed`, one channel at a time: a channel whose
        subscription came back is caught up on its own, while the others go
        on live."""
        effects: list[Effect] = []
        if live and channel in self._held:
            mark = self.delivered.get(channel)
            effects.append(CatchUp((channel,), None if mark is None else ((channel, mark),)))
        channels = self._channels
        ready = [conn for conn in self._waiting
                 if all(channels.get(c) == 0 and (c not in self._held or c == channel)
                        for c in conn.channels)]
        for conn in ready:  # (after the catch-up above: effects run in order)
            effects.append(self._read(conn, self._waiting.pop(conn), None))
        return effects

    def resync(self, channels: tuple[str, ...] | None = None) -> None:
        """``channels`` (None: all) lost their subscription: each awaits its
        confirmation again, its live messages held back until then."""
        for channel in self._channels if channels is None else channels:
            if channel in self._channels:
                self._stale.pop(channel, None)
                self._channels[channel] = 1
                self._held.setdefault(channel, [])

    def went_live(self, channel: str, position: int | None) -> None:
        # The first time only: a confirmation after a reconnection must not
        # move the watermark past what was published while the subscription
        # was down, which the catch-up replays from it. (Recorded at 0 too:
        # a channel without a watermark is not caught up.)
        if position is not None and channel not in self.delivered:
            self.delivered[channel] = position

    def _release(self, channel: str) -> bool:
        released = super()._release(channel)
        if released:  # subscribed again later, it starts from where the bus is then
            self.delivered.pop(channel, None)
            self._held.pop(channel, None)
        return released

    def _ready(self, conn: Connection, after: Any) -> bool:
        if all(self._channels[c] == 0 and c not in self._held for c in conn.channels):
            return True
        self._waiting[conn] = after
        return False

    def caught_up(self, replay: Replay | None,
                  channels: tuple[str, ...] | None = None) -> list[Delivery]:
        held = [m for c in (tuple(self._held) if channels is None else channels)
                for m in self._held.pop(c, ())]
        if replay is None:
            return self.route(held)
        upto = dict(replay.last_id)
        delivered = self.delivered
        missed = [m for m in replay.messages if m.id > delivered.get(m.channel, 0)]
        later = [m for m in held if m.id > upto.get(m.channel, 0)]
        deliveries = self.route(missed + later)
        for channel, last in upto.items():
            if last > delivered.get(channel, 0):
                delivered[channel] = last
        return deliveries

    # -- messages ----------------------------------------------------------------------

    def route(self, batch: list[Message]) -> list[Delivery]:
        """Messages from the bus, each channel's in its id order."""
        if self._held:
            live = []
            for message in batch:
                held = self._held.get(message.channel)
                if held is None:
                    live.append(message)
                else:
                    held.append(message)
            batch = live
        if not batch:
            return []
        delivered, has = self.delivered, self._has
        deliveries: list[Delivery] = []
        gathered: dict[Connection, list[Message]] = {}
        count = 0
        for message in batch:
            channel = message.channel
            if message.id <= delivered.get(channel, 0):
                continue  # the joiners read it with the history
            delivered[channel] = message.id
            count += 1
            groups = self.subscribers.get(channel, {})
            shared = []
            for key, group in groups.items():
                if key[0] != _OWN_FRAMES and not has and len(batch) == 1:
                    shared.append((key, group))
                    continue
                for conn in group.values():
                    if conn.protocol.one_shot and conn in gathered:
                        continue  # its response is the first message; it polls again
                    if has and has.get(conn, {}).get(channel, 0) >= message.id:
                        continue  # it had this one in its history read
                    mine = gathered.get(conn)
                    if mine is None:
                        mine = gathered[conn] = []
                    if key[0] == _OWN_FRAMES:
                        mine.append(_at(message, format_position(self._marks(conn))))
                    else:
                        mine.append(message)
            if shared:
                deliveries.append(FanOut(message, shared))
        if gathered or not deliveries:  # (counted once, by a FanOut or here)
            deliveries.append(Gathered(gathered, 0 if deliveries else count))
        self._forget_covered()
        return deliveries

    def _forget_covered(self) -> None:
        if not self._has:
            return
        delivered = self.delivered
        for conn in list(self._has):
            ahead = {c: i for c, i in self._has[conn].items() if i > delivered.get(c, 0)}
            if ahead:
                self._has[conn] = ahead
            else:
                del self._has[conn]


def _at(message: Message, position: str) -> Message:
    """``message`` with ``position`` as its id: framed for one connection."""
    return Message(position, message.channel, message.data,  # type: ignore[arg-type]
                   message.event, message.time)
