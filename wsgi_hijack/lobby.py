"""The lobby: where accepted connections wait for their request head.

A server that gives each accepted connection a greenlet (or a thread) and
then waits for its head pays for the waiting: a greenlet, a pool slot, a
timer, for every client on a slow link, every connection a load balancer
opens ahead of its request, every client that retransmits after a storm.
gunicorn bounds that wait with its keep-alive timer (2 s by default), and
cuts legitimate clients.

Here one greenlet accepts for the whole worker and parks each new
connection in an ``epoll`` set of its own, edge-triggered: a waiting head
costs an fd, a dict entry and a deadline, never a greenlet. Each time bytes
arrive the lobby *peeks* at them (``MSG_PEEK``: they stay in the kernel's
buffer, not in this process's memory) and looks for the end of the head.
A head split over many segments is peeked and scanned once, each look
resuming where the last stopped (:mod:`wsgi_hijack.lobby_scan`).
Then the untouched connection is handed to the server (:class:`Lobby`'s
``handoff``), which reads and parses the request as if it had just
accepted it. What can end a wait:

- the head is complete: handed over (kept ready if the server has no free
  slot yet, and handed over as soon as it has);
- ``head_timeout`` passes: ``408`` and close;
- the head passes ``MAX_HEAD`` bytes: ``431`` and close;
- the client half-closes with a partial head: ``400`` and close (the rest
  can never come); with nothing sent, or a reset: close.

On a TLS listener (``tls=True``) the lobby waits for the client's first
TLS record (its hello) instead, and answers nothing: it cannot speak TLS,
and clear text on a TLS connection is what must never happen. A deadline
or a half-close then ends the wait with a close. A client that sends a
clear-text HTTP request to the TLS port gets a ``400`` in clear text saying
so, as nginx answers it: that client speaks clear text itself.

Accepting is bounded by the worker's fd budget (``room``): the lobby takes
a connection only while one more fd fits, so it never meets ``EMFILE``,
and the others wait in the kernel's listen queue until a slot frees. If
``EMFILE`` comes anyway (something else took fds), accepting pauses for a
moment and one WARNING is logged, at most once a minute.

Slow heads, a storm at the fd limit and a storm behind slow heads, with and
without the lobby: benchmarks/results/arrival.md; a connect storm of 19,900
clients: benchmarks/results/storm.md.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import gevent.event
from gevent import monkey

from .lobby_scan import (
    MANY_LOOKS,
    MAX_HEAD,
    bound_receive_queue,
    head_carry,
    head_state,
    hello_state,
    peek,
    peek_new,
    resume_head,
    resume_hello,
    set_peek_offset,
)

log = logging.getLogger("wsgi_hijack.lobby")

_epoll = monkey.get_original("select", "epoll")
_stdsocket = monkey.get_original("socket", "socket")
_EPOLLIN = 0x001
_EPOLLERR = 0x008
_EPOLLHUP = 0x010
_EPOLLRDHUP = 0x2000
_EPOLLET = 1 << 31
_PARK_MASK = _EPOLLIN | _EPOLLRDHUP | _EPOLLET

#: How long accepting pauses after ``EMFILE`` or ``ENFILE``, and how often a
#: full budget is looked at again.
_RETRY_ACCEPT = 0.05
_WARN_EVERY = 60.0
#: accept() errors that mean "no fd or memory just now": pause, do not fail.
PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def answer(status: str, reason: str) -> bytes:
    """A small ``Connection: close`` response for a connection that never reached the app."""
    body = (reason + "\n").encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


#: The answer to a connection whose head passed its deadline.
TIMEOUT_RESPONSE = answer("408 Request Timeout", "the request head did not arrive in time")
_TOO_LARGE = answer("431 Request Header Fields Too Large",
                    f"the request head is larger than {MAX_HEAD} bytes")
_HALF_CLOSED = answer("400 Bad Request", "the client closed its side before the request "
                      "head was complete")
_RESTARTING = answer("503 Service Unavailable", "the server is restarting; retry")
_PLAIN_ON_TLS = answer("400 Bad Request", "this port speaks TLS: use https://")


class PauseWarning:
    """Says that accepting paused (``EMFILE`` and the like) once a minute at most:
    the fd budget should have prevented it, and the fix is a larger reserve."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = -_WARN_EVERY

    def __call__(self, exc: OSError, logger: Any) -> None:
        now = time.monotonic()
        if now - self._last >= _WARN_EVERY:
            self._last = now
            logger.warning("wsgi_hijack: accepting paused: %s; the fd budget did not cover "
                           "this worker's other files: raise WSGI_HIJACK_FD_RESERVE",
                           exc.strerror)


