"""Exactly-once routing when each channel counts its own ids
(wsgi_hijack.reactor.channel_routing), against a model of a cluster bus.

Hypothesis plays a bus whose channels live on different shards: publishes,
each shard's messages reaching the router in its own order and interleaved
in any way with the others', subscriptions confirmed late, reconnections
(of one shard, or all) that lose what was in flight, and clients joining
from positions. After it
all drains, each client has, on each channel, every message after its
position, once, in order; and its position is each channel's last id.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgi_hijack.bus.base import Message, Replay
from wsgi_hijack.bus.positions import after_on, format_position, parse_position
from wsgi_hijack.connection import Connection
from wsgi_hijack.protocols.longpoll import LongPoll
from wsgi_hijack.protocols.sse import ServerSentEvents
from wsgi_hijack.reactor.channel_routing import PerChannelRouter
from wsgi_hijack.reactor.routing import (
    CatchUp,
    FanOut,
    Gathered,
    ReadHistory,
    RecordPosition,
    Subscribe,
    Unsubscribe,
)

pytestmark = pytest.mark.unit

CHANNELS = ("a", "b", "c")
SHARDS = {"a": 0, "b": 1, "c": 0}  # the shard each channel lives on


class ClusterModel:
    """The bus side: histories, what is in flight per channel, subscriptions."""

    def __init__(self) -> None:
        self.router = PerChannelRouter(confirms=True)
        self.clock = 0
        self.history: dict[str, list[int]] = {c: [] for c in CHANNELS}
        self.in_flight: dict[str, list[int]] = {c: [] for c in CHANNELS}
        self.subscribed: set[str] = set()  # live at the bus
        self.pending: set[str] = set()  # asked, confirmation to come
        self.received: dict[Connection, list[tuple[str, int]]] = {}
        self.start: dict[Connection, dict[str, int | None]] = {}

    # the bus
    def publish(self, channel: str) -> None:
        # Each channel counts its own ids, all above the one clock: a
        # channel's ids increase, with gaps, and never go back.
        self.clock += 1
        self.history[channel].append(self.clock)
        if channel in self.subscribed:
            self.in_flight[channel].append(self.history[channel][-1])

    def dispatch(self, channel: str) -> None:
        if self.in_flight[channel]:
            message_id = self.in_flight[channel].pop(0)
            self.deliver(self.router.route([Message(message_id, channel, "x", None, 0.0)]))

    def confirm(self, channel: str) -> None:
        if channel in self.pending:
            self.pending.discard(channel)
            self.subscribed.add(channel)
            self.apply(self.router.confirmed(channel))

    def reconnect(self, shard: int | None = None) -> None:
        """The bus lost its subscriptions (on one shard, or all): what was
        in flight there is gone."""
        lost = {c for c in self.subscribed if shard is None or SHARDS[c] == shard}
        for channel in lost:
            self.in_flight[channel].clear()
        self.pending |= lost
        self.subscribed -= lost
        self.router.resync(None if shard is None else tuple(sorted(lost)))

    def replay(self, channels, after, upto) -> Replay:
        bound = dict(upto or ())
        if type(after) is tuple:
            after = dict(after)
        found, last = [], {}
        for channel in channels:
            top = self.history[channel][-1] if self.history[channel] else 0
            last[channel] = upper = min(bound.get(channel, top), top)
            start = after_on(after, channel)
            if start is not None:
                found += [Message(i, channel, "x", None, 0.0) for i in self.history[channel]
                          if start < i <= upper]
        return Replay(found, False, last)

    # the reactor's side (Messages._apply and _send_out, without I/O)
    def apply(self, effects) -> None:
        for effect in effects:
            kind = type(effect)
            if kind is Subscribe:
                self.pending.add(effect.channel)
            elif kind is Unsubscribe:
                self.subscribed.discard(effect.channel)
                self.pending.discard(effect.channel)
                self.in_flight[effect.channel].clear()
            elif kind is RecordPosition:
                history = self.history[effect.channel]
                self.router.went_live(effect.channel, history[-1] if history else 0)
            elif kind is ReadHistory:
                replay = self.replay(effect.conn.channels, effect.after, effect.upto)
                shown = self.router.shown(effect.conn, effect.after, replay)
                self.take(effect.conn, shown.messages)
                if effect.conn.protocol.one_shot and shown.messages:
                    self.apply(self.router.leave(effect.conn))  # answered at once
                else:
                    self.router.attach(effect.conn, replay.last_id, effect.after)
            elif kind is CatchUp:
                replay = self.replay(effect.channels, effect.after, None) if effect.after \
                    else None
                self.deliver(self.router.caught_up(replay, effect.channels))

    def deliver(self, deliveries) -> None:
        answered = []
        for delivery in deliveries:
            if type(delivery) is FanOut:
                for _, group in delivery.groups:
                    for conn in list(group.values()):
                        self.take(conn, [delivery.message])
                        answered.append(conn)
            else:
                assert type(delivery) is Gathered
                for conn, messages in delivery.messages.items():
                    self.take(conn, messages)
                    answered.append(conn)
        for conn in answered:  # a long-poll's answer completes it (Reactor._finish)
            if conn.protocol.one_shot:
                self.apply(self.router.leave(conn))

    def take(self, conn: Connection, messages: list[Message]) -> None:
        for message in messages:
            message_id = message.id
            if type(message_id) is str:  # a connection on several channels: its position
                marks = parse_position(message_id)
                assert set(marks) == set(conn.channels)
                message_id = marks[message.channel]
            self.received[conn].append((message.channel, message_id))

    def join(self, conn: Connection, after) -> None:
        self.received[conn] = []
        self.start[conn] = {c: after_on(after, c) for c in conn.channels}
        self.apply(self.router.join(conn, after))


operations = st.lists(st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(CHANNELS)),
    st.tuples(st.just("dispatch"), st.sampled_from(CHANNELS)),
    st.tuples(st.just("confirm"), st.sampled_from(CHANNELS)),
    st.tuples(st.just("reconnect"), st.none() | st.sampled_from([0, 1])),
    st.tuples(st.just("join"), st.lists(st.sampled_from(CHANNELS), min_size=1, max_size=3,
                                        unique=True),
              st.one_of(st.none(), st.integers(0, 12),
                        st.dictionaries(st.sampled_from(CHANNELS), st.integers(0, 12))),
              st.booleans()),
), max_size=60)


@settings(max_examples=400, deadline=None)
@given(operations)
def test_every_client_gets_each_channel_once_in_order(ops):
    model = ClusterModel()
    conns: list[Connection] = []
    for op in ops:
        verb = op[0]
        if verb == "join":
            _, channels, after, poll = op
            conn = Connection(100 + len(conns), LongPoll() if poll else ServerSentEvents())
            conn.channels = tuple(channels)
            conns.append(conn)
            # A position the client was given: at most the clock (a hostile
            # one from the future gets a gap, tested against a real cluster).
            if type(after) is int:
                after = min(after, model.clock)
            elif after is not None:
                after = {c: min(i, model.clock) for c, i in after.items()}
            model.join(conn, after)
        elif verb == "reconnect":
            model.reconnect(op[1])
        else:
            getattr(model, verb)(op[1])
    # Drain: every subscription confirmed, everything in flight routed.
    for channel in CHANNELS:
        model.confirm(channel)
    for channel in CHANNELS:
        while model.in_flight[channel]:
            model.dispatch(channel)
    for conn in conns:
        got = model.received[conn]
        assert len(got) == len(set(got)), f"{conn.channels}: twice: {got}"
        for channel in conn.channels:
            mine = [i for c, i in got if c == channel]
            assert mine == sorted(mine), f"{channel} out of order: {mine}"
            start = model.start[conn][channel]
            history = model.history[channel]
            if conn.protocol.one_shot:  # a long-poll answers once: a run of the history
                wanted = [i for i in history if start is None or i > start]
                first = wanted.index(mine[0]) if mine else 0
                assert mine == wanted[first:first + len(mine)]
                assert start is None or first == 0  # from a position: from right after it
            elif start is not None:
                assert mine == [i for i in history if i > start], (channel, start)
            else:  # from now: an unbroken tail of the history
                assert mine == history[len(history) - len(mine):]
        if not conn.protocol.one_shot:
            position = model.router.position(conn)
            marks = {conn.channels[0]: position} if len(conn.channels) == 1 \
                else parse_position(position)
            for channel in conn.channels:
                history = model.history[channel]
                assert marks[channel] >= (history[-1] if history else 0)


def test_a_position_names_each_channel_in_order():
    assert format_position({"tick": 5, "news": 7}) == "news=7,tick=5"
    assert parse_position("news=7,tick=5") == {"news": 7, "tick": 5}
    assert parse_position("42") == 42
    assert after_on(42, "x") == 42 and after_on({"a": 1}, "b") is None
    for bad in ("a=1,a=2", "a", "=1", "a=-1", "a=1;b=2", "a b=1", "a=" + "9" * 20):
        with pytest.raises(ValueError):
            parse_position(bad)
