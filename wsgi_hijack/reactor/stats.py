"""The reactor's counts, read from any thread and synced into metrics.

The counts are a plain dict that the reactor's thread increments (no lock:
it is the only writer). The admission's and the bus's counts are kept by
them, under their own locks; :meth:`Stats.snapshot` joins the three.
"""

from __future__ import annotations

from typing import Any

from .. import metrics
from ..bus.base import Bus, Counters
from .occupancy import Occupancy

#: Seconds between two syncs of the counts into prometheus metrics.
SYNC_EVERY = 1.0


class Stats:
    __slots__ = ("counts", "metrics", "_write_runs")

    def __init__(self) -> None:
        self.counts: dict[str, Any] = {
            "adopted": 0,
            "dropped_closed": 0,  # client went away (EOF, reset, write error)
            "dropped_slow": 0,  # client stopped reading; outbuf passed max_buffer
            "dropped_protocol": 0,  # client sent what its protocol refuses
            "dropped_dead": 0,  # peer failed its protocol's liveness check (missed pongs)
            "completed": 0,  # one-shot responses written and closed
            "moved": 0,  # handed to a successor worker (wsgi_hijack.handoff)
            "messages": 0,  # messages delivered (each to all its subscribers)
            "deliveries": 0,  # frames written to subscribers
            "rounds": 0,
            "last_write_run": 0.0,
        }
        #: The prometheus instruments, or None without prometheus-client.
        self.metrics = metrics.create()
        self._write_runs: list[float] = []

    def round_done(self, elapsed: float) -> None:
        """A heartbeat round's write run took ``elapsed`` seconds."""
        self.counts["rounds"] += 1
        self.counts["last_write_run"] = elapsed
        if self.metrics is not None:
            self._write_runs.append(elapsed)

    def snapshot(self, occupancy: Occupancy, bus: Bus | None) -> dict[str, Any]:
        stats = dict(self.counts, refused=occupancy.refused)
        stats.update(bus.counters() if bus is not None else dict.fromkeys(Counters.NAMES, 0))
        return stats

    def sync(self, held_by_protocol: dict[str, int], occupancy: Occupancy,
             bus: Bus | None) -> None:
        runs, self._write_runs = self._write_runs, []
        self.metrics.sync(self.snapshot(occupancy, bus), held_by_protocol, runs)
