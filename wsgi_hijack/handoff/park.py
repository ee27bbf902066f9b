"""A master's park: it keeps the connections of a departing worker until a
successor takes them.

gunicorn replaces a worker in two orders. On a reload (HUP) the new workers
are forked first and the old ones told to stop at once, while the new ones
may still be booting; on a recycle (``max_requests``, or a worker that
exits) the old one exits first and its replacement is forked after. In both
a departing worker gives its connections here, and the park gives them on
as soon as successors listen: the live workers of this deployment that
started after the giver (:func:`.successors.successors`), each once it has
proved that it belongs to the deployment, spread evenly over as many
as the master runs (or over those there are, once they have been there for
:data:`SETTLE` seconds). Past ``WSGI_HIJACK_HANDOFF_TIMEOUT`` the rest get
their goodbye, and their clients reconnect and replay.

It is a process of its own, started by the master (``when_ready``), not a
thread in it: the master forks workers, and a fork would copy every parked
fd into the new worker, which would then keep clients open that nobody
serves. It answers, once the process that connects has proved it belongs to the
deployment (:func:`.transport.expect`):

- ``G`` then a give (:mod:`.transport`): a departing worker's connections.
  While the master is stopping, they can go only to another master's
  workers (a binary upgrade, ``USR2``): with no other master here, the give
  is refused and the giver says goodbye itself (a shutdown);
- ``B``: the in-process bus's state, given once, to the first successor that
  asks (``S`` + length + JSON), or ``N``.

It exits when its master is gone, saying goodbye for what it still holds,
or, told by the master's ``on_exit`` (SIGTERM), once it holds nothing.

    python -m wsgi_hijack.handoff.park DIRECTORY MASTER_PID
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import config
from . import rendezvous, transport
from .codec import ConnectionState, HandoffError, decode_batch, encode_batch
from .successors import parent, spread, start_time, successors

log = logging.getLogger("wsgi_hijack.handoff.park")

#: Seconds to wait for the rest of the master's workers once one successor
#: listens, before spreading over those there are.
SETTLE = 3.0
#: Seconds before a successor that failed to take a give is offered it again.
RETRY = 2.0
_LENGTH = struct.Struct("!I")


@dataclass
class Parked:
    """One give: its fds, their states, and where it stands."""

    giver: int
    fds: list[int]
    states: list[ConnectionState]
    deadline: float
    first_taker_seen: float | None = None
    #: successor pid -> when it failed to take; tried again after RETRY s
    failed: dict[int, float] = field(default_factory=dict)


class Park:
    def __init__(self, where: Path, master: int) -> None:
        self.where = where
        self.master = master
        self.deployment = rendezvous.deployment(where)
        #: Workers here that failed to prove they belong to this deployment:
        #: never offered anything again.
        self.strangers: set[tuple[int, int | None]] = set()
        self.parked: list[Parked] = []
        self.bus_state: dict | None = None
        #: Connections given on so far (where the next spread starts).
        self.given = 0
        #: SIGTERM from the master's on_exit: end once nothing is parked.
        self.finishing = False
        self.listener = transport.listen(rendezvous.park_socket(where, master))

    @property
    def stopping(self) -> bool:
        return rendezvous.stopping(self.where, self.master).exists()

    def other_masters(self) -> bool:
        own = rendezvous.park_socket(self.where, self.master)
        return any(path != own for path in rendezvous.parks(self.where,
                                                             self.deployment.ident))

    def run(self) -> None:
        try:
            while rendezvous.alive(self.master) and self.master == os.getppid() and \
                    not (self.finishing and not self.parked):
                ready, _, _ = select.select([self.listener], [], [], 0.05)
                if ready:
                    conn, _ = self.listener.accept()
                    with conn:
                        self._answer(conn)
                self._place()
        finally:
            for batch in self.parked:
                self._goodbye(batch, "the master is gone")
            self.listener.close()
            rendezvous.unmark(rendezvous.park_socket(self.where, self.master))

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(30.0)
        try:
            giver = transport.expect(conn, self.deployment.ident, self.deployment.key)
            kind = conn.recv(1)
            if kind == b"B":
                state, self.bus_state = self.bus_state, None
                if state is None:
                    conn.sendall(b"N")
                else:
                    data = json.dumps(state).encode()
                    conn.sendall(b"S" + _LENGTH.pack(len(data)) + data)
                    log.info("park: bus state (last id %s) to pid %d", state.get("last_id"),
                             giver)
            elif kind == b"G":
                self._take(conn, giver)
            else:
                transport.refuse(conn, f"unknown request {kind!r}")
        except (OSError, HandoffError) as exc:
            log.warning("park: a request failed: %s", exc)

    def _take(self, conn: socket.socket, giver: int) -> None:
        fds, message = transport.take(conn, transport.fd_room())
        try:
            if self.stopping and not self.other_masters():
                raise HandoffError("the master is shutting down and no other master "
                                   "runs: say goodbye")
            meta, states = decode_batch(message, len(fds))
        except HandoffError as exc:
            for fd in fds:
                os.close(fd)
            transport.refuse(conn, str(exc))
            return
        transport.accept_answer(conn, len(fds))
        if isinstance(meta.get("bus"), dict):
            self.bus_state = meta["bus"]
        if fds:
            self.parked.append(Parked(giver, fds, states,
                                      time.monotonic() + config.handoff_timeout()))
        log.info("park: took %d connections from pid %d", len(fds), giver)

    def _place(self) -> None:
        now = time.monotonic()
        for batch in list(self.parked):
            if self.stopping and not self.other_masters():
                self._goodbye(batch, "the master is shutting down")
            elif now > batch.deadline:
                self._goodbye(batch, "no successor took them in time")
            else:
                self._give_on(batch, now)
            if not batch.fds:
                self.parked.remove(batch)

    def _give_on(self, batch: Parked, now: float) -> None:
        stopping = self.stopping  # then only another master's workers take them
        ident = self.deployment.ident
        takers = [(pid, path) for pid, path in successors(self.where, batch.giver)
                  if (pid, start_time(pid)) not in self.strangers
                  and now - batch.failed.get(pid, -RETRY) >= RETRY
                  and not (stopping and parent(pid) == self.master)]
        if not takers:
            return
        if batch.first_taker_seen is None:
            batch.first_taker_seen = now
        wanted = rendezvous.read_workers(self.where, self.master)
        if len(takers) < wanted and now - batch.first_taker_seen < SETTLE:
            return
        # Each give's remainder goes on where the last one's stopped, so that
        # the new workers' totals differ by one at most, not just each give's.
        turn = self.given % len(takers)
        takers = takers[turn:] + takers[:turn]
        self.given += len(batch.fds)
        kept: list[int] = []
        for (pid, path), share in zip(takers, spread(len(batch.fds), len(takers)), strict=True):
            if not share:
                continue
            fds = [batch.fds[i] for i in share]
            states = [replace(batch.states[i], fd_index=j) for j, i in enumerate(share)]
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(60.0)
                    sock.connect(str(path))
                    try:
                        transport.prove(sock, ident, self.deployment.key)
                    except HandoffError as exc:
                        self.strangers.add((pid, start_time(pid)))
                        raise HandoffError(f"not a worker of this deployment ({exc})") from None
                    transport.give(sock, fds, encode_batch(states))
            except (OSError, HandoffError) as exc:
                log.warning("park: pid %d did not take %d connections: %s", pid, len(fds), exc)
                batch.failed[pid] = now
                kept.extend(share)
                continue
            for fd in fds:
                os.close(fd)  # the successor holds them now
            log.info("park: gave %d connections of pid %d to pid %d", len(fds), batch.giver,
                     pid)
        batch.fds = [batch.fds[i] for i in kept]
        batch.states = [replace(batch.states[i], fd_index=j) for j, i in enumerate(kept)]

    def _goodbye(self, batch: Parked, why: str) -> None:
        log.warning("park: %d connections of pid %d get their goodbye: %s", len(batch.fds),
                    batch.giver, why)
        for fd, state in zip(batch.fds, batch.states, strict=True):
            goodbye(fd, state)
        batch.fds, batch.states = [], []


def goodbye(fd: int, state: ConnectionState) -> None:
    """What the connection was owed, then its goodbye (one non-blocking write,
    whatever the kernel takes), and close."""
    try:
        os.set_blocking(fd, False)
        os.write(fd, state.outbuf + state.goodbye)
    except OSError:
        pass
    os.close(fd)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m wsgi_hijack.handoff.park DIRECTORY MASTER_PID", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level(),
                        format="[%(asctime)s] [%(process)d] [%(name)s] %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    park = Park(Path(argv[0]), int(argv[1]))

    def finish(signum: int, frame: object) -> None:  # the master's on_exit
        park.finishing = True

    signal.signal(signal.SIGTERM, finish)
    park.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
