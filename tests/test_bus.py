"""The bus's interface: both buses are a Bus, dispatch in id order, count safely."""

from __future__ import annotations

import itertools
import threading

import pytest

from wsgi_hijack.bus import Bus, Counters, InProcessBus, Live, Message, Resync
from wsgi_hijack.redis_bus import RedisBus

pytestmark = pytest.mark.unit


def test_both_buses_are_a_bus():
    memory = InProcessBus()
    redis = RedisBus("redis://127.0.0.1:1/0")  # connects lazily: nothing is opened here
    assert isinstance(memory, Bus) and isinstance(redis, Bus)
    assert memory.confirms_subscriptions is False and redis.confirms_subscriptions is True
    assert memory.counters() == redis.counters() == {"published": 0, "bus_errors": 0}


def test_events_are_typed_values():
    assert Live("c") == Live("c") and Live("c") != Live("d")
    assert Resync() == Resync() and not isinstance(Resync(), Message)


def test_publishes_from_many_threads_are_dispatched_in_id_order_and_counted():
    bus = InProcessBus()
    got: list[int] = []
    bus.start(lambda message: got.append(message.id))
    threads = [threading.Thread(target=lambda: [bus.publish("c", "x") for _ in range(500)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4000 and got == sorted(set(got))  # increasing, none twice
    assert bus.counters()["published"] == 4000
    bus.close()
    late = bus.publish("c", "after close")  # kept in the history, dispatched to nobody
    assert len(got) == 4000 and bus.last_id() == late > got[-1]


def test_counters_are_exact_across_threads():
    counters = Counters()
    threads = [threading.Thread(target=lambda: [counters.add("bus_errors") for _ in range(5000)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.snapshot() == {"published": 0, "bus_errors": 40000}


def test_in_process_ids_are_floored_by_the_clock():
    """Each id is at least the clock in microseconds, and strictly increasing
    even when the clock stands still or steps back."""
    now = [5_000_000]
    bus = InProcessBus(clock=lambda: now[0])
    assert bus.last_id() == 5_000_000  # before the first publish: the floor
    first = bus.publish("c", "a")
    now[0] = 7_000_000
    second = bus.publish("c", "b")
    now[0] = 1  # the clock stepped back: ids still go on
    third = bus.publish("c", "c")
    assert (first, second, third) == (5_000_001, 7_000_000, 7_000_001)


def test_a_new_bus_hands_out_ids_above_every_id_of_a_lost_one():
    """A lost bus (its worker killed) and the one made after it: a client
    coming back with the last id it had gets the new bus's messages, with no
    gap, and nothing of them is below its id."""
    ticks = itertools.count(1_000_000)  # a clock that moves a microsecond a look
    lost = InProcessBus(clock=ticks.__next__)
    seen = [lost.publish("news", f"m{i}") for i in range(50)]
    new = InProcessBus(clock=ticks.__next__)
    assert new.last_id() >= seen[-1]
    replay = new.replay(["news"], seen[-1])
    assert replay.messages == [] and not replay.gap and replay.last_id >= seen[-1]
    after = new.publish("news", "new")
    assert after > seen[-1]
    replay = new.replay(["news"], seen[-1])
    assert [m.data for m in replay.messages] == ["new"] and not replay.gap


def test_a_handed_over_bus_goes_on_above_its_predecessor():
    old = InProcessBus()
    ids = [old.publish("c", str(i)) for i in range(3)]
    new = InProcessBus(clock=lambda: 0)  # even with a clock far behind
    new.restore(old.hand_over())
    assert new.publish("c", "next") == ids[-1] + 1
    assert [m.data for m in new.replay(["c"], ids[0]).messages] == ["1", "2", "next"]


def test_after_a_lost_bus_a_gap_is_reported_only_for_what_the_new_one_let_go():
    ticks = itertools.count(1_000_000)
    old = InProcessBus(clock=ticks.__next__).publish("news", "seen")
    new = InProcessBus(history_size=2, clock=ticks.__next__)
    ids = [new.publish("news", f"m{i}") for i in range(3)]
    replay = new.replay(["news"], old)
    assert replay.gap and [m.id for m in replay.messages] == ids[1:]  # m0 is gone
    assert not new.replay(["news"], ids[0]).gap
