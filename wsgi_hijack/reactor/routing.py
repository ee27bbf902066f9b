"""Exactly-once routing of published messages to held connections, sans-IO.

A connection that joins its channels must get every message after its last
id exactly once: first what it missed (from the bus's history), then what is
published live. The two overlap, and with a bus across processes a channel
is live only once the bus confirms the subscription, and may stop being
live when the bus reconnects. :class:`Router` keeps that bookkeeping and
nothing else: it is told what happened (a connection joins or leaves, the
bus confirms a channel or reconnects, messages arrive, a history read came
back) and answers with what to do (:data:`Effect`, :data:`Delivery`). It
never calls the bus, never writes, never reads a clock: the reactor does the
I/O, which keeps this logic testable from tables of transitions
(``tests/test_routing.py``).

The rules:

- **Replay up to what was delivered, then subscribe.** A joining connection
  reads the history up to :attr:`Router.delivered_upto`; messages after it
  are still on their way to :meth:`Router.route`, which reaches the
  connection once it is attached. A history read that went further than what
  was delivered (it raced a publish) is remembered per connection, and those
  ids are skipped when they arrive live.
- **A channel not yet live at the bus** (subscription not confirmed) makes
  its joiners wait. When every channel is confirmed, each waiting connection
  reads the whole history after its id, since messages published before the
  confirmation never arrive live. A channel confirmed recently is recorded
  with the bus's position at that moment, so joiners read up to there.
- **After the bus reconnects** (:class:`~wsgi_hijack.bus.Resync`), live
  messages are held back until every channel is confirmed again; then what
  was missed is read from the history after :attr:`delivered_upto`, routed,
  and the held messages after it follow.
- **Confirmations of subscriptions already released** are counted and
  ignored, so that a late confirmation is not taken for the next
  subscription to the same channel.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..bus.base import Message, Replay
from ..connection import Connection

#: The position recorded for a channel confirmed while the bus's own
#: position could not be read: joiners then read the history to its end.
UNKNOWN_POSITION = 1 << 62

# The key of a subscriber group: (framer, one_shot). See group_key().
GroupKey = tuple[Any, bool]
Groups = dict[GroupKey, dict[int, Connection]]


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe ``channel`` at the bus."""

    channel: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Unsubscribe ``channel`` at the bus: no connection here needs it."""

    channel: str


@dataclass(frozen=True, slots=True)
class ReadHistory:
    """Read ``conn``'s channels after ``after`` up to ``upto`` (None: to the end),
    write its opening, then :meth:`Router.attach` it (if it is still open)."""

    conn: Connection
    after: int | None
    upto: int | None


@dataclass(frozen=True, slots=True)
class RecordPosition:
    """Give :meth:`Router.went_live` the bus's last id for ``channel``."""

    channel: str


@dataclass(frozen=True, slots=True)
class CatchUp:
    """Read ``channels`` after ``after`` (None: nothing to read) and hand the
    result to :meth:`Router.caught_up`."""

    channels: tuple[str, ...]
    after: int | None


Effect = Subscribe | Unsubscribe | ReadHistory | RecordPosition | CatchUp


@dataclass(slots=True)
class FanOut:
    """One message to every subscriber of its channel: one frame per group."""

    message: Message
    groups: list[tuple[GroupKey, dict[int, Connection]]]


@dataclass(slots=True)
class Gathered:
    """Several messages: each connection's share, to be written in one go."""

    messages: dict[Connection, list[Message]]
    count: int


Delivery = FanOut | Gathered


def group_key(conn: Connection) -> GroupKey:
    """Where a subscriber is grouped: by the framer that makes its frames and
    by whether its own protocol is one-shot (a framer may be shared by both)."""
    protocol = conn.protocol
    return protocol.framer, bool(protocol.one_shot)