class Lobby:
    """Accepts from ``listeners`` and parks each connection until its head is in.

    ``handoff(sock, listener)`` gets a blocking-capable socket object of
    ``socket_class`` with the complete head still unread; it returns False
    when the server has no free slot, and the connection then waits in the
    ready queue until :meth:`wake` is called (or the next accept). ``room()``
    says how many more fds the worker may open now. ``max_accept`` bounds
    accepts per wake-up, for listeners shared with other workers.
    """

    def __init__(self, listeners: Sequence[Any], handoff: Callable[[Any, Any], bool],
                 head_timeout: float, room: Callable[[], int],
                 socket_class: Callable[..., Any] = _stdsocket,
                 max_accept: int = 1024, tls: bool = False) -> None:
        if head_timeout <= 0:
            raise ValueError(f"head_timeout must be positive, got {head_timeout!r}")
        self.head_timeout = head_timeout
        self._listeners = list(listeners)
        self._handoff = handoff
        self._room = room
        self._socket_class = socket_class
        self._max_accept = max(1, max_accept)
        #: A TLS listener: wait for the hello, never answer in clear text.
        self.tls = tls
        # fd -> (deadline, listener index): the connections waiting for their
        # head. One tuple is shared by every connection of one accept batch,
        # so a parked connection costs its dict slot.
        self._parked: dict[int, tuple[float, int]] = {}
        # (deadline, fds accepted in that batch), in order of arrival: the
        # timeout is the same for all, so arrival order is deadline order and
        # a deque is the timer heap. A fd handed over and accepted again later
        # has a later deadline in _parked, which the earlier batch does not
        # match. The entries of connections already gone stay until their
        # batch expires: a list slot each.
        self._deadlines: deque[tuple[float, list[int]]] = deque()
        self._ready: deque[tuple[int, int]] = deque()  # (fd, listener index)
        # fd -> (bytes seen, carry, peek offset on, looks): the scan of a head
        # that was not whole at its first look, resumed where it stopped
        # (:meth:`_look_again`). A head that comes whole costs no entry here.
        self._scans: dict[int, tuple[int, bytes | None, bool, int]] = {}
        self._accepting = False
        self._running = False
        self._warn_paused = PauseWarning()
        self.stats = {"accepted": 0, "handed_over": 0, "timed_out": 0, "too_large": 0,
                      "half_closed": 0, "gone": 0, "accept_paused": 0, "not_tls": 0,
                      # bytes copied out of the kernel by peeks, bytes looked
                      # at for the end of a head (or a TLS record)
                      "peeked_bytes": 0, "scanned_bytes": 0}

    # -- starting and stopping ---------------------------------------------------

    def start(self) -> Lobby:
        hub = gevent.get_hub()
        self._wake = gevent.event.Event()
        self._epoll = _epoll()
        self._epoll_watcher = hub.loop.io(self._epoll.fileno(), 1)
        self._epoll_watcher.start(self._wake.set)
        # Our own non-blocking objects over the listening fds (dups: closing
        # them leaves the server's listeners alone).
        self._accept_socks = []
        self._accept_watchers = []
        for listener in self._listeners:
            own = _stdsocket(fileno=os.dup(listener.fileno()))
            own.setblocking(False)
            self._accept_socks.append(own)
            self._accept_watchers.append(hub.loop.io(own.fileno(), 1))
        self._running = True
        self._set_accepting(True)
        self._greenlet = gevent.spawn(self._run)
        return self

    def stop_accepting(self) -> None:
        """Accept no more (a graceful stop); parked heads go on to the end."""
        self._set_accepting(False)
        for own in self._accept_socks:
            own.close()
        self._accept_socks = []

    def close(self) -> None:
        """Stop and close every connection still waiting: ``503`` to those
        that sent part of a head (they may retry elsewhere), nothing to the rest."""
        if not self._running:
            return
        self.stop_accepting()
        self._running = False
        for fd in list(self._parked):
            self._refuse_at_stop(fd)
        for fd, _ in self._ready:
            self._refuse_at_stop(fd)
        self._parked.clear()
        self._scans.clear()
        self._ready.clear()
        self._deadlines.clear()
        self._epoll_watcher.stop()
        self._epoll.close()
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Connections the lobby holds: parked, or ready for a server slot."""
        return len(self._parked) + len(self._ready)

    def wake(self) -> None:
        """Look again now (a server slot or fds were freed); any greenlet."""
        self._wake.set()

    # -- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        while self._running:
            timeout = None
            if self._deadlines:
                timeout = max(0.0, self._deadlines[0][0] - time.monotonic())
            if self._accept_socks and not self._accepting or self._ready:
                timeout = _RETRY_ACCEPT if timeout is None else min(timeout, _RETRY_ACCEPT)
            self._wake.wait(timeout)
            self._wake.clear()
            if not self._running:
                break
            try:
                self._poll()
                self._hand_over_ready()
                self._accept()
                self._expire()
            except Exception:  # the lobby must outlive any one connection's trouble
                log.exception("lobby step failed")

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        self._accepting = on
        for watcher in self._accept_watchers:
            if on:
                watcher.start(self._wake.set)
            else:
                watcher.stop()

    def _accept(self) -> None:
        if not self._accept_socks:
            return
        room = self._room()
        if room <= 0:
            self._set_accepting(False)  # the listen queue keeps them; looked at again soon
            return
        self._set_accepting(True)
        budget = min(room, self._max_accept)
        deadline = time.monotonic() + self.head_timeout
        batch: list[int] = []
        try:
            for index, own in enumerate(self._accept_socks):
                budget = self._accept_from(own, (deadline, index), budget, batch)
        finally:
            if batch:
                self._deadlines.append((deadline, batch))

    def _accept_from(self, own: Any, key: tuple[float, int], budget: int,
                     batch: list[int]) -> int:
        """Accept up to ``budget`` from one listener; return what is left."""
        while budget > 0:
            try:
                fd, _addr = own._accept()
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                if exc.errno in PAUSE_ERRNOS:
                    self._pause(exc)
                    return 0
                raise
            budget -= 1
            self.stats["accepted"] += 1
            self._parked[fd] = key
            batch.append(fd)
            self._epoll.register(fd, _PARK_MASK)
            # The head often came with the connection: look at once.
            self._look(fd, 0)
        return budget

    def _pause(self, exc: OSError) -> None:
        self._set_accepting(False)
        self.stats["accept_paused"] += 1
        self._warn_paused(exc, log)

    def _poll(self) -> None:
        if not self._parked:
            return
        for fd, mask in self._epoll.poll(0, 4096):
            if fd in self._parked:
                self._look(fd, mask)

    def _look(self, fd: int, mask: int) -> None:
        """Peek at what the client sent; hand over, answer, or keep waiting."""
        scan = self._scans.get(fd)
        if scan is not None:
            self._look_again(fd, mask, *scan)
            return
        data = peek(fd)
        if data == b"" or (data is None and mask & (_EPOLLHUP | _EPOLLERR)):
            self.stats["gone"] += 1
            self._close(fd)
            return
        if data is None:
            return
        self.stats["peeked_bytes"] += len(data)
        self.stats["scanned_bytes"] += len(data)
        state = hello_state(data) if self.tls else head_state(data)
        if state == "partial" and not mask & (_EPOLLRDHUP | _EPOLLHUP):
            # Split over segments: from now on each look peeks and scans
            # only what is new (the kernel keeps the peek offset).
            carry = data[:5] if self.tls else head_carry(data)
            self._scans[fd] = (len(data), carry, set_peek_offset(fd, len(data)), 1)
            return
        self._decide(fd, mask, state)

    def _look_again(self, fd: int, mask: int, seen: int, carry: bytes | None,
                    offset_on: bool, looks: int) -> None:
        """:meth:`_look` for a head partly scanned before: each byte is
        peeked and scanned once where the kernel keeps a peek offset
        (``SO_PEEK_OFF``, TCP since Linux 6.9); without it each look peeks
        the whole buffer again (a copy in the kernel) and scans the new part."""
        if offset_on:
            new = peek_new(fd, MAX_HEAD - seen)
            eof = new == b""
        else:
            whole = peek_new(fd, MAX_HEAD)
            eof = False
            if isinstance(whole, bytes):
                if not whole:  # what was seen cannot vanish unread: a reset
                    whole = OSError()
                else:
                    self.stats["peeked_bytes"] += len(whole)
            new = whole[seen:] if isinstance(whole, bytes) else whole
        if isinstance(new, OSError) or (new is None and mask & (_EPOLLHUP | _EPOLLERR)):
            self.stats["gone"] += 1
            self._close(fd)
            return
        if not new:  # nothing new: a spurious wake-up, or the client's FIN
            if eof or mask & (_EPOLLRDHUP | _EPOLLHUP):
                self.stats["half_closed"] += 1
                self._close(fd, b"" if self.tls else _HALF_CLOSED)
            return
        if offset_on:
            self.stats["peeked_bytes"] += len(new)
        self.stats["scanned_bytes"] += len(new)
        seen += len(new)
        if self.tls:
            state, carry = resume_hello(carry or b"", new, seen)
        else:
            state, carry = resume_head(carry, new, seen)
        if state == "partial" and not mask & (_EPOLLRDHUP | _EPOLLHUP):
            looks += 1
            if looks == MANY_LOOKS:  # tiny segments: have the kernel merge them
                bound_receive_queue(fd)
            self._scans[fd] = (seen, carry, offset_on, looks)
            return
        self._decide(fd, mask, state)

    def _decide(self, fd: int, mask: int, state: str) -> None:
        if state == "complete":
            _, index = self._unpark(fd)
            self._ready.append((fd, index))
            self._hand_over_ready()
        elif state == "too_large":
            self.stats["too_large"] += 1
            self._close(fd, _TOO_LARGE)
        elif state == "plain_http" or state == "not_tls":
            self.stats["not_tls"] += 1
            self._close(fd, _PLAIN_ON_TLS if state == "plain_http" else b"")
        elif mask & (_EPOLLRDHUP | _EPOLLHUP):
            self.stats["half_closed"] += 1
            self._close(fd, b"" if self.tls else _HALF_CLOSED)

    def _hand_over_ready(self) -> None:
        ready = self._ready
        while ready:
            fd, index = ready[0]
            try:
                sock = self._socket_class(fileno=fd)
            except OSError:  # gone meanwhile
                ready.popleft()
                _close_fd(fd)
                continue
            if not self._handoff(sock, self._listeners[index]):
                sock.detach()  # keep the fd; try again when a slot frees
                return
            ready.popleft()
            self.stats["handed_over"] += 1

    def _expire(self) -> None:
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            deadline, batch = deadlines.popleft()
            for fd in batch:
                entry = self._parked.get(fd)
                if entry is not None and entry[0] == deadline:
                    self.stats["timed_out"] += 1
                    self._close(fd, b"" if self.tls else TIMEOUT_RESPONSE)

    # -- leaving the lobby -------------------------------------------------------

    def _unpark(self, fd: int) -> tuple[float, int]:
        entry = self._parked.pop(fd)
        scan = self._scans.pop(fd, None)
        if scan is not None and scan[2]:
            set_peek_offset(fd, -1)  # the server reads (or peeks) from the start
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # ValueError: the lobby is closed
            pass
        return entry

    def _close(self, fd: int, response: bytes = b"") -> None:
        """Answer (best effort, one non-blocking write) and close.

        What the client sent is read first, so that the close is a FIN after
        the answer, not a reset that could destroy the answer in flight.
        """
        if fd in self._parked:
            self._unpark(fd)
        if response:
            try:
                os.set_blocking(fd, False)
                os.write(fd, response)
                _drain(fd)
                _shutdown_write(fd)
            except OSError:
                pass
        _close_fd(fd)

    def _refuse_at_stop(self, fd: int) -> None:
        sent = fd in self._scans or peek(fd)
        self._close(fd, _RESTARTING if sent and not self.tls else b"")


def _shutdown_write(fd: int) -> None:
    sock = _stdsocket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    finally:
        sock.detach()


def _drain(fd: int) -> None:
    for _ in range(16):
        try:
            if not os.read(fd, 65536):
                return
        except OSError:
            return


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
