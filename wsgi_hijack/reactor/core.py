"""The reactor: one per worker process, holding every hijacked connection.

The life of a held connection, all in this module (the fan-out loop and
its threads are in :mod:`.fanout`, the process's reactor in :mod:`.process`):

1. **handed over** -- :meth:`Reactor.hold`, from any greenlet or OS thread,
   detaches the socket's fd, wraps it in a :class:`Connection` and appends it
   to a thread-safe inbox, then wakes the gevent hub through an ``async``
   watcher (no polling sleep loop).
2. **stored** -- :meth:`Reactor._adopt` moves it into ``self._conns`` (fd ->
   Connection) and registers the fd in one ``epoll`` set that the hub watches
   through a single io watcher. No greenlet and no watcher per connection.
   It gets what it missed on its channels (replay after its last id, up to
   the last message delivered), then is subscribed: from then on it gets
   every message, none twice.
3. **written** -- :meth:`Reactor._write` sends with one non-blocking
   ``write``; what the kernel does not take waits in ``conn.outbuf`` and the fd
   is armed for ``EPOLLOUT``. Heartbeats are written each round; published
   messages arrive through :meth:`Reactor.dispatch` (any thread) and
   :meth:`Reactor._deliver` writes each one's frame, made once per protocol,
   to every subscriber; several waiting messages leave in one write. The
   same bytes to many connections (a heartbeat, a message) go out through
   :meth:`Reactor._fan_out`: one loop in C over their fds, and ``_write``
   only for those that have bytes waiting or whose write fell short. A
   one-shot protocol (long-poll) is complete after one delivery, or when its
   deadline passes (:meth:`Reactor._deadline`, one of the loop's timers,
   :mod:`.timers`), and then closes.
4. **drained** -- :meth:`Reactor._flush` runs when the fd is writable and
   disarms ``EPOLLOUT`` once ``outbuf`` is empty.
5. **dropped** -- :meth:`Reactor._drop`: the client closed (EOF, reset, hangup,
   seen at once through ``EPOLLIN``/``EPOLLRDHUP``), a write failed, the
   protocol refused its input, or its ``outbuf`` passed ``max_buffer`` (a
   client that stopped reading). Its fd is unregistered and closed. One
   client's failure never stops the loop over the others.
6. **closed** -- :meth:`Reactor.close` at worker exit writes each protocol's
   goodbye, best effort, and closes every fd.

Everything runs in one greenlet (``_run``) that never blocks: every syscall
on a client fd is non-blocking, and errors are caught per connection.
"""

from __future__ import annotations

import logging
import os
import select as _select_module
import signal
import threading
import time
from collections import deque
from typing import Any

import gevent
import gevent.event
from gevent import monkey

from .. import config, metrics
from ..admission import Admission, Refusal
from ..connection import Connection, State
from ..protocols.base import ConnectionDone, Protocol, ProtocolError, framed
from . import fanout
from .entry import HubEntry
from .timers import Timers

log = logging.getLogger("wsgi_hijack.reactor")

# gevent's monkeypatching removes select.epoll; the original is still there.
_epoll = monkey.get_original("select", "epoll")
EPOLLIN = _select_module.EPOLLIN
EPOLLOUT = _select_module.EPOLLOUT
EPOLLRDHUP = _select_module.EPOLLRDHUP
EPOLLHUP = _select_module.EPOLLHUP
EPOLLERR = _select_module.EPOLLERR
_READ_MASK = EPOLLIN | EPOLLRDHUP
_CLOSED_MASK = EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR
_POLL_BATCH = 4096
_READ_SIZE = 65536

#: Control events a bus queues through Reactor.dispatch, in order with messages.
BUS_LIVE = "live"
BUS_RESYNC = "resync"

_METRICS_EVERY = 1.0  # seconds between syncs of the counters into prometheus metrics
_write = os.write
_read = os.read


