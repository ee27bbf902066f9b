"""The reactor's cross-thread entry, in-process: work handed to a hub's
thread runs there, in order, and a caller never hangs with a stuck hub."""

from __future__ import annotations

import threading
import time

import gevent
import pytest

from wsgi_hijack.reactor.entry import HubEntry

pytestmark = pytest.mark.unit


@pytest.fixture
def hub_thread():
    """A thread whose gevent hub runs until told to stop; yields its HubEntry."""
    ready, stop = threading.Event(), threading.Event()
    box: list[HubEntry] = []

    def run() -> None:
        box.append(HubEntry(gevent.get_hub()))
        ready.set()
        while not stop.is_set():
            gevent.sleep(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    yield box[0], thread
    stop.set()
    thread.join(5)


def test_work_runs_in_the_hub_thread_in_order(hub_thread):
    entry, thread = hub_thread
    assert not entry.in_hub()
    seen: list[int] = []
    for i in range(5):
        entry.call_soon_threadsafe(seen.append, i)
    where = entry.call_and_wait(lambda: (threading.get_ident(), list(seen)), 5.0, None)
    assert where == (thread.ident, [0, 1, 2, 3, 4])


def test_in_the_hub_thread_it_runs_at_once():
    entry = HubEntry(gevent.get_hub())
    assert entry.in_hub()
    assert entry.call_and_wait(lambda: 42, 0.0, None) == 42


def test_a_stuck_hub_gives_the_default_after_the_timeout(hub_thread):
    entry, _ = hub_thread
    entry.call_soon_threadsafe(time.sleep, 1.0)  # blocks the hub's thread
    assert entry.call_and_wait(lambda: "ran", 0.2, "timed out") == "timed out"
