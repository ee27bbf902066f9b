"""Parts of the reactor, in-process: its one timer heap, a connection's states."""

from __future__ import annotations

import pytest

from wsgi_hijack.reactor.timers import Timers

pytestmark = pytest.mark.unit


def test_due_entries_come_out_earliest_first_and_equal_times_in_order():
    timers, seen = Timers(), []
    for when, name in [(3.0, "c"), (1.0, "a"), (2.0, "b1"), (2.0, "b2"), (9.0, "later")]:
        timers.at(when, seen.append, name)
    assert timers.next_at() == 1.0
    for callback, argument in timers.due(2.5):
        callback(argument)
    assert seen == ["a", "b1", "b2"]
    assert timers.next_at() == 3.0 and len(timers) == 2
    assert timers.due(2.9) == []


def test_callbacks_are_never_compared():
    timers = Timers()
    timers.at(1.0, lambda _: None, object())
    timers.at(1.0, lambda _: None, object())  # same time, incomparable arguments
    assert len(timers.due(1.0)) == 2 and timers.next_at() is None


def test_a_connection_goes_forward_through_its_states():
    from wsgi_hijack.connection import Connection, State
    from wsgi_hijack.protocols.plain import PlainStream

    conn = Connection(-1, PlainStream(b"x\n"))
    assert conn.state is State.HANDED_OVER and not conn.closing and not conn.closed
    conn.state = State.CLOSING
    assert conn.closing and not conn.closed
    conn.state = State.CLOSED
    assert conn.closed and not conn.closing and "closed" in repr(conn)
    assert list(State) == sorted(State)  # the order is the life's order
