"""Published messages on their way to held connections.

The bus hands messages and events to :meth:`Messages.dispatch` from any
thread; the reactor's loop takes them in order (:meth:`Messages._deliver`),
asks the router (:mod:`.routing`) who gets what, and writes: one frame per
group through the fan-out, or each connection's share of several messages in
one write. What the router asks of the bus (subscribe, read the history) is
done here, in :meth:`Messages._apply`.

A part of :class:`~wsgi_hijack.reactor.core.Reactor` (a mixin): its
connections' writes and closes are the reactor's own.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from ..bus.base import Bus, Event, Live, Message, Replay
from ..bus.positions import format_position
from ..connection import Connection
from ..protocols.base import framed
from . import fanout
from .routing import (
    CatchUp,
    Delivery,
    Effect,
    FanOut,
    ReadHistory,
    RecordPosition,
    Router,
    Subscribe,
    Unsubscribe,
)


class Messages:
    """Routing and writing published messages; mixed into the Reactor."""

    # What this part uses of the reactor.
    bus: Bus | None
    router: Router
    _outbox: deque[Message | Event]
    _running: bool
    _async: Any
    _counts: dict[str, Any]
    _armed: set[int]
    _senders: list[fanout.Sender]

    if TYPE_CHECKING:
        def _write(self, conn: Connection, data: bytes) -> None: ...
        def _catch_up(self, conn: Connection, frames: list[bytes]) -> None: ...
        def _finish(self, conn: Connection) -> None: ...

    def _apply(self, effects: list[Effect]) -> None:
        """Do what the router asks of the bus and the connections, in order."""
        bus = self.bus
        # Connections that join together from one position on the same
        # channels (all those a predecessor worker handed over, once their
        # channels are live) share one history read. Reused within this call
        # only: what is published meanwhile waits in the outbox and reaches
        # them live once they are attached.
        replays: dict[tuple, Replay] = {}
        for effect in effects:
            kind = type(effect)
            if kind is ReadHistory:
                conn = effect.conn
                if conn.fd >= 0 and not conn.closing:
                    after = effect.after
                    key = (conn.channels, after if type(after) is not dict
                           else tuple(after.items()), effect.upto)
                    replay = replays.get(key)
                    if replay is None:
                        replay = replays[key] = bus.replay(conn.channels, after, effect.upto)
                    if replay.failed:
                        self._send_back(conn, after)
                    else:
                        self._join(conn, replay, after)
            elif kind is Subscribe:
                bus.subscribe(effect.channel)
            elif kind is Unsubscribe:
                bus.unsubscribe(effect.channel)
            elif kind is RecordPosition:
                try:
                    position = bus.last_id(effect.channel)
                except Exception:
                    position = None
                self.router.went_live(effect.channel, position)
            elif kind is CatchUp:
                replay = bus.replay(effect.channels, effect.after) if effect.after else None
                if replay is not None and replay.failed:
                    # What was missed cannot be read: rather than go on past it,
                    # its subscribers reconnect, each from its own position.
                    for channel in effect.channels:
                        for group in list(self.router.subscribers.get(channel, {}).values()):
                            for conn in list(group.values()):
                                self._send_back(conn, self.router.position(conn))
                    replay = None
                self._send_out(self.router.caught_up(replay, effect.channels))

    def _send_back(self, conn: Connection, position: Any) -> None:
        """``conn``'s history could not be read: its goodbye (a long-poll, its
        empty answer at ``position``), so that it reconnects from where it is
        and nothing is skipped."""
        if conn.fd < 0 or conn.closing:
            return
        protocol = conn.protocol
        if type(position) is dict:
            position = format_position(position)
        self._write(conn, protocol.timeout(position) if protocol.one_shot else protocol.goodbye)
        self._finish(conn)

    def _join(self, conn: Connection, replay: Replay, after: Any = None) -> None:
        """Write what ``conn`` missed (after ``after``, its position), then let
        it take what is published."""
        if conn.fd < 0 or conn.closing:  # its goodbye is out (or on its way): nothing after it
            return
        opening = conn.protocol.opening_frames(self.router.shown(conn, after, replay))
        if opening:
            self._catch_up(conn, opening)  # as the socket drains: never cut for its size
            if conn.protocol.one_shot:
                self._finish(conn)
                return
        if conn.fd >= 0:
            self.router.attach(conn, replay.last_id, after)

    # -- published messages -----------------------------------------------------

    def dispatch(self, item: Message | Event) -> None:
        """Queue a published message, or a bus event, for delivery in order;
        thread-safe. This is what the bus is handed at start."""
        if self._running:
            self._outbox.append(item)
            self._async.send()

    def subscriber_count(self, channel: str) -> int:
        return self.router.subscriber_count(channel)

    def _deliver(self) -> None:
        outbox = self._outbox
        if not outbox:
            return
        batch: list[Message] = []
        while outbox:
            item = outbox.popleft()
            if type(item) is Message:
                batch.append(item)
                continue
            # A bus event: deliver what came before it first.
            self._send_out(self.router.route(batch))
            batch = []
            if type(item) is Live:
                self._apply(self.router.confirmed(item.channel))
            else:
                self.router.resync(item.channels)
        self._send_out(self.router.route(batch))

    def _send_out(self, deliveries: list[Delivery]) -> None:
        counts = self._counts
        for delivery in deliveries:
            if type(delivery) is FanOut:
                # One frame per group, written to the group as a heartbeat is:
                # no per-subscriber Python beyond a builtin call.
                message = delivery.message
                for (framer, one_shot), group in delivery.groups:
                    data = framed(framer, message)
                    if one_shot:  # each one completes and closes: the slow path
                        for conn in list(group.values()):
                            self._write_message(conn, data)
                    else:
                        counts["deliveries"] += len(group)
                        fanout.fan_out(data, group, self._armed, self._senders, self._write)
                counts["messages"] += 1
            else:  # each connection's messages in one write
                for conn, messages in delivery.messages.items():
                    frames = [framed(conn.protocol, m) for m in messages]
                    self._write_message(conn, frames[0] if len(frames) == 1
                                        else b"".join(frames))
                counts["messages"] += delivery.count

    def _write_message(self, conn: Connection, data: bytes) -> None:
        if conn.fd < 0 or conn.closing:
            return
        self._counts["deliveries"] += 1
        self._write(conn, data)
        if conn.protocol.one_shot:
            self._finish(conn)

    def _deadline(self, conn: Connection) -> None:
        """A one-shot's deadline: its timeout answer, unless it was answered."""
        if conn.fd >= 0 and not conn.closing:
            self._write(conn, conn.protocol.timeout(self.router.position(conn)))
            self._finish(conn)