class Reactor:
    """Holds hijacked connections and writes heartbeats to all of them."""

    def __init__(self, heartbeat: float | None = None, max_buffer: int | None = None) -> None:
        if heartbeat is None:
            heartbeat = config.heartbeat_interval()
        self.heartbeat_interval = heartbeat
        self.max_buffer = max_buffer if max_buffer is not None else config.max_buffer()
        if self.heartbeat_interval <= 0 or self.max_buffer <= 0:
            raise ValueError("heartbeat and max_buffer must be positive")
        self.pid = os.getpid()
        self._senders = [fanout.Sender() for _ in range(config.send_threads() - 1)]
        self._conns: dict[int, Connection] = {}
        # heartbeat bytes -> the connections that take it (fd -> Connection):
        # a round writes each group with one C-speed loop over its fds, never
        # touching a protocol. A protocol's heartbeat is read once, when stored.
        self._beating: dict[bytes, dict[int, Connection]] = {}
        # fds with bytes waiting in their outbuf (armed for EPOLLOUT): a round
        # must not write past them, so they take the slow path.
        self._armed: set[int] = set()
        self._inbox: deque[tuple[Connection, bytes, int | None, float | None]] = deque()
        self._outbox: deque[Any] = deque()  # published messages, in id order
        # channel -> (framer, one_shot) -> fd -> Connection: the connections
        # whose protocols share a framer take one frame of a message, written
        # to all of them by one C-speed loop (_fan_out), like a heartbeat;
        # one-shot ones (long-poll) apart, as each then completes.
        self._subscribers: dict[str, dict[tuple[Protocol, bool], dict[int, Connection]]] = {}
        # connections whose protocol checks the peer is alive each round
        self._watched: set[Connection] = set()
        # Heartbeat rounds, the metrics sync and long-poll deadlines.
        self._timers = Timers()
        self._on_deadline = self._deadline  # one bound method for every entry
        # channel -> subscription confirmations still awaited from the bus (0: live)
        self._bus_channels: dict[str, int] = {}
        # confirmations still to come for subscriptions already released
        self._stale_confirmations: dict[str, int] = {}
        # while the bus resynchronises: live messages held back, else None
        self._resyncing: list[Any] | None = None
        # connections waiting for their channels' bus subscription -> their last id
        self._waiting: dict[Connection, int | None] = {}
        # connection -> id up to which its replay already covered live messages
        self._skip: dict[Connection, int] = {}
        # channel -> the bus's last id when its subscription went live
        self._live_from: dict[str, int] = {}
        #: The bus whose history serves replays; set at start() if not given.
        self.bus: Any = None
        self.admission = Admission()
        self._metrics = metrics.create()
        self._write_runs: list[float] = []
        #: protocol name -> connections held
        self.held_by_protocol: dict[str, int] = {}
        # client address -> held connections, only with a per-address cap
        self._per_ip: dict[str, int] = {}
        self._per_ip_lock = monkey.get_original("threading", "Lock")()
        # Hijacks admitted and not yet ended (thread servers run several at
        # once), and connections handed over and not yet dropped: one count
        # under one lock, so that admission is exact from any thread.
        self._admitting = 0
        self._holding = 0
        self._admit_lock = monkey.get_original("threading", "Lock")()
        #: Id of the last message delivered to subscribers.
        self.delivered_upto = 0
        self._epoll: Any = None
        self._greenlet: gevent.Greenlet | None = None
        self._running = False
        self.stats = {
            "adopted": 0,
            "refused": 0,  # hijacks refused by admission (503 full, 429 per address)
            "dropped_closed": 0,  # client went away (EOF, reset, write error)
            "dropped_slow": 0,  # client stopped reading; outbuf passed max_buffer
            "dropped_protocol": 0,  # client sent what its protocol refuses
            "dropped_dead": 0,  # peer failed its protocol's liveness check (missed pongs)
            "completed": 0,  # one-shot responses written and closed
            "messages": 0,  # messages delivered (each to all its subscribers)
            "deliveries": 0,  # frames written to subscribers
            "published": 0,  # messages published through this process
            "bus_errors": 0,  # publishes or replays the bus could not do
            "rounds": 0,
            "last_write_run": 0.0,
        }

    # -- starting and stopping -------------------------------------------------

    def start(self) -> Reactor:
        """Start in the calling thread's gevent hub (the one serving requests)."""
        if self._running:
            return self
        _ignore_sigpipe()
        if self.bus is None:
            from ..bus import get_bus

            self.bus = get_bus()
        # Anything published before now had no subscriber here, but stays
        # replayable: count it as delivered.
        try:
            self.delivered_upto = self.bus.last_id()
        except Exception as exc:  # a bus that is down now may be back soon
            log.warning("bus unavailable at start (%s); continuing without it", exc)
            self.delivered_upto = 0
        start_bus = getattr(self.bus, "start", None)
        if start_bus is not None:
            start_bus(self)
        hub = gevent.get_hub()
        self._entry = HubEntry(hub)
        self._epoll = _epoll()
        self._wake = gevent.event.Event()
        self._io_watcher = hub.loop.io(self._epoll.fileno(), 1)
        self._io_watcher.start(self._wake.set)
        self._async = hub.loop.async_()
        self._async.start(self._wake.set)
        self._running = True
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
        self._running = False
        self._adopt()
        for conn in list(self._conns.values()):
            protocol = conn.protocol
            if goodbye and not conn.closing:
                # A long-poll gets its (empty) answer, so it polls again at once;
                # streams get their protocol's goodbye (SSE: a retry hint;
                # chunked: the last chunk; WebSocket: a close frame).
                last = protocol.timeout(self.delivered_upto) if protocol.one_shot \
                    else protocol.goodbye
                if last or conn.outbuf:
                    try:  # one non-blocking write: whatever the kernel takes
                        _write(conn.fd, conn.outbuf + last)
                    except OSError:
                        pass
            self._drop(conn, None)
        close_bus = getattr(self.bus, "close", None)
        if close_bus is not None:
            close_bus()
        for sender in self._senders:
            sender.stop()
        self._senders = []
        self._io_watcher.stop()
        self._async.stop()
        self._epoll.close()
        if self._greenlet is not None and gevent.getcurrent() is not self._greenlet:
            self._greenlet.kill(block=False)

    # -- 1. handed over ---------------------------------------------------------

    def hold(self, sock: Any, protocol: Protocol, initial: bytes = b"",
             channels: tuple[str, ...] | list[str] = (), last_id: int | None = None,
             timeout: float | None = None) -> Connection:
        """Take ``sock`` (a socket, or a HijackedSocket) and hold it; thread-safe.

        The socket object is detached: its fd now belongs to the reactor.
        ``initial`` bytes are written first, before any heartbeat. The
        connection is subscribed to ``channels``; with ``last_id`` it first
        gets what it missed after that id. ``timeout`` (seconds) is for
        one-shot protocols: when it passes, ``protocol.timeout()`` is written
        and the connection closed.
        """
        if not self._running:
            raise RuntimeError("reactor is not running; get it with wsgi_hijack.get_reactor()")
        if not isinstance(protocol.heartbeat, (bytes, bytearray)):
            raise TypeError(f"{type(protocol).__name__}.heartbeat must be bytes (b'' for "
                            f"none), got {type(protocol.heartbeat).__name__}")
        take_pending = getattr(sock, "take_pending", None)
        pending = take_pending() if take_pending is not None else b""
        fd = sock.detach()
        if fd < 0:
            raise ValueError(f"{sock!r} has no open file descriptor")
        os.set_blocking(fd, False)
        conn = Connection(fd, protocol)
        conn.outbuf = initial
        conn.channels = tuple(channels)
        if self.admission.max_per_ip:
            ip = getattr(sock, "peer_ip", None)
            if ip:
                conn.ip = ip
                with self._per_ip_lock:
                    self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        with self._admit_lock:
            self._holding += 1
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
        return self._holding

    def _released(self) -> None:
        with self._admit_lock:
            self._holding -= 1

    def drop_all(self) -> int:
        """Close every held connection now, with no goodbye, as a network failure
        would; the reactor goes on, and clients reconnect (SSE with its
        Last-Event-ID). For tests and operators; any thread. Returns how many."""
        if not self._entry.in_hub():
            return self._entry.call_and_wait(self.drop_all, 5.0, 0)
        self._adopt()
        conns = list(self._conns.values())
        for conn in conns:
            self._drop(conn, None)
        return len(conns)

    def _forget_ip(self, conn: Connection) -> None:
        with self._per_ip_lock:
            left = self._per_ip.get(conn.ip, 1) - 1
            if left > 0:
                self._per_ip[conn.ip] = left
            else:
                self._per_ip.pop(conn.ip, None)
        conn.ip = None

    def admit(self, ip: str | None = None) -> Refusal | None:
        """May one more connection be held? Thread-safe; None means yes, and
        then :meth:`admitted_done` must follow once the hijack has ended
        (held or not)."""
        with self._admit_lock:
            refusal = self.admission.check(self.holding + self._admitting,
                                           self._per_ip.get(ip, 0) if ip else 0)
            if refusal is None:
                self._admitting += 1
        if refusal is not None:
            self.stats["refused"] += 1
        return refusal

    def admitted_done(self) -> None:
        """The hijack :meth:`admit` let through has ended: its connection is
        held (counted in :attr:`holding`) or gone."""
        with self._admit_lock:
            self._admitting = max(0, self._admitting - 1)

    # -- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        now = time.monotonic()
        self._timers.at(now + self.heartbeat_interval, self._beat, now + self.heartbeat_interval)
        if self._metrics is not None:
            self._timers.at(now + _METRICS_EVERY, self._sync)
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
            self._sync_metrics()
        finally:
            self._timers.at(time.monotonic() + _METRICS_EVERY, self._sync)

    def _sync_metrics(self) -> None:
        runs, self._write_runs = self._write_runs, []
        self._metrics.sync(self.stats, self.held_by_protocol, runs)

    def _guarded(self, step: Any, *args: Any) -> None:
        if not self._running:  # closed by a step that yielded to the hub (_poll)
            return
        try:
            step(*args)
        except Exception:  # nothing may kill the reactor; one bad step is logged
            log.exception("reactor step %s failed", getattr(step, "__name__", step))

    # -- 2. stored ---------------------------------------------------------------

    def _adopt(self) -> None:
        inbox = self._inbox
        while inbox:
            conn, pending, last_id, timeout = inbox.popleft()
            try:
                self._epoll.register(conn.fd, _READ_MASK)
            except OSError as exc:
                log.warning("cannot watch fd %d, closing it: %s", conn.fd, exc)
                if conn.ip is not None:
                    self._forget_ip(conn)
                _close_fd(conn)
                self._released()
                continue
            self._conns[conn.fd] = conn
            conn.state = State.HELD
            # The heartbeat is read once, here; the key is kept on the
            # connection, so a protocol whose attribute changes later cannot
            # leave its fd behind in a group.
            beat = conn.protocol.heartbeat
            if beat:
                beat = conn.beat = bytes(beat)
                group = self._beating.get(beat)
                if group is None:
                    group = self._beating[beat] = {}
                group[conn.fd] = conn
            self.stats["adopted"] += 1
            name = conn.protocol.name
            self.held_by_protocol[name] = self.held_by_protocol.get(name, 0) + 1
            if conn.protocol.checks_liveness:
                self._watched.add(conn)
            if conn.outbuf:
                initial, conn.outbuf = conn.outbuf, b""
                self._write(conn, initial)
            if pending and conn.fd >= 0:
                self._received(conn, pending)
            if conn.fd >= 0 and conn.channels:
                self._subscribe(conn, last_id, timeout)

    def _subscribe(self, conn: Connection, last_id: int | None, timeout: float | None) -> None:
        if timeout is not None:
            self._timers.at(time.monotonic() + timeout, self._on_deadline, conn)
        # A channel this worker does not listen to yet is subscribed at the bus
        # first; a cross-process bus confirms later (BUS_LIVE), and until then
        # the connection waits, taking no messages.
        live = True
        for channel in conn.channels:
            awaited = self._bus_channels.get(channel)
            if awaited is None:
                awaited = self._bus_channels[channel] = 0 if self.bus.subscribe(channel) else 1
            live = live and awaited == 0
        if not live or self._resyncing is not None:
            self._waiting[conn] = last_id
            return
        # Replay up to the last delivered message, then subscribe: messages
        # after it are still in the outbox and reach the connection through
        # _deliver, so it gets each exactly once.
        # A channel that went live recently had messages published before its
        # subscription that never pass through _deliver: read up to where it
        # went live (the skip in _join drops what then also arrives live).
        upto = self.delivered_upto
        if self._live_from:
            upto = max(upto, *(self._live_from.get(c, 0) for c in conn.channels))
        # (0: nothing delivered yet and the bus's position unknown: read it all.)
        self._join(conn, self.bus.replay(conn.channels, last_id, upto=upto or None))

    def _join(self, conn: Connection, replay: Any) -> None:
        if conn.fd < 0 or conn.closing:  # its goodbye is out (or on its way): nothing after it
            return
        opening = conn.protocol.opening(replay)
        if opening:
            self._write(conn, opening)
            if conn.protocol.one_shot:
                self._finish(conn)
                return
        if conn.fd < 0:
            return
        if replay.last_id > self.delivered_upto:
            # The replay read past what was delivered: those messages are
            # still on their way, and this connection already has them.
            self._skip[conn] = replay.last_id
        key = _group_key(conn.protocol)
        for channel in conn.channels:
            by_framer = self._subscribers.get(channel)
            if by_framer is None:
                by_framer = self._subscribers[channel] = {}
            group = by_framer.get(key)
            if group is None:
                group = by_framer[key] = {}
            group[conn.fd] = conn

    def _unsubscribe(self, conn: Connection) -> None:
        self._waiting.pop(conn, None)
        self._skip.pop(conn, None)
        key = _group_key(conn.protocol)
        for channel in conn.channels:
            by_framer = self._subscribers.get(channel)
            if by_framer is not None:
                group = by_framer.get(key)
                if group is not None and group.get(conn.fd) is conn:
                    del group[conn.fd]
                    if not group:
                        del by_framer[key]
                        if not by_framer:
                            del self._subscribers[channel]
            self._release(channel)

    def _release(self, channel: str) -> None:
        """Unsubscribe ``channel`` at the bus once no connection here needs it."""
        if channel in self._subscribers or channel not in self._bus_channels:
            return
        if any(channel in conn.channels for conn in self._waiting):
            return
        awaited = self._bus_channels.pop(channel)
        if awaited:
            self._stale_confirmations[channel] = (
                self._stale_confirmations.get(channel, 0) + awaited)
        self.bus.unsubscribe(channel)

    # -- published messages -----------------------------------------------------

    def dispatch(self, message: Any) -> None:
        """Queue a published message for delivery; thread-safe, in id order.

        A bus may also queue control events, in order with its messages:
        ``(BUS_LIVE, channel)`` when a channel's subscription is confirmed,
        ``(BUS_RESYNC, None)`` after it reconnected and may have missed some.
        """
        if self._running:
            self._outbox.append(message)
            self._async.send()

    def subscriber_count(self, channel: str) -> int:
        return sum(map(len, self._subscribers.get(channel, {}).values()))

    def _deliver(self) -> None:
        outbox = self._outbox
        if not outbox:
            return
        batch = []
        while outbox:
            item = outbox.popleft()
            if type(item) is tuple:  # a bus control event: deliver what came before it first
                self._deliver_batch(batch)
                batch = []
                self._control(*item)
            else:
                batch.append(item)
        self._deliver_batch(batch)
        upto = self.delivered_upto
        if self._skip:
            for conn in [c for c, last in self._skip.items() if last <= upto]:
                del self._skip[conn]
        if self._live_from:
            for channel in [c for c, last in self._live_from.items() if last <= upto]:
                del self._live_from[channel]

    def _deliver_batch(self, batch: list[Any]) -> None:
        if not batch:
            return
        if self._resyncing is not None:
            self._resyncing.extend(batch)
            return
        skip = self._skip
        if len(batch) == 1 and not skip:
            # The common case: one message, one frame per framer, written to
            # each framer's subscribers as a heartbeat is: no per-subscriber
            # Python beyond a builtin call, so delivery takes one write run.
            message = batch[0]
            for (framer, one_shot), group in list(
                    self._subscribers.get(message.channel, {}).items()):
                data = framed(framer, message)
                if one_shot:  # each one completes and closes: the slow path
                    for conn in list(group.values()):
                        self._write_message(conn, data)
                else:
                    self.stats["deliveries"] += len(group)
                    self._fan_out(data, group)
            self._delivered(message)
            return
        # Several messages waiting: gather each connection's frames, one write each.
        gathered: dict[Connection, list[bytes]] = {}
        for message in batch:
            subscribers = [conn for group in self._subscribers.get(message.channel, {}).values()
                           for conn in group.values()]
            for conn in subscribers:
                if conn.protocol.one_shot and conn in gathered:
                    continue  # its response is the first message; it polls again for more
                if skip and skip.get(conn, 0) >= message.id:
                    continue  # it had this one in its replay
                frames = gathered.get(conn)
                if frames is None:
                    frames = gathered[conn] = []
                frames.append(framed(conn.protocol, message))
            self._delivered(message)
        for conn, frames in gathered.items():
            self._write_message(conn, frames[0] if len(frames) == 1 else b"".join(frames))

    def _control(self, kind: str, channel: str | None) -> None:
        if kind == BUS_LIVE:
            stale = self._stale_confirmations.get(channel, 0)
            if stale:  # for a subscription released since: not this one
                if stale == 1:
                    del self._stale_confirmations[channel]
                else:
                    self._stale_confirmations[channel] = stale - 1
                return
            awaited = self._bus_channels.get(channel)
            if not awaited:
                return
            self._bus_channels[channel] = awaited - 1
            if awaited == 1:
                try:
                    self._live_from[channel] = self.bus.last_id()
                except Exception:
                    self._live_from[channel] = 1 << 62  # unknown: replays read to the end
            if any(self._bus_channels.values()):
                return
            if self._resyncing is not None:
                self._finish_resync()
            self._admit_waiting()
        elif kind == BUS_RESYNC:
            # The bus reconnected and now subscribes every channel again, one
            # confirmation each. Until all are live, hold live messages back;
            # then take what was missed from the history (_finish_resync).
            self._stale_confirmations.clear()
            for name in self._bus_channels:
                self._bus_channels[name] = 1
            if self._bus_channels and self._resyncing is None:
                self._resyncing = []

    def _admit_waiting(self) -> None:
        ready = [conn for conn in self._waiting
                 if all(self._bus_channels.get(c) == 0 for c in conn.channels)]
        for conn in ready:
            last_id = self._waiting.pop(conn)
            if conn.fd >= 0 and not conn.closing:
                # Read everything stored so far: messages published before
                # the subscription was live are only there.
                self._join(conn, self.bus.replay(conn.channels, last_id))

    def _finish_resync(self) -> None:
        held, self._resyncing = self._resyncing or [], None
        if not self.delivered_upto:  # no position to resume from: only go on live
            self._deliver_batch(held)
            return
        replay = self.bus.replay(list(self._subscribers), self.delivered_upto)
        missed = [m for m in replay.messages if m.id > self.delivered_upto]
        self._deliver_batch(missed + [m for m in held if m.id > replay.last_id])
        if replay.last_id > self.delivered_upto:
            self.delivered_upto = replay.last_id

    def _delivered(self, message: Any) -> None:
        self.delivered_upto = message.id
        self.stats["messages"] += 1

    def _write_message(self, conn: Connection, data: bytes) -> None:
        if conn.fd < 0 or conn.closing:
            return
        self.stats["deliveries"] += 1
        self._write(conn, data)
        if conn.protocol.one_shot:
            self._finish(conn)

    def _finish(self, conn: Connection) -> None:
        """The response is complete: stop its messages and heartbeats (nothing
        may follow a goodbye), close once flushed."""
        if conn.state < State.CLOSING:  # forward only: a dropped one stays closed
            conn.state = State.CLOSING
        self._unsubscribe(conn)
        self._stop_beats(conn)
        if conn.fd >= 0 and not conn.outbuf:
            self._drop(conn, "completed")

    def _deadline(self, conn: Connection) -> None:
        """A one-shot's deadline: its timeout answer, unless it was answered."""
        if conn.fd >= 0 and not conn.closing:
            self._write(conn, conn.protocol.timeout(self.delivered_upto))
            self._finish(conn)

    # -- reading, and noticing that the client left -------------------------------

    def _poll(self) -> None:
        conns = self._conns
        while True:
            events = self._epoll.poll(0, _POLL_BATCH)
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    continue
                if mask & _CLOSED_MASK:
                    self._read(conn)
                if mask & EPOLLOUT and conn.fd >= 0:
                    self._flush(conn)
            if len(events) < _POLL_BATCH:
                return
            gevent.sleep(0)  # a storm of events: let the accept loop run in between
            if not self._running:  # close() ran meanwhile: the epoll is gone
                return

    def _read(self, conn: Connection) -> None:
        try:
            data = _read(conn.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn, "dropped_closed")
            return
        if not data:
            self._drop(conn, "dropped_closed")
            return
        self._received(conn, data)

    def _received(self, conn: Connection, data: bytes) -> None:
        try:
            reply = conn.protocol.receive_data(data)
        except ProtocolError as exc:
            log.info("closing fd %d: %s", conn.fd, exc)
            self.stats["dropped_protocol"] += 1
            self._last_words(conn, exc.goodbye)
            return
        except ConnectionDone as done:
            self._last_words(conn, done.goodbye)
            return
        except Exception:  # a protocol's bug costs its connection, never the reactor
            log.exception("protocol %s failed on input; closing fd %d", conn.protocol.name,
                          conn.fd)
            self.stats["dropped_protocol"] += 1
            self._drop(conn, None)
            return
        if reply:
            self._write(conn, reply)

    def _last_words(self, conn: Connection, goodbye: bytes) -> None:
        """Write ``goodbye`` if the client still reads, then close."""
        if goodbye and conn.fd >= 0:
            self._write(conn, goodbye)
        self._finish(conn)

    # -- 3. written ----------------------------------------------------------------

    def _write(self, conn: Connection, data: bytes) -> None:
        if conn.outbuf:
            if len(conn.outbuf) + len(data) > self.max_buffer:
                self._drop(conn, "dropped_slow")
            else:
                conn.outbuf += data
            return
        try:
            sent = _write(conn.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn, "dropped_closed")
            return
        if sent < len(data):
            if len(data) - sent > self.max_buffer:
                self._drop(conn, "dropped_slow")
                return
            conn.outbuf = data[sent:]
            self._epoll.modify(conn.fd, _READ_MASK | EPOLLOUT)
            self._armed.add(conn.fd)

    def write(self, conn: Connection, data: bytes) -> None:
        """Write to one held connection; call from the reactor's thread."""
        if conn.fd >= 0:
            self._write(conn, data)

    def _fan_out(self, data: bytes, group: dict[int, Connection]) -> None:
        """Write the same ``data`` to every connection in ``group`` (fd -> conn).

        The hot loop of heartbeats and messages: one write() per connection,
        run in C by fanout.write_each. The kernel's send path is most of the cost
        on loopback, so the Python around it is one list copy and one
        builtin call per fd. Anything unusual (bytes already waiting, a full
        send buffer, an error, a partial write) goes to _write, which
        buffers or drops.
        """
        armed = self._armed
        if armed:  # these get it behind the bytes they are waiting to send
            waiting = [group[fd] for fd in armed if fd in group]
            fds = [fd for fd in group if fd not in armed]
        else:
            waiting = []
            fds = list(group)
        senders = self._senders
        if senders and len(fds) >= fanout.THREADED_MIN:
            # WSGI_HIJACK_SEND_THREADS=K: spread the writes over K OS threads;
            # write() releases the GIL. The helpers only write; what
            # they could not, the reactor's thread handles after the join.
            k = len(senders) + 1
            step = -(-len(fds) // k)
            for i, sender in enumerate(senders, 1):
                sender.start(fds[i * step:(i + 1) * step], data)
            trouble = fanout.write_each(fds[:step], data)
            for sender in senders:
                trouble += sender.join()
        else:
            trouble = fanout.write_each(fds, data)
        slow = self._write
        for fd, sent in trouble:
            conn = group.get(fd)
            if conn is not None and conn.fd >= 0:
                slow(conn, data if sent is None else data[sent:])
        for conn in waiting:
            if conn.fd >= 0:
                slow(conn, data)

    def heartbeat_round(self) -> float:
        """Write every connection's heartbeat; return the write run's seconds."""
        start = time.perf_counter()
        for beat, group in list(self._beating.items()):
            self._fan_out(beat, group)
        elapsed = time.perf_counter() - start
        if self._watched:
            now = time.monotonic()
            for conn in list(self._watched):
                verdict = conn.protocol.liveness(now)
                if verdict is not None and conn.fd >= 0:
                    self.stats["dropped_dead"] += 1
                    self._last_words(conn, verdict)
        self.stats["rounds"] += 1
        self.stats["last_write_run"] = elapsed
        if self._metrics is not None:
            self._write_runs.append(elapsed)
        log.info("Number of clients connected: %d, time for entire write run: %.6f s",
                 len(self._conns), elapsed)
        return elapsed

    # -- 4. drained ------------------------------------------------------------------

    def _flush(self, conn: Connection) -> None:
        data = conn.outbuf
        try:
            sent = _write(conn.fd, data)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn, "dropped_closed")
            return
        conn.outbuf = data[sent:]
        if not conn.outbuf:
            if conn.closing:
                self._drop(conn, "completed")
                return
            self._epoll.modify(conn.fd, _READ_MASK)
            self._armed.discard(conn.fd)

    def _stop_beats(self, conn: Connection) -> None:
        beat, conn.beat = conn.beat, None
        if beat is not None:
            group = self._beating.get(beat)
            if group is not None and group.get(conn.fd) is conn:
                del group[conn.fd]
                if not group:
                    del self._beating[beat]

    # -- 5. dropped, 6. closed ----------------------------------------------------------

    def _drop(self, conn: Connection, reason: str | None) -> None:
        fd = conn.fd
        if fd < 0:
            return
        del self._conns[fd]
        self._stop_beats(conn)
        self._armed.discard(fd)
        self.held_by_protocol[conn.protocol.name] -= 1
        self._watched.discard(conn)
        if conn.ip is not None:
            self._forget_ip(conn)
        if conn.channels:
            self._unsubscribe(conn)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        _close_fd(conn)
        self._released()
        if reason is not None:
            self.stats[reason] += 1


def _group_key(protocol: Protocol) -> tuple[Protocol, bool]:
    """Where a subscriber is grouped: by the framer that makes its frames and
    by whether its own protocol is one-shot (a framer may be shared by both)."""
    return protocol.framer, bool(protocol.one_shot)


def _close_fd(conn: Connection) -> None:
    fd, conn.fd, conn.outbuf = conn.fd, -1, b""
    conn.state = State.CLOSED
    try:
        os.close(fd)
    except OSError:
        pass


def _ignore_sigpipe() -> None:
    # Writes to a client that reset would raise SIGPIPE and kill the process
    # unless it is ignored; CPython ignores it at startup, but an embedding
    # program may not have.
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGPIPE) != signal.SIG_IGN:
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
