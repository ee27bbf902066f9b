"""The exactly-once channel routing (wsgi_hijack.reactor.routing), from tables.

Like h11's state machine tests: each scenario is a table of steps -- what
happened, and what the router must answer -- run against a fresh
:class:`Router`. No reactor, no bus, no socket: connections are records with
real protocols and made-up fds that nothing touches.
"""

from __future__ import annotations

import pytest

from wsgi_hijack.bus.base import Message, Replay
from wsgi_hijack.connection import Connection
from wsgi_hijack.protocols.longpoll import LongPoll
from wsgi_hijack.protocols.sse import ServerSentEvents
from wsgi_hijack.reactor.routing import (
    UNKNOWN_POSITION,
    CatchUp,
    FanOut,
    Gathered,
    ReadHistory,
    RecordPosition,
    Router,
    Subscribe,
    Unsubscribe,
)

pytestmark = pytest.mark.unit

SSE = ServerSentEvents()
POLL = LongPoll()


def message(id_: int, channel: str = "c") -> Message:
    return Message(id_, channel, f"m{id_}", None, 0.0)


class Table:
    """Runs a scenario's steps and renders the router's answers as tuples."""

    def __init__(self, confirms: bool, delivered_upto: int = 0) -> None:
        self.router = Router(confirms=confirms, delivered_upto=delivered_upto)
        self.conns: dict[str, Connection] = {}
        self.names: dict[int, str] = {}

    def conn(self, name: str, channels: tuple[str, ...] = ("c",), protocol=SSE) -> Connection:
        conn = Connection(100 + len(self.conns), protocol)
        conn.channels = channels
        self.conns[name] = conn
        self.names[id(conn)] = name
        return conn

    def name(self, conn: Connection) -> str:
        return self.names[id(conn)]

    def render(self, answer) -> list[tuple]:
        out = []
        for item in answer:
            kind = type(item)
            if kind is Subscribe:
                out.append(("subscribe", item.channel))
            elif kind is Unsubscribe:
                out.append(("unsubscribe", item.channel))
            elif kind is ReadHistory:
                out.append(("read", self.name(item.conn), item.after, item.upto))
            elif kind is RecordPosition:
                out.append(("position", item.channel))
            elif kind is CatchUp:
                out.append(("catch_up", item.channels, item.after))
            elif kind is FanOut:
                names = sorted(self.name(c) for _, group in item.groups for c in group.values())
                out.append(("fan_out", item.message.id, names))
            elif kind is Gathered:
                out.append(("gathered", {self.name(c): [m.id for m in ms]
                                         for c, ms in item.messages.items()}))
            else:  # pragma: no cover - a new kind of answer needs a rendering here
                raise AssertionError(f"unrendered answer {item!r}")
        return out

    def step(self, action: tuple):
        verb, *args = action
        router = self.router
        if verb == "join":
            name, after, *rest = args
            conn = self.conns.get(name) or self.conn(name, *rest)
            return self.render(router.join(conn, after))
        if verb == "attach":
            name, read_upto = args
            router.attach(self.conns[name], read_upto)
            return None
        if verb == "leave":
            return self.render(router.leave(self.conns[args[0]]))
        if verb == "live":
            return self.render(router.confirmed(args[0]))
        if verb == "position":
            router.went_live(*args)
            return None
        if verb == "resync":
            router.resync()
            return None
        if verb == "route":
            return self.render(router.route([message(i) for i in args[0]]))
        if verb == "caught_up":
            ids, last_id = args
            replay = None if ids is None else Replay([message(i) for i in ids], False, last_id)
            return self.render(router.caught_up(replay))
        if verb == "delivered":
            return router.delivered_upto
        raise AssertionError(f"unknown step {verb}")


def run(table: Table, steps: list[tuple]) -> None:
    for number, (action, expected) in enumerate(steps):
        got = table.step(action)
        assert got == expected, f"step {number} {action}: got {got}, expected {expected}"


# With a bus that confirms: "a" joins "c", the bus confirms, "a" reads the
# history and is attached.
A_IS_LIVE = [
            (("join", "a", None), [("subscribe", "c")]),
            (("live", "c"), [("position", "c"), ("read", "a", None, None)]),
            (("attach", "a", 0), None),
]

