"""The reactor's timers: one heap for everything that happens at a time.

Heartbeat rounds, the metrics sync and each long-poll's deadline are entries
of one heap, so the loop sleeps until the earliest of them and wakes for
nothing else. An entry cannot be cancelled: its callback checks that it
still applies (a long-poll answered before its deadline is closed, and its
deadline then does nothing). Not thread-safe: the reactor's thread only.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class Timers:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        # (when, seq, callback, argument); seq keeps equal times in order
        # and never compares two callbacks.
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()

    def at(self, when: float, callback: Callable[[Any], None], argument: Any = None) -> None:
        """Call ``callback(argument)`` once ``when`` (time.monotonic()) has come."""
        heapq.heappush(self._heap, (when, next(self._seq), callback, argument))

    def next_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[tuple[Callable[[Any], None], Any]]:
        """Take out every entry whose time has come, earliest first."""
        heap, out = self._heap, []
        while heap and heap[0][0] <= now:
            _, _, callback, argument = heapq.heappop(heap)
            out.append((callback, argument))
        return out

    def entries(self) -> list[tuple[float, Callable[[Any], None], Any]]:
        """``(when, callback, argument)`` of every entry, in no order."""
        return [(when, callback, argument) for when, _, callback, argument in self._heap]

    def __len__(self) -> int:
        return len(self._heap)
