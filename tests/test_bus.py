"""The bus's interface: both buses are a Bus, dispatch in id order, count safely."""

from __future__ import annotations

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
    assert got == list(range(1, 4001))
    assert bus.counters()["published"] == 4000
    bus.close()
    bus.publish("c", "after close")  # kept in the history, dispatched to nobody
    assert len(got) == 4000 and bus.last_id() == 4001


def test_counters_are_exact_across_threads():
    counters = Counters()
    threads = [threading.Thread(target=lambda: [counters.add("bus_errors") for _ in range(5000)])
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counters.snapshot() == {"published": 0, "bus_errors": 40000}