class Router:
    """Who gets which published message; see the module docstring."""

    def __init__(self, confirms: bool = False, delivered_upto: int = 0) -> None:
        #: The bus confirms subscriptions later (a :class:`~wsgi_hijack.bus.Live` each).
        self.confirms = confirms
        #: Id of the last message routed to subscribers.
        self.delivered_upto = delivered_upto
        #: channel -> group key -> fd -> Connection: the attached subscribers,
        #: grouped so that one frame serves each group, written by one loop
        #: as a heartbeat is (benchmarks/results/sse_latency.md).
        self.subscribers: dict[str, Groups] = {}
        # channel -> confirmations still awaited from the bus (0: live)
        self._channels: dict[str, int] = {}
        # channel -> confirmations still to come for subscriptions released
        self._stale: dict[str, int] = {}
        # while the bus resynchronises: live messages held back, else None
        self._held_back: list[Message] | None = None
        # connections waiting for their channels to be live -> their last id
        self._waiting: dict[Connection, int | None] = {}
        # connections reading their history, attached next
        self._reading: set[Connection] = set()
        # connection -> id up to which its history read covered live messages
        self._skip: dict[Connection, int] = {}
        # channel -> the bus's last id when its subscription went live
        self._live_from: dict[str, int] = {}

    # -- connections --------------------------------------------------------------

    def join(self, conn: Connection, after: int | None) -> list[Effect]:
        """``conn`` wants its channels' messages after ``after`` (None: none missed)."""
        effects = self._subscribe(conn)
        if not self._ready(conn, after):
            return effects
        upto = self.delivered_upto
        if self._live_from:
            upto = max(upto, *(self._live_from.get(c, 0) for c in conn.channels))
        # (0: nothing delivered yet and the bus's position unknown: read it all.)
        effects.append(self._read(conn, after, upto or None))
        return effects

    def _subscribe(self, conn: Connection) -> list[Effect]:
        """Subscribe the channels of ``conn`` that nobody here has yet."""
        effects: list[Effect] = []
        for channel in conn.channels:
            if channel not in self._channels:
                self._channels[channel] = 1 if self.confirms else 0
                effects.append(Subscribe(channel))
        return effects

    def _ready(self, conn: Connection, after: Any) -> bool:
        """True if ``conn``'s channels are all live and nothing is held back;
        else it waits, and reads its history once they are."""
        if self._held_back is None and all(self._channels[c] == 0 for c in conn.channels):
            return True
        self._waiting[conn] = after
        return False

    def _read(self, conn: Connection, after: Any, upto: Any) -> ReadHistory:
        """``conn`` reads its history and is attached next: until then it
        still holds its channels (a long-poll answered from its own history
        just before must not release them)."""
        self._reading.add(conn)
        return ReadHistory(conn, after, upto)

    def attach(self, conn: Connection, read_upto: int, after: Any = None) -> None:
        """``conn`` has its history up to ``read_upto``, and had everything up
        to ``after`` before it came: route it what follows."""
        self._reading.discard(conn)
        has = read_upto if after is None else max(read_upto, after)
        if has > self.delivered_upto:
            # The read (or the client, served by a faster worker before it
            # came here) went past what was routed: those messages are still
            # on their way, and this connection already has them.
            self._skip[conn] = has
        self._add(conn)

    def _add(self, conn: Connection) -> None:
        key = self.group_key(conn)
        for channel in conn.channels:
            groups = self.subscribers.get(channel)
            if groups is None:
                groups = self.subscribers[channel] = {}
            group = groups.get(key)
            if group is None:
                group = groups[key] = {}
            group[conn.fd] = conn

    def leave(self, conn: Connection) -> list[Effect]:
        """``conn`` takes no more messages (complete, or gone)."""
        self._waiting.pop(conn, None)
        self._reading.discard(conn)
        self._skip.pop(conn, None)
        key = self.group_key(conn)
        effects: list[Effect] = []
        for channel in conn.channels:
            groups = self.subscribers.get(channel)
            if groups is not None:
                group = groups.get(key)
                if group is not None and group.get(conn.fd) is conn:
                    del group[conn.fd]
                    if not group:
                        del groups[key]
                        if not groups:
                            del self.subscribers[channel]
            if self._release(channel):
                effects.append(Unsubscribe(channel))
        return effects

    def _release(self, channel: str) -> bool:
        """Forget ``channel`` once no connection here needs it; True if it was
        subscribed at the bus."""
        if channel in self.subscribers or channel not in self._channels:
            return False
        if any(channel in conn.channels for conn in (*self._waiting, *self._reading)):
            return False
        awaited = self._channels.pop(channel)
        if awaited:
            self._stale[channel] = self._stale.get(channel, 0) + awaited
        return True

    def position(self, conn: Connection) -> int:
        """The id up to which ``conn`` has had its channels' messages: where it
        carries on after a move. A waiting connection that asked for nothing
        missed carries on from what was delivered here."""
        waiting = self._waiting.get(conn)
        if waiting is not None:
            return waiting
        return max(self.delivered_upto, self._skip.get(conn, 0))

    def group_key(self, conn: Connection) -> GroupKey:
        return group_key(conn)

    def shown(self, conn: Connection, after: Any, replay: Replay) -> Replay:
        """The replay as ``conn``'s protocol writes it: as read, here."""
        return replay

    def subscriber_count(self, channel: str) -> int:
        return sum(map(len, self.subscribers.get(channel, {}).values()))

    # -- the bus's events -----------------------------------------------------------

    def confirmed(self, channel: str) -> list[Effect]:
        """The bus confirmed a subscription to ``channel`` (a Live event)."""
        awaited = self._confirm(channel)
        if not awaited:
            return []
        effects: list[Effect] = [RecordPosition(channel)] if awaited == 1 else []
        return effects + self._confirmed(channel, awaited == 1)

    def _confirmed(self, channel: str, live: bool) -> list[Effect]:
        """What follows a counted confirmation (``live``: the channel's last awaited)."""
        effects: list[Effect] = []
        if any(self._channels.values()):
            return effects
        if self._held_back is not None:
            effects.append(CatchUp(tuple(self.subscribers), self.delivered_upto or None))
        ready = [conn for conn in self._waiting
                 if all(self._channels.get(c) == 0 for c in conn.channels)]
        for conn in ready:
            # Read everything stored so far: messages published before the
            # subscription was live are only there.
            effects.append(self._read(conn, self._waiting.pop(conn), None))
        return effects

    def _confirm(self, channel: str) -> int:
        """Count a confirmation of ``channel``; returns how many were awaited
        before it (0: none, it is for a subscription released since)."""
        stale = self._stale.get(channel, 0)
        if stale:  # for a subscription released since: not this one
            if stale == 1:
                del self._stale[channel]
            else:
                self._stale[channel] = stale - 1
            return 0
        awaited = self._channels.get(channel)
        if not awaited:
            return 0
        self._channels[channel] = awaited - 1
        return awaited

    def went_live(self, channel: str, position: int | None) -> None:
        """The bus's last id when ``channel`` went live (None: unknown)."""
        self._live_from[channel] = UNKNOWN_POSITION if position is None else position

    def resync(self, channels: tuple[str, ...] | None = None) -> None:
        """The bus reconnected (a Resync event): every channel awaits a new
        confirmation, and live messages are held back until then."""
        self._stale.clear()
        for channel in self._channels:
            self._channels[channel] = 1
        if self._channels and self._held_back is None:
            self._held_back = []

    def caught_up(self, replay: Replay | None,
                  channels: tuple[str, ...] | None = None) -> list[Delivery]:
        """The history read of a :class:`CatchUp` (None when there was nothing
        to read after): route what was missed, then the held-back messages."""
        held, self._held_back = self._held_back or [], None
        if replay is None:
            return self.route(held)
        missed = [m for m in replay.messages if m.id > self.delivered_upto]
        deliveries = self.route(missed + [m for m in held if m.id > replay.last_id])
        self.delivered_upto = max(self.delivered_upto, replay.last_id)
        return deliveries

    # -- messages ----------------------------------------------------------------------

    def route(self, batch: list[Message]) -> list[Delivery]:
        """Messages arrived from the bus, in id order: who gets which."""
        if not batch:
            return []
        if self._held_back is not None:
            self._held_back.extend(batch)
            return []
        if batch[0].id <= self.delivered_upto:
            # A catch-up's history read ran while these were on their way
            # (queued behind the confirmation that started it): it had them.
            batch = [m for m in batch if m.id > self.delivered_upto]
            if not batch:
                return []
        skip = self._skip
        if len(batch) == 1 and not skip:
            # The common case: one message, one frame per group, written to
            # each group as a heartbeat is.
            message = batch[0]
            deliveries: list[Delivery] = [
                FanOut(message, list(self.subscribers.get(message.channel, {}).items()))]
            self.delivered_upto = message.id
        else:
            gathered: dict[Connection, list[Message]] = {}
            for message in batch:
                for group in self.subscribers.get(message.channel, {}).values():
                    for conn in group.values():
                        if conn.protocol.one_shot and conn in gathered:
                            continue  # its response is the first message; it polls again
                        if skip and skip.get(conn, 0) >= message.id:
                            continue  # it had this one in its history read
                        mine = gathered.get(conn)
                        if mine is None:
                            mine = gathered[conn] = []
                        mine.append(message)
                self.delivered_upto = message.id
            deliveries = [Gathered(gathered, len(batch))]
        self._forget_covered()
        return deliveries

    def _forget_covered(self) -> None:
        upto = self.delivered_upto
        if self._skip:
            for conn in [c for c, last in self._skip.items() if last <= upto]:
                del self._skip[conn]
        if self._live_from:
            for channel in [c for c, last in self._live_from.items() if last <= upto]:
                del self._live_from[channel]

    def waiting(self) -> Iterable[Connection]:
        """Connections waiting for their channels to be live."""
        return tuple(self._waiting)
