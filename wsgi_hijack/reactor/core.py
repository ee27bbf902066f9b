"""The reactor: one per worker process, holding every hijacked connection.

The life of a held connection, all in this module. The reactor's other
jobs are in modules of their own: the loop and its timed jobs
(:mod:`.loop`, :mod:`.timers`), published messages on their way
(:mod:`.messages`) and who gets which (:mod:`.routing`), heartbeats
(:mod:`.heartbeats`), the fan-out loop and its threads (:mod:`.fanout`),
entry from other threads (:mod:`.entry`), every syscall on a client fd
(:mod:`.wire`), counting what is held
(:mod:`.occupancy`), the counts (:mod:`.stats`), and the process's reactor
(:mod:`.process`).

1. **handed over** -- :meth:`Reactor.hold`, from any greenlet or OS thread,
   detaches the socket's fd, wraps it in a :class:`Connection` and appends it
   to a thread-safe inbox, then wakes the gevent hub through an ``async``
   watcher (no polling sleep loop).
2. **stored** -- :meth:`Reactor._adopt` moves it into ``self._conns`` (fd ->
   Connection) and registers the fd in one ``epoll`` set that the hub watches
   through a single io watcher. No greenlet and no watcher per connection.
   It gets what it missed on its channels, then every message published,
   none twice: the router (:mod:`.routing`) says what to read from the bus's
   history and who gets each message.
3. **written** -- :meth:`Reactor._write` sends with one non-blocking
   ``write``; what the kernel does not take waits in ``conn.outbuf`` and the fd
   is armed for ``EPOLLOUT``. Heartbeats are written each round; published
   messages arrive through :meth:`Reactor.dispatch` (any thread) and
   :meth:`Reactor._deliver` writes each one's frame, made once per protocol,
   to every subscriber; several waiting messages leave in one write. On a
   TLS connection each write is encrypted for it first (``conn.tls``,
   :mod:`wsgi_hijack.tls`), and ``outbuf`` holds records. The
   same bytes to many connections (a heartbeat, a message) go out through
   :func:`.fanout.fan_out`: one loop in C over their fds, and ``_write``
   only for those that have bytes waiting or whose write fell short. A
   one-shot protocol (long-poll) is complete after one delivery, or when its
   deadline passes (``Reactor._deadline``, one of the loop's timers,
   :mod:`.timers`), and then closes.
4. **drained** -- :meth:`Reactor._flush` runs when the fd is writable and
   disarms ``EPOLLOUT`` once ``outbuf`` is empty.
5. **dropped** -- :meth:`Reactor._drop`, the one transition to
   ``State.CLOSED``: the client closed (EOF, reset, hangup,
   seen at once through ``EPOLLIN``/``EPOLLRDHUP``), a write failed, the
   protocol refused its input, or its ``outbuf`` passed ``max_buffer`` (a
   client that stopped reading). Its fd is unregistered and closed. One
   client's failure never stops the loop over the others.
6. **closed** -- :meth:`Reactor.close` at worker exit writes each protocol's
   goodbye, best effort, and closes every fd.
7. **moved** -- :meth:`Reactor.hand_off`, at worker exit when a successor
   takes over: with the loop stopped, each state is read (:mod:`.moving`) and
   given with its fd to the successor (:mod:`wsgi_hijack.handoff`), which
   holds it again; this copy is then closed without a word. What cannot
   move, or is not taken, gets its goodbye as in 6.

Everything runs in one greenlet (``Loop._run``) that never blocks: every syscall
on a client fd is non-blocking, and errors are caught per connection.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event

from .. import config
from ..admission import Admission, Refusal
from ..bus.base import Bus, Event, Message
from ..bus.positions import Position, parse_position
from ..connection import Connection, State
from ..handoff.codec import ConnectionState
from ..protocols.base import ConnectionDone, Protocol, ProtocolError
from . import fanout, moving
from .channel_routing import PerChannelRouter
from .entry import HubEntry
from .heartbeats import Heartbeats
from .loop import Loop
from .messages import Messages
from .occupancy import Occupancy
from .routing import Router
from .stats import Stats
from .timers import Timers
from .wire import CLOSED_MASK, EPOLLOUT, Wire, close_fd

log = logging.getLogger("wsgi_hijack.reactor")


class Reactor(Loop, Messages):
    """Holds hijacked connections and writes heartbeats to all of them."""

    def __init__(self, heartbeat: float | None = None, max_buffer: int | None = None) -> None:
        if heartbeat is None:
            heartbeat = config.heartbeat_interval()
        self.heartbeat_interval = heartbeat
        max_buffer = max_buffer if max_buffer is not None else config.max_buffer()
        if self.heartbeat_interval <= 0 or max_buffer <= 0:
            raise ValueError("heartbeat and max_buffer must be positive")
        #: Every syscall on a client fd (:mod:`.wire`).
        self._wire = Wire(max_buffer)
        self.pid = os.getpid()
        self._senders = [fanout.Sender() for _ in range(config.send_threads() - 1)]
        self._conns: dict[int, Connection] = {}
        self._heartbeats = Heartbeats()
        # fds whose writes take the per-connection path (Wire.armed).
        self._armed = self._wire.armed
        self._inbox: deque[tuple[Connection, bytes, int | None, float | None]] = deque()
        self._outbox: deque[Message | Event] = deque()  # from the bus, in id order
        #: Who gets which message: the exactly-once bookkeeping, sans-IO.
        self.router = Router()
        # Heartbeat rounds, the metrics sync and long-poll deadlines.
        self._timers = Timers()
        self._on_deadline = self._deadline  # one bound method for every entry
        #: The bus whose history serves replays; set at start() if not given.
        self.bus: Bus | None = None
        self.occupancy = Occupancy(Admission())
        self._stats = Stats()
        self._counts = self._stats.counts  # incremented on the hot paths
        #: protocol name -> connections held
        self.held_by_protocol: dict[str, int] = {}
        self._greenlet: gevent.Greenlet | None = None
        self._running = False

    @property
    def stats(self) -> dict[str, Any]:
        """The reactor's counts, with the admission's and the bus's; any thread."""
        return self._stats.snapshot(self.occupancy, self.bus)

    @property
    def max_buffer(self) -> int:
        return self._wire.max_buffer

    @property
    def admission(self) -> Admission:
        return self.occupancy.admission

    # -- starting and stopping -------------------------------------------------

    def start(self) -> Reactor:
        """Start in the calling thread's gevent hub (the one serving requests)."""
        if self._running:
            return self
        fanout.ignore_sigpipe()
        if self.bus is None:
            from ..bus.process import get_bus

            self.bus = get_bus()
        per_channel = self.bus.ids_per_channel
        self.router = (PerChannelRouter if per_channel else Router)(self.bus.confirms_subscriptions)
        # Anything published before now had no subscriber here, but stays
        # replayable: count it as delivered. (Per channel: as each goes live.)
        try:
            self.router.delivered_upto = 0 if per_channel else self.bus.last_id()
        except Exception as exc:  # a bus that is down now may be back soon
            log.warning("bus unavailable at start (%s); continuing without it", exc)
        hub = gevent.get_hub()
        self._entry = HubEntry(hub)
        self._wake = gevent.event.Event()
        self._io_watcher = hub.loop.io(self._wire.open(), 1)
        self._io_watcher.start(self._wake.set)
        self._async = hub.loop.async_()
        self._async.start(self._wake.set)
        self._running = True
        self.bus.start(self.dispatch)
        self._greenlet = gevent.spawn(self._run)
        log.debug("reactor started in pid %d, heartbeat every %.3g s", self.pid,
                  self.heartbeat_interval)
        return self

    @property
    def running(self) -> bool:
        return self._running

    def close(self, goodbye: bool = True, timeout: float = 5.0) -> None:
        """Say each protocol's goodbye (best effort, never blocking) and close all.

        From another thread (a reactor in its own thread), the work is handed
        to the reactor's thread and waited for, at most ``timeout`` seconds.
        """
        if not self._running:
            return
        if not self._entry.in_hub():
            self._entry.call_and_wait(lambda: self.close(goodbye), timeout, None)
            return
        self._stop()
        self._close_all(goodbye)

    def hand_off(self, give: Callable[[list[Connection], list[ConnectionState]], bool]) -> int:
        """Move what can move (``give(conns, states)`` says whether a successor
        took them all), then close as :meth:`close` does; returns how many moved."""
        if not self._running:
            return 0
        if not self._entry.in_hub():
            return self._entry.call_and_wait(lambda: self.hand_off(give), 120.0, 0)
        self._stop()
        conns, states = moving.states(list(self._conns.values()), self.router, self._timers,
                                      self._on_deadline)
        taken = False
        try:
            taken = give(conns, states)  # even none: the bus's state may move
        except Exception:
            log.exception("handing %d connections off failed; they get their goodbye",
                          len(conns))
        if taken:
            for conn in conns:  # the successor holds them: close this copy, say nothing
                self._drop(conn, "moved")
        self._close_all(goodbye=True)
        return len(conns) if taken else 0

    def _stop(self) -> None:
        """The loop stops: nothing is read, written or delivered after this
        (what the bus still dispatches is in its history)."""
        self._adopt()
        self._running = False

    def _close_all(self, goodbye: bool) -> None:
        for conn in list(self._conns.values()):
            protocol = conn.protocol
            if goodbye and not conn.closing:
                # A long-poll gets its (empty) answer, so it polls again at once;
                # streams get their protocol's goodbye (SSE: a retry hint;
                # chunked: the last chunk; WebSocket: a close frame).
                last = protocol.timeout(self.router.position(conn)) if protocol.one_shot \
                    else protocol.goodbye
                tls = conn.tls
                if tls is not None:  # its records, then the end of TLS
                    last = tls.encrypt(last) + tls.close()
                self._wire.last_words(conn, last)
            self._drop(conn, None)
        self.bus.close()
        for sender in self._senders:
            sender.stop()
        self._senders = []
        self._io_watcher.stop()
        self._async.stop()
        self._wire.close()
        if self._greenlet is not None and gevent.getcurrent() is not self._greenlet:
            self._greenlet.kill(block=False)

    # -- 1. handed over ---------------------------------------------------------

    def hold(self, sock: Any, protocol: Protocol, initial: bytes = b"",
             channels: tuple[str, ...] | list[str] = (), last_id: Position | None = None,
             timeout: float | None = None) -> Connection:
        """Take ``sock`` (a socket, or a HijackedSocket) and hold it; thread-safe.

        The socket object is detached: its fd now belongs to the reactor.
        ``initial`` bytes are written first, before any heartbeat. The
        connection is subscribed to ``channels``; with ``last_id`` it first
        gets what it missed after that id. ``timeout`` (seconds) is for
        one-shot protocols: when it passes, ``protocol.timeout()`` is written
        and the connection closed.

        A socket moved here from another worker (``sock.resumed``) carries on
        from its state instead (:func:`.moving.resume`). A TLS connection
        (``sock.tls``, :class:`~wsgi_hijack.tls.TLSSocket`) comes with its TLS
        state, and every byte to it is encrypted.
        """
        if not self._running:
            raise RuntimeError("reactor is not running; get it with wsgi_hijack.get_reactor()")
        if not isinstance(protocol.heartbeat, (bytes, bytearray)):
            raise TypeError(f"{type(protocol).__name__}.heartbeat must be bytes (b'' for "
                            f"none), got {type(protocol.heartbeat).__name__}")
        resumed = getattr(sock, "resumed", None)
        if resumed is not None:
            initial, last_id, timeout = moving.resume(protocol, resumed)
        if type(last_id) is str:  # a position per channel, as it moves between workers
            last_id = parse_position(last_id)
        take_pending = getattr(sock, "take_pending", None)
        pending = take_pending() if take_pending is not None else b""
        request = getattr(sock, "request", None)
        tls = getattr(sock, "tls", None)
        fd = sock.detach()
        if fd < 0:
            raise ValueError(f"{sock!r} has no open file descriptor")
        os.set_blocking(fd, False)
        conn = Connection(fd, protocol)
        conn.tls = tls
        conn.outbuf = initial
        conn.channels = tuple(channels)
        conn.request = sys.intern(request) if request else None
        conn.ip = self.occupancy.handed_over(getattr(sock, "peer_ip", None))
        self._inbox.append((conn, pending, last_id, timeout))
        self._async.send()  # wakes the hub, from this thread or any other
        return conn

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        """Run ``fn(*args)`` in the reactor's thread soon; from any thread."""
        self._entry.call_soon_threadsafe(fn, *args)

    def __len__(self) -> int:
        return len(self._conns)

    @property
    def holding(self) -> int:
        """Connections handed over and not yet dropped (each an fd); any thread."""
        return self.occupancy.holding

    def admit(self, ip: str | None = None) -> Refusal | None:
        """May one more be held? None means yes, and then :meth:`admitted_done`
        must follow once the hijack has ended; any thread."""
        return self.occupancy.admit(ip)

    def admitted_done(self) -> None:
        self.occupancy.admitted_done()

    def drop_all(self) -> int:
        """Close every held connection now, with no goodbye, as a network failure
        would; the reactor goes on, and clients reconnect (SSE with its
        Last-Event-ID). For tests and operators; any thread. Returns how many."""
        if not self._entry.in_hub():
            return self._entry.call_and_wait(self.drop_all, 5.0, 0)
        self._adopt()
        return len([self._drop(conn, None) for conn in list(self._conns.values())])

    # -- 2. stored ---------------------------------------------------------------

    def _adopt(self) -> None:
        inbox = self._inbox
        while inbox:
            conn, pending, last_id, timeout = inbox.popleft()
            try:
                self._wire.watch(conn)
            except OSError as exc:
                log.warning("cannot watch fd %d, closing it: %s", conn.fd, exc)
                close_fd(conn)
                self.occupancy.released(conn.ip)
                continue
            self._conns[conn.fd] = conn
            if conn.tls is not None:
                pending += self._decrypt(conn, b"")  # what came with the request head
                if conn.fd < 0:
                    continue
            conn.state = State.HELD
            conn.protocol.held(conn)
            self._heartbeats.add(conn)
            self._counts["adopted"] += 1
            name = conn.protocol.name
            self.held_by_protocol[name] = self.held_by_protocol.get(name, 0) + 1
            if conn.outbuf:
                initial, conn.outbuf = conn.outbuf, b""
                self._write(conn, initial)
            if pending and conn.fd >= 0:
                self._received(conn, pending)
            if conn.fd >= 0 and conn.channels:
                if timeout is not None:
                    self._timers.at(time.monotonic() + timeout, self._on_deadline, conn)
                self._apply(self.router.join(conn, last_id))

    def _finish(self, conn: Connection) -> None:
        """The response is complete: stop its messages and heartbeats (nothing
        may follow a goodbye), close once flushed."""
        if conn.state < State.CLOSING:  # forward only: a dropped one stays closed
            conn.state = State.CLOSING
        self._apply(self.router.leave(conn))
        self._heartbeats.stop(conn)
        if conn.catch_up is not None and conn.fd >= 0:  # its replay before its end
            self._acted(conn, self._wire.pump(conn, everything=True))
        if conn.tls is not None and conn.fd >= 0:
            self._send(conn, conn.tls.close())  # the clean end: nothing was cut off
        if conn.fd >= 0:
            if not conn.outbuf:
                self._drop(conn, "completed")
            else:  # a client that never reads its last bytes is not held forever
                self._timers.at(time.monotonic() + config.poll_timeout(), self._reap, conn)

    def _reap(self, conn: Connection) -> None:
        if conn.fd >= 0 and conn.closing:
            self._drop(conn, "dropped_slow")

    # -- reading, and noticing that the client left -------------------------------

    def _poll(self) -> None:
        conns = self._conns
        wire = self._wire
        while True:
            events = wire.events()
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    continue
                if mask & CLOSED_MASK:
                    self._read(conn)
                if mask & EPOLLOUT and conn.fd >= 0:
                    self._flush(conn)
            if not wire.full_batch(events):
                return
            gevent.sleep(0)  # a storm of events: let the accept loop run in between
            if not self._running:  # close() ran meanwhile: the epoll is gone
                return

    def _read(self, conn: Connection) -> None:
        data = self._wire.read(conn)
        if data is None:
            return
        if not data:
            self._drop(conn, "dropped_closed")
            return
        if conn.tls is not None:
            data = self._decrypt(conn, data)
            if conn.fd < 0:
                return
            if conn.tls.peer_closed:  # its close_notify: a stream's client has left
                if data:
                    self._received(conn, data)
                if conn.fd >= 0:
                    self._wire.last_words(conn, conn.tls.close())  # answered with ours
                    self._drop(conn, "dropped_closed")
                return
            if not data:
                return
        self._received(conn, data)

    def _decrypt(self, conn: Connection, wire: bytes) -> bytes:
        """The plain text in ``wire`` for a TLS connection (:meth:`.Wire.decrypt`)."""
        plain, dropped = self._wire.decrypt(conn, wire)
        self._acted(conn, dropped)
        return plain

    def _received(self, conn: Connection, data: bytes) -> None:
        try:
            reply = conn.protocol.receive_data(data)
        except ProtocolError as exc:
            log.info("closing fd %d: %s", conn.fd, exc)
            self._counts["dropped_protocol"] += 1
            self.close_connection(conn, exc.goodbye)
            return
        except Exception:  # a protocol's bug costs its connection, never the reactor
            log.exception("protocol %s failed on input; closing fd %d", conn.protocol.name,
                          conn.fd)
            self._counts["dropped_protocol"] += 1
            self._drop(conn, None)
            return
        if type(reply) is ConnectionDone:
            self.close_connection(conn, reply.goodbye)
        elif reply:
            self._write(conn, reply)

    def close_connection(self, conn: Connection, last_words: bytes = b"") -> None:
        """Write ``last_words`` if the client still reads, then close once they
        are flushed; call from the reactor's thread."""
        if last_words and conn.fd >= 0:
            self._write(conn, last_words)
        self._finish(conn)

    # -- 3. written ----------------------------------------------------------------

    def _write(self, conn: Connection, data: bytes) -> None:
        """Write ``data`` (the protocol's bytes) to ``conn``, encrypted for it on TLS."""
        self._acted(conn, self._wire.write(conn, data))

    def _send(self, conn: Connection, data: bytes) -> None:
        """Put wire bytes (TLS's own) on the wire: what the kernel does not take waits."""
        self._acted(conn, self._wire.send(conn, data))

    def _catch_up(self, conn: Connection, frames: list[bytes]) -> None:
        """Write what ``conn`` missed as its socket drains (:meth:`.Wire.pump`)."""
        self._acted(conn, self._wire.catch_up(conn, frames))

    def _acted(self, conn: Connection, dropped: str | None) -> None:
        if dropped is not None:
            self._drop(conn, dropped)

    def write(self, conn: Connection, data: bytes) -> None:
        """Write to one held connection; call from the reactor's thread. Once
        the reactor has stopped (closing, or its connections moving), nothing."""
        if conn.fd >= 0 and self._running:
            self._write(conn, data)

    # -- 4. drained ------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        reason = self._wire.flush(conn)
        if reason is not None:
            self._drop(conn, reason)
        elif not conn.outbuf and conn.closing and conn.catch_up is None:
            self._drop(conn, "completed")

    # -- 5. dropped, 6. closed ----------------------------------------------------------

    def _drop(self, conn: Connection, reason: str | None) -> None:
        """The one transition to CLOSED: out of every structure, fd closed."""
        fd = conn.fd
        if fd < 0:
            return
        del self._conns[fd]
        self._heartbeats.forget(conn)
        self.held_by_protocol[conn.protocol.name] -= 1
        if conn.channels:
            self._apply(self.router.leave(conn))
        self._wire.forget(conn)
        self.occupancy.released(conn.ip)
        if reason is not None:
            self._counts[reason] += 1