# Each scenario: (bus confirms subscriptions?, delivered_upto at start, steps).
# A step is (action, the router's answer); None where the action answers nothing.
SCENARIOS = {
    "one process: join reads up to what was delivered, then takes the live ones": (
        False, 5, [
            (("join", "a", None), [("subscribe", "c"), ("read", "a", None, 5)]),
            (("attach", "a", 5), None),
            (("route", [6]), [("fan_out", 6, ["a"])]),
            (("join", "b", 3), [("read", "b", 3, 6)]),  # the channel is known: no subscribe
            (("attach", "b", 6), None),
            (("route", [7]), [("fan_out", 7, ["a", "b"])]),
            (("leave", "a"), []),
            (("leave", "b"), [("unsubscribe", "c")]),
            (("route", [8]), [("fan_out", 8, [])]),
            (("delivered",), 8),
        ]),
    "nothing delivered yet: the join reads the history to its end": (
        False, 0, [
            (("join", "a", 0), [("subscribe", "c"), ("read", "a", 0, None)]),
        ]),
    "a history read that raced a publish: those ids are skipped when they arrive": (
        False, 5, [
            (("join", "a", 2), [("subscribe", "c"), ("read", "a", 2, 5)]),
            (("attach", "a", 7), None),  # the read saw 6 and 7, still on their way
            (("route", [6]), [("gathered", {})]),
            (("route", [7]), [("gathered", {})]),
            (("route", [8]), [("fan_out", 8, ["a"])]),  # skip forgotten: the fast path again
        ]),
    "several waiting messages: each connection's share in one go": (
        False, 0, [
            (("join", "a", None), [("subscribe", "c"), ("read", "a", None, None)]),
            (("attach", "a", 0), None),
            (("join", "p", None, ("c",), POLL), [("read", "p", None, None)]),
            (("attach", "p", 0), None),
            (("join", "x", None, ("other",)), [("subscribe", "other"),
                                               ("read", "x", None, None)]),
            (("attach", "x", 0), None),
            # The long-poll takes only the first: it polls again for the rest.
            (("route", [1, 2]), [("gathered", {"a": [1, 2], "p": [1]})]),
        ]),
    "a bus that confirms: joiners wait until the channel is live": (
        True, 0, [
            (("join", "a", None), [("subscribe", "c")]),
            (("route", [1]), [("fan_out", 1, [])]),  # published before the confirmation
            (("live", "c"), [("position", "c"), ("read", "a", None, None)]),
            (("position", "c", 1), None),
            (("attach", "a", 1), None),
            (("join", "b", 0), [("read", "b", 0, 1)]),  # up to where the channel went live
            (("attach", "b", 1), None),
            (("route", [2]), [("fan_out", 2, ["a", "b"])]),
            (("join", "c2", 1), [("read", "c2", 1, 2)]),  # live_from forgotten once passed
        ]),
    "a channel confirmed while the bus's position was unknown: read to the end": (
        True, 0, [
            (("join", "a", None), [("subscribe", "c")]),
            (("live", "c"), [("position", "c"), ("read", "a", None, None)]),
            (("position", "c", None), None),
            (("attach", "a", 0), None),
            (("join", "b", 0), [("read", "b", 0, UNKNOWN_POSITION)]),
        ]),
    "a connection on two channels waits for both": (
        True, 0, [
            (("join", "a", None, ("c", "d")), [("subscribe", "c"), ("subscribe", "d")]),
            (("live", "c"), [("position", "c")]),
            (("live", "d"), [("position", "d"), ("read", "a", None, None)]),
        ]),
    "the confirmation of a released subscription is not the next one's": (
        True, 0, [
            (("join", "a", None), [("subscribe", "c")]),
            (("leave", "a"), [("unsubscribe", "c")]),
            (("join", "b", None), [("subscribe", "c")]),
            (("live", "c"), []),  # answers the first subscription, released since
            (("live", "c"), [("position", "c"), ("read", "b", None, None)]),
            (("live", "c"), []),  # a confirmation nobody waits for
        ]),
    "the bus reconnects: live messages held back, what was missed read, then both": (
        True, 0, [
            *A_IS_LIVE,
            (("route", [10]), [("fan_out", 10, ["a"])]),
            (("resync",), None),
            (("route", [12]), []),  # held back: 11 was missed while reconnecting
            (("join", "b", 5), []),  # waits too, until the channel is live again
            (("live", "c"), [("position", "c"), ("catch_up", ("c",), 10),
                             ("read", "b", 5, None)]),
            # The history has 11 and 12; the held-back 12 is not written twice.
            (("caught_up", [11, 12], 12), [("gathered", {"a": [11, 12]})]),
            (("delivered",), 12),
            (("route", [13]), [("fan_out", 13, ["a"])]),
        ]),
    "a reconnect with nothing delivered yet: only the held-back messages": (
        True, 0, [
            *A_IS_LIVE,
            (("resync",), None),
            (("route", [1]), []),
            (("live", "c"), [("position", "c"), ("catch_up", ("c",), None)]),
            (("caught_up", None, None), [("fan_out", 1, ["a"])]),
        ]),
    "a history read that ended after the held-back messages covers them": (
        True, 0, [
            *A_IS_LIVE,
            (("route", [1]), [("fan_out", 1, ["a"])]),
            (("resync",), None),
            (("route", [2]), []),
            (("route", [4]), []),
            (("live", "c"), [("position", "c"), ("catch_up", ("c",), 1)]),
            (("caught_up", [2, 3], 3), [("gathered", {"a": [2, 3, 4]})]),
            (("delivered",), 4),
        ]),
    "a waiting connection that leaves releases the channel": (
        True, 0, [
            (("join", "a", None), [("subscribe", "c")]),
            (("leave", "a"), [("unsubscribe", "c")]),
            (("live", "c"), []),
        ]),
}


