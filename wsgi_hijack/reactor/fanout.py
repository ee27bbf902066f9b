"""The fan-out: the same bytes to many connections, and the OS threads that share it.

A heartbeat or a message goes to many connections as one bytes object. The
reactor hands a list of fds and the bytes to :func:`write_each`, which writes
each fd once and returns only those that need the slow path (bytes waiting,
a short write, an error); nothing here touches a connection object or the
reactor's state, so a part of the list may be written in another OS thread
(:class:`Sender`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from itertools import repeat
from typing import Any

from gevent import monkey

log = logging.getLogger("wsgi_hijack.reactor")
_write = os.write

# WSGI_HIJACK_SEND_THREADS=K (default 1) spreads each fan-out (a heartbeat
# round, a message) over K OS threads (write() releases the GIL). It is
# opt-in, and used only for fan-outs of at least this many connections:
# below that it did not pay, above it it shortened the write run at about
# the same CPU per heartbeat (benchmarks/results/results.md, rows
# "hijack-threads"; benchmarks/results/threads/results.md).
THREADED_MIN = 10000
_start_thread = monkey.get_original("_thread", "start_new_thread")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_native_thread_id = monkey.get_original("_thread", "get_native_id")


def write_each_py(fds: list[int], data: bytes) -> list[tuple[int, int | None]]:
    """Write ``data`` once to each fd; return ``(fd, sent)`` for those that
    need the slow path (``sent`` None: the write raised).

    The fallback for :mod:`wsgi_hijack._fanout` (the same loop in C, which
    is faster on a real round), with the same results. The loop runs in C:
    ``map(os.write, ...)`` drained by ``list.extend``, so the Python cost
    per connection is one builtin call on an int from a list, touching no
    object of the connection's: a bytecode loop that read each connection's
    protocol and buffer cost more, most of all with the cold caches a round
    has, the kernel's send path evicting them between two connections
    (``benchmarks/fanout_loop.py``; benchmarks/results/results.md). A write
    that raises (would block, or the client is gone) stops ``extend``; the
    fd it failed on has been consumed from the shared iterator, so it is
    marked -1 and the loop goes on after it.
    Touches no reactor state, so it may run in any OS thread.
    """
    results: list[int] = []
    remaining = iter(fds)
    same = repeat(data)
    while True:
        try:
            results.extend(map(_write, remaining, same))
            break
        except OSError:  # would block: buffered; an error: dropped (by _write)
            results.append(-1)
    size = len(data)
    if results.count(size) == len(results):  # the common case: all taken whole
        return []
    return [(fd, None if sent < 0 else sent)
            for fd, sent in zip(fds, results, strict=True) if sent != size]


try:  # the same loop in C, built with the package where a compiler is found
    from .._fanout import write_each as write_each_c
except ImportError:  # pragma: no cover - an install without the C extension
    write_each_c = None

#: The fan-out loop in use: C (wsgi_hijack/_fanout.c) if it was built, else Python.
write_each = write_each_c or write_each_py


class Sender:
    """A real OS thread (not a greenlet, even when monkeypatched) that writes
    one part of a fan-out."""

    def __init__(self) -> None:
        self._go = _allocate_lock()
        self._go.acquire()
        self._done = _allocate_lock()
        self._done.acquire()
        self._work: tuple[list[int], bytes | None] = ([], b"")
        self._trouble: list = []
        # The kernel's id of the thread (shown in /proc/self/task), so that
        # tools and tests can follow this thread and no other.
        self.native_id: int | None = None
        _start_thread(self._loop, ())

    def _loop(self) -> None:
        self.native_id = _native_thread_id()
        while True:
            self._go.acquire()
            fds, data = self._work
            if data is None:  # stop()
                return
            try:
                self._trouble = write_each(fds, data)
            except BaseException:  # never leave the reactor waiting in join()
                log.exception("sender thread failed; its part goes the slow way")
                self._trouble = [(fd, None) for fd in fds]
            finally:
                self._done.release()

    def start(self, fds: list[int], data: bytes) -> None:
        self._work = (fds, data)
        self._go.release()

    def stop(self) -> None:
        self._work = ([], None)
        self._go.release()

    def join(self) -> list:
        self._done.acquire()
        self._work = ([], b"")
        return self._trouble


def fan_out(data: bytes, group: dict[int, Any], armed: set[int], senders: list[Sender],
            slow: Callable[[Any, bytes], None]) -> None:
    """Write the same ``data`` to every connection in ``group`` (fd -> conn).

    The hot loop of heartbeats and messages: one write() per connection,
    run in C by :func:`write_each`. The kernel's send path is most of the
    cost, so the Python around it is one list copy and one builtin call per
    fd. Anything unusual -- bytes already waiting (``armed``), a full send
    buffer, an error, a partial write -- goes to ``slow(conn, rest)``, which
    buffers or drops.
    """
    if armed:  # these get it behind the bytes they are waiting to send
        waiting = [group[fd] for fd in armed if fd in group]
        fds = [fd for fd in group if fd not in armed]
    else:
        waiting = []
        fds = list(group)
    if senders and len(fds) >= THREADED_MIN:
        # Spread the writes over the senders and this thread; write()
        # releases the GIL. The senders only write; what they could not,
        # this thread handles after the join.
        k = len(senders) + 1
        step = -(-len(fds) // k)
        for i, sender in enumerate(senders, 1):
            sender.start(fds[i * step:(i + 1) * step], data)
        trouble = write_each(fds[:step], data)
        for sender in senders:
            trouble += sender.join()
    else:
        trouble = write_each(fds, data)
    for fd, sent in trouble:
        conn = group.get(fd)
        if conn is not None and conn.fd >= 0:
            slow(conn, data if sent is None else data[sent:])
    for conn in waiting:
        if conn.fd >= 0:
            slow(conn, data)


def ignore_sigpipe() -> None:
    # Writes to a client that reset would raise SIGPIPE and kill the process
    # unless it is ignored; CPython ignores it at startup, but an embedding
    # program may not have.
    if threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGPIPE) != signal.SIG_IGN:
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)
