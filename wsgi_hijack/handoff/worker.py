"""A gunicorn worker's side of the handoff: take connections in, give them away.

- :func:`start` (``post_worker_init``): with the in-process bus and one
  worker, first take the predecessor's bus (its history and id counter) so
  that ids go on increasing: until then this worker accepts nothing. Then
  listen on ``worker-<pid>.sock`` and take what the park gives, once the
  park has proved it belongs to this worker's deployment (and this worker
  to the park: :func:`.transport.expect`).
- Each connection taken is run through the app again (:func:`resume`): an
  environ rebuilt from its request line, with its state under
  ``environ["wsgi_hijack.resume"]``. The app's route runs in this worker's
  code and hijacks as it always does; the middleware writes no head, and the
  reactor carries on from the state. A connection the app does not hold
  again (the route is gone, it answers otherwise, it raises) gets its
  goodbye, and its client reconnects.
- :func:`leaving` (the SIGTERM handler) stops this worker being anybody's
  successor at once; :func:`leave` (``worker_exit``) gives every held
  connection, and the bus's state, to the master's park; or, when the master
  is stopping or there is no park, says goodbye as before.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import gevent
import gevent.lock

from .. import config
from ..adapters.resume import RESUME, RESUME_SOCKET
from ..bus.memory import InProcessBus
from ..bus.process import get_bus
from ..connection import Connection
from . import rendezvous, transport
from .codec import ConnectionState, HandoffError, decode_batch, encode_batch

log = logging.getLogger("wsgi_hijack.handoff")
_LENGTH = struct.Struct("!I")


class _Worker:
    """This process's handoff: its directory, listener, and whether it leaves."""

    def __init__(self, where: Path, single: bool, deployment: rendezvous.Deployment) -> None:
        self.where = where
        self.deployment = deployment
        self.single = single
        self.listener: socket.socket | None = None
        self.leaving = False
        self.lock = gevent.lock.BoundedSemaphore(1)


_this: _Worker | None = None


def start(app: Callable, workers: int, notify: Callable[[], None] = lambda: None) -> None:
    """Take the predecessor's bus if it moves, start the reactor, then listen."""
    global _this
    from ..reactor import get_reactor

    try:
        where = rendezvous.directory()
        deployment = rendezvous.deployment(where)
    except rendezvous.RendezvousError as exc:
        log.error("held connections will say goodbye at restarts: %s", exc)
        get_reactor()
        return
    this = _this = _Worker(where, workers == 1, deployment)
    bus = get_bus()
    if this.single and isinstance(bus, InProcessBus):
        _take_bus(this, bus, notify)
    get_reactor()
    this.listener = transport.listen(rendezvous.worker_socket(where, os.getpid()))
    gevent.spawn(_serve, this, app)


def _take_bus(this: _Worker, bus: InProcessBus, notify: Callable[[], None]) -> None:
    """Wait for an older worker's bus (of this deployment), while one is
    alive; at most the handoff timeout."""
    deadline = time.monotonic() + config.handoff_timeout()
    where, ident = this.where, this.deployment.ident
    while True:
        for park in rendezvous.parks(where, ident):
            state = _ask_bus(park, this.deployment)
            if state is not None:
                try:
                    bus.restore(state)
                    log.info("bus taken over: ids go on after %d", bus.last_id())
                except ValueError as exc:
                    log.error("the predecessor's bus state is refused: %s", exc)
                return
        if not rendezvous.older_workers(where, os.getpid(), ident):
            return
        if time.monotonic() > deadline:
            log.warning("no bus state from the older worker within %.3g s: ids start "
                        "afresh", config.handoff_timeout())
            return
        notify()
        gevent.sleep(0.05)


def _ask_bus(park: Path, deployment: rendezvous.Deployment) -> dict | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10.0)
            sock.connect(str(park))
            transport.prove(sock, deployment.ident, deployment.key)
            sock.sendall(b"B")
            kind = transport.recv_exactly(sock, 1)
            if kind != b"S":
                return None
            size = _LENGTH.unpack(transport.recv_exactly(sock, _LENGTH.size))[0]
            return json.loads(transport.recv_exactly(sock, size))
    except (OSError, HandoffError, ValueError) as exc:
        log.warning("asking %s for the bus state failed: %s", park, exc)
        return None


# -- taking connections in -----------------------------------------------------------


def _serve(this: _Worker, app: Callable) -> None:
    listener = this.listener
    while listener is not None and listener.fileno() >= 0:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        gevent.spawn(_take, this, app, conn)


