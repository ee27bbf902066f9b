"""The reactor's loop, and its timed jobs: heartbeat rounds and the metrics sync.

One greenlet runs :meth:`Loop._run`: it sleeps until the hub wakes it (a
connection handed over, a message dispatched, an fd ready) or the earliest
timer (:mod:`.timers`) is due, then stores what was handed over, delivers
what was published, reads and flushes what epoll reported, and runs the due
timers. Each step is guarded: one failing step is logged, never the end of
the loop.

A part of :class:`~wsgi_hijack.reactor.core.Reactor` (a mixin).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..bus.base import Bus
from ..connection import Connection
from . import fanout
from .heartbeats import Heartbeats
from .occupancy import Occupancy
from .stats import SYNC_EVERY, Stats
from .timers import Timers

log = logging.getLogger("wsgi_hijack.reactor")


class Loop:
    """The loop and its timed jobs; mixed into the Reactor."""

    # What this part uses of the reactor.
    heartbeat_interval: float
    held_by_protocol: dict[str, int]
    _running: bool
    _wake: Any
    _timers: Timers
    _heartbeats: Heartbeats
    _stats: Stats
    _counts: dict[str, Any]
    _armed: set[int]
    _senders: list[fanout.Sender]
    _conns: dict[int, Connection]
    occupancy: Occupancy
    bus: Bus | None

    if TYPE_CHECKING:
        def _adopt(self) -> None: ...
        def _deliver(self) -> None: ...
        def _poll(self) -> None: ...
        def _write(self, conn: Connection, data: bytes) -> None: ...
        def close_connection(self, conn: Connection, last_words: bytes = b"") -> None: ...

    def _run(self) -> None:
        now = time.monotonic()
        self._timers.at(now + self.heartbeat_interval, self._beat, now + self.heartbeat_interval)
        if self._stats.metrics is not None:
            self._timers.at(now + SYNC_EVERY, self._sync)
        while self._running:
            wake_at = self._timers.next_at()
            self._wake.wait(None if wake_at is None else max(0.0, wake_at - time.monotonic()))
            self._wake.clear()
            if not self._running:
                break
            self._guarded(self._adopt)
            self._guarded(self._deliver)
            self._guarded(self._poll)
            for callback, argument in self._timers.due(time.monotonic()):
                self._guarded(callback, argument)

    def _beat(self, scheduled: float) -> None:
        """A heartbeat round, then the next: drift-free, but never catching up
        on rounds missed (a loaded machine gets fewer rounds, not a burst)."""
        try:
            self.heartbeat_round()
        finally:
            now = time.monotonic()
            following = max(scheduled + self.heartbeat_interval, now)
            self._timers.at(following, self._beat, following)

    def _sync(self, _: Any) -> None:
        try:
            self._stats.sync(self.held_by_protocol, self.occupancy, self.bus)
        finally:
            self._timers.at(time.monotonic() + SYNC_EVERY, self._sync)

    def _guarded(self, step: Any, *args: Any) -> None:
        if not self._running:  # closed by a step that yielded to the hub (_poll)
            return
        try:
            step(*args)
        except Exception:  # nothing may kill the reactor; one bad step is logged
            log.exception("reactor step %s failed", getattr(step, "__name__", step))

    def heartbeat_round(self) -> float:
        """Write every connection's heartbeat; return the write run's seconds."""
        elapsed = self._heartbeats.round(self._armed, self._senders, self._write, self._dead)
        self._stats.round_done(elapsed)
        log.info("Number of clients connected: %d, time for entire write run: %.6f s",
                 len(self._conns), elapsed)
        return elapsed

    def _dead(self, conn: Connection, last_words: bytes) -> None:
        self._counts["dropped_dead"] += 1
        self.close_connection(conn, last_words)
