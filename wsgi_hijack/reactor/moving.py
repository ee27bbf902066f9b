"""What a held connection takes with it when it moves to a successor worker.

The reactor's side of :mod:`wsgi_hijack.handoff`: for each held connection,
its :class:`~wsgi_hijack.handoff.codec.ConnectionState`, read while the
loop is stopped, so nothing is written between the reading and the move.
A connection that cannot move (held without the middleware, so no request
line to run again; a protocol that is not :attr:`~Protocol.movable`; one
whose response is complete; a TLS connection, whose TLS state lives in this
process's OpenSSL and cannot be given to another) is left out: it gets its
goodbye, and the client comes back (docs/restarts.rst).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..connection import Connection, State
from ..handoff.codec import ConnectionState
from ..protocols.base import Protocol
from .routing import Router
from .timers import Timers

log = logging.getLogger("wsgi_hijack.reactor")


def states(conns: Iterable[Connection], router: Router, timers: Timers,
           deadline: Callable[[Any], None]) -> tuple[list[Connection], list[ConnectionState]]:
    """The connections that can move, and their states (fd index = place in the list)."""
    now = time.monotonic()
    deadlines = {conn: when for when, callback, conn in timers.entries() if callback == deadline}
    movable: list[Connection] = []
    found: list[ConnectionState] = []
    for conn in conns:
        protocol = conn.protocol
        if conn.state is not State.HELD or conn.request is None or not protocol.movable \
                or conn.tls is not None:
            continue
        try:
            protocol_state, input_ = protocol.handoff_state(now)
        except Exception:  # its state cannot be read: it says goodbye, the rest move
            log.exception("fd %d (%s): cannot read its state; it gets its goodbye", conn.fd,
                          protocol.name)
            continue
        when = deadlines.get(conn)
        goodbye = protocol.timeout(router.position(conn)) if protocol.one_shot \
            else protocol.goodbye
        owed = conn.outbuf  # and the rest of a replay still draining, in order
        if conn.catch_up is not None:
            owed += b"".join(conn.catch_up.frames)
        found.append(ConnectionState(
            len(movable), protocol.name, conn.request, conn.channels,
            router.position(conn) if conn.channels else None, owed,
            None if when is None else max(0.0, when - now), protocol_state, input_, goodbye))
        movable.append(conn)
    return movable, found


def resume(protocol: Protocol, state: ConnectionState) -> tuple[bytes, int | None, float | None]:
    """What :meth:`Reactor.hold` starts a moved connection with: its bytes
    still owed, then a heartbeat at once (the move took time that the
    client's own watchdog counts), then what it missed after the last id it
    was given; a one-shot keeps its deadline. Returns ``(initial, last_id,
    timeout)``; raises ValueError when the app holds it as another protocol."""
    if state.protocol != protocol.name:
        raise ValueError(f"the app resumed a moved {state.protocol} connection as "
                         f"{protocol.name}; it gets its goodbye")
    protocol.resume(state.protocol_state, time.monotonic())
    beat = b"" if protocol.one_shot else protocol.heartbeat
    return state.outbuf + beat, state.last_id, state.deadline_in