def _take(this: _Worker, app: Callable, conn: socket.socket) -> None:
    # One give at a time: each is checked against the fds left, and two
    # departing workers giving at once must not both count the same room.
    with conn, this.lock:
        conn.settimeout(60.0)
        try:
            transport.expect(conn, this.deployment.ident, this.deployment.key)
            fds, message = transport.take(conn, transport.fd_room())
        except (OSError, HandoffError) as exc:
            log.warning("a handoff to this worker failed: %s", exc)
            transport.refuse(conn, str(exc))
            return
        try:
            if this.leaving:
                raise HandoffError("this worker is shutting down itself")
            _, states = decode_batch(message, len(fds))
        except HandoffError as exc:
            for fd in fds:
                os.close(fd)
            log.warning("a handoff to this worker was refused: %s", exc)
            transport.refuse(conn, str(exc))
            return
        held = sum(resume(app, state, fd) for state, fd in zip(states, fds, strict=True))
        transport.accept_answer(conn, len(fds))
        log.info("took %d connections over (%d held again, %d said goodbye)", len(fds), held,
                 len(fds) - held)


def resume(app: Callable, state: ConnectionState, fd: int) -> bool:
    """Run ``state``'s request through ``app`` to hold ``fd`` again; True if held.
    Otherwise the connection gets its goodbye."""
    sock = socket.socket(fileno=fd)
    try:
        result = app(_environ(state, sock), _start_response)
        close = getattr(result, "close", None)
        if close is not None:
            close()
    except Exception:
        log.exception("resuming %r failed", state.request)
    if sock.fileno() < 0:
        return True  # detached: the reactor holds it
    log.warning("the app did not hold %r again: it gets its goodbye", state.request)
    try:
        os.set_blocking(fd, False)
        os.write(fd, state.outbuf + state.goodbye)
    except OSError:
        pass
    sock.close()
    return False


def _start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
    return lambda data: None


def _environ(state: ConnectionState, sock: socket.socket) -> dict:
    """The environ of a resumed request: its request line, the addresses, no
    headers (the request was checked when it first came; a route that needs
    more to choose its stream keeps it in the target), and the state."""
    method, target, protocol = state.request.split(" ")
    path, _, query = target.partition("?")
    try:
        host, port = sock.getpeername()[:2]
        server, server_port = sock.getsockname()[:2]
    except (OSError, ValueError):
        host, port, server, server_port = "", 0, "", 0
    return {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"), "QUERY_STRING": query,
        "RAW_URI": target, "SERVER_PROTOCOL": protocol,
        "REMOTE_ADDR": str(host), "REMOTE_PORT": str(port),
        "SERVER_NAME": str(server), "SERVER_PORT": str(server_port),
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False, RESUME: state, RESUME_SOCKET: sock,
    }


# -- giving connections away ------------------------------------------------------------


def leaving() -> None:
    """This worker is on its way out: it takes nothing more. Safe in a signal handler."""
    this = _this
    if this is None or this.leaving:
        return
    this.leaving = True
    rendezvous.mark(rendezvous.leaving(this.where, os.getpid()))
    rendezvous.unmark(rendezvous.worker_socket(this.where, os.getpid()))


def leave(reactor: Any) -> int:
    """Give every held connection (and the bus) to the master's park; returns
    how many moved. When the master stops and no other master runs (a
    shutdown), or there is no park, say goodbye."""
    this = _this
    if this is None:
        reactor.close(goodbye=True)
        return 0
    leaving()
    if this.listener is not None:
        this.listener.close()
    # A give already being read is answered (refused) before this worker goes.
    if this.lock.acquire(timeout=5.0):
        this.lock.release()
    master = os.getppid()
    park = rendezvous.park_socket(this.where, master)
    try:
        own_park = [park]
        nobody = rendezvous.stopping(this.where, master).exists() and \
            not [p for p in rendezvous.parks(this.where, this.deployment.ident)
                 if p not in own_park]
        if nobody or not park.exists():  # a shutdown: no successor will come
            reactor.close(goodbye=True)
            return 0
        bus = reactor.bus

        def give(conns: list[Connection], states: list[ConnectionState]) -> bool:
            meta = {}
            if this.single and isinstance(bus, InProcessBus):
                meta["bus"] = bus.hand_over()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(60.0)
                    sock.connect(str(park))
                    transport.prove(sock, this.deployment.ident, this.deployment.key)
                    sock.sendall(b"G")
                    taken = transport.give(sock, [c.fd for c in conns],
                                           encode_batch(states, meta))
            except (OSError, HandoffError) as exc:
                # The master began to stop after the check above (its park
                # refuses, or is gone): a shutdown after all, not a fault.
                log.info("the park of master %d did not take %d connections (%s); they get "
                         "their goodbye", master, len(conns), exc)
                return False
            return taken == len(conns)

        moved = reactor.hand_off(give)
        log.info("gave %d held connections to the park of master %d", moved, master)
        return moved
    finally:
        rendezvous.unmark(rendezvous.leaving(this.where, os.getpid()))
