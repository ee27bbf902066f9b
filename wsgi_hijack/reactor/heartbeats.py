"""Heartbeats: the same bytes to every held connection, each round.

Connections are grouped by their heartbeat bytes (fd -> Connection per
group), so a round is one C-speed loop per group over its fds
(:func:`.fanout.fan_out`), never touching a protocol: that is what keeps a
round at the floor's CPU per heartbeat (benchmarks/results/results.md). A protocol's
heartbeat is read once, when its connection is stored, and kept on the
connection: a protocol whose attribute changes later cannot leave its fd
behind in a group. Protocols that check that their peer is alive
(WebSocket pongs) are asked after each round. The reactor's thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..connection import Connection
from . import fanout


class Heartbeats:
    __slots__ = ("groups", "watched")

    def __init__(self) -> None:
        #: heartbeat bytes -> fd -> Connection
        self.groups: dict[bytes, dict[int, Connection]] = {}
        #: connections whose protocol checks the peer is alive each round
        self.watched: set[Connection] = set()

    def add(self, conn: Connection) -> None:
        protocol = conn.protocol
        beat = protocol.heartbeat
        if beat:
            beat = conn.beat = bytes(beat)
            group = self.groups.get(beat)
            if group is None:
                group = self.groups[beat] = {}
            group[conn.fd] = conn
        if protocol.checks_liveness:
            self.watched.add(conn)

    def stop(self, conn: Connection) -> None:
        """No more heartbeats for ``conn`` (nothing may follow its goodbye)."""
        beat, conn.beat = conn.beat, None
        if beat is not None:
            group = self.groups.get(beat)
            if group is not None and group.get(conn.fd) is conn:
                del group[conn.fd]
                if not group:
                    del self.groups[beat]

    def forget(self, conn: Connection) -> None:
        """``conn`` is dropped: out of every group and of the liveness checks."""
        self.stop(conn)
        self.watched.discard(conn)

    def round(self, armed: set[int], senders: list[fanout.Sender],
              slow: Callable[[Connection, bytes], None],
              dead: Callable[[Connection, bytes], None]) -> float:
        """Write every heartbeat, then ask the watched protocols; returns the
        write run's seconds. ``slow`` takes what the fan-out could not write,
        ``dead(conn, last_words)`` each peer that failed its liveness check."""
        start = time.perf_counter()
        for beat, group in list(self.groups.items()):
            fanout.fan_out(beat, group, armed, senders, slow)
        elapsed = time.perf_counter() - start
        if self.watched:
            now = time.monotonic()
            for conn in list(self.watched):
                verdict = conn.protocol.liveness(now)
                if verdict is not None and conn.fd >= 0:
                    dead(conn, verdict)
        return elapsed