# A message queued behind the confirmation that started a catch-up, and read
# by the catch-up's history read, is not routed a second time when its turn comes.
SCENARIOS["a message the catch-up read is not routed again from the queue"] = (True, 0, [
    *A_IS_LIVE,
    (("route", [1]), [("fan_out", 1, ["a"])]),
    (("resync",), None),
    (("live", "c"), [("position", "c"), ("catch_up", ("c",), 1)]),
    (("caught_up", [2, 3], 3), [("gathered", {"a": [2, 3]})]),
    (("route", [3]), []),  # it was on its way while the history was read
    (("route", [4]), [("fan_out", 4, ["a"])]),
])

# A long-poll answered from its history leaves while the other joiner of the
# same new channel is still reading its own: the channel stays subscribed.
SCENARIOS["a long-poll answered at once keeps the channel for the next reader"] = (True, 0, [
    (("join", "p", 0, ("c",), POLL), [("subscribe", "c")]),
    (("join", "s", 0), []),
    (("live", "c"), [("position", "c"), ("read", "p", 0, None), ("read", "s", 0, None)]),
    (("leave", "p"), []),  # answered: it completes
    (("attach", "s", 1), None),
    (("route", [2]), [("gathered", {"s": [2]})]),
    (("leave", "s"), [("unsubscribe", "c")]),
])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_routing_transitions(name):
    confirms, delivered, steps = SCENARIOS[name]
    run(Table(confirms, delivered), steps)


def test_leave_is_one_transition_out_of_every_table():
    """After leave, the connection is in no group, no wait list and no skip."""
    table = Table(confirms=True)
    table.step(("join", "a", None))
    table.step(("live", "c"))
    table.step(("attach", "a", 3))
    table.step(("join", "w", None, ("d",)))  # waiting for d
    router = table.router
    assert router.subscriber_count("c") == 1 and list(router.waiting()) == [table.conns["w"]]
    assert table.step(("leave", "a")) == [("unsubscribe", "c")]
    assert table.step(("leave", "w")) == [("unsubscribe", "d")]
    assert router.subscribers == {} and list(router.waiting()) == []
    assert router._skip == {} and router._channels == {}
