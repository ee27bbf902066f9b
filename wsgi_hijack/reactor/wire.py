"""The wire: the reactor's only code that makes syscalls on client fds.

One ``epoll`` set for every held connection, non-blocking ``read`` and
``write``, what waits in each connection's ``outbuf``, and the close. It
decides nothing about a connection's life: each call says what happened
(a reason to drop it, or None), and the reactor (:mod:`.core`) acts on it.
Bytes given here are wire bytes: on a TLS connection they are records
already encrypted for it (``Reactor._write``).
"""

from __future__ import annotations

import os
import select as _select_module
from typing import Any

from gevent import monkey

from ..connection import Connection, State

# gevent's monkeypatching removes select.epoll; the original is still there.
_epoll = monkey.get_original("select", "epoll")
EPOLLIN = _select_module.EPOLLIN
EPOLLOUT = _select_module.EPOLLOUT
READ_MASK = EPOLLIN | _select_module.EPOLLRDHUP
CLOSED_MASK = READ_MASK | _select_module.EPOLLHUP | _select_module.EPOLLERR
_POLL_BATCH = 4096
_READ_SIZE = 65536
_write = os.write
_read = os.read


class Wire:
    __slots__ = ("max_buffer", "epoll", "armed")

    def __init__(self, max_buffer: int) -> None:
        #: The most bytes one connection may have waiting; past it, it is slow.
        self.max_buffer = max_buffer
        self.epoll: Any = None
        #: fds whose writes take the per-connection path: bytes waiting in
        #: their outbuf (armed for EPOLLOUT), which a fan-out must not write
        #: past, and TLS connections, which need their own records.
        self.armed: set[int] = set()

    def open(self) -> int:
        """Make the epoll set; returns its fd, for the hub to watch."""
        self.epoll = _epoll()
        return self.epoll.fileno()

    def close(self) -> None:
        self.epoll.close()

    def watch(self, conn: Connection) -> None:
        """Start reading ``conn``; raises OSError when its fd cannot be watched."""
        self.epoll.register(conn.fd, READ_MASK)
        if conn.tls is not None:
            self.armed.add(conn.fd)

    def events(self) -> list[tuple[int, int]]:
        """What is ready now, without waiting (at most a batch; more follows)."""
        return self.epoll.poll(0, _POLL_BATCH)

    @staticmethod
    def full_batch(events: list) -> bool:
        return len(events) >= _POLL_BATCH

    @staticmethod
    def read(conn: Connection) -> bytes | None:
        """What the client sent; None when nothing is there, b"" when it left."""
        try:
            return _read(conn.fd, _READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def send(self, conn: Connection, data: bytes) -> str | None:
        """Write ``data`` behind what waits; returns why to drop ``conn``, if so."""
        if conn.outbuf:
            if len(conn.outbuf) + len(data) > self.max_buffer:
                return "dropped_slow"
            conn.outbuf += data
            return None
        try:
            sent = _write(conn.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return "dropped_closed"
        if sent < len(data):
            if len(data) - sent > self.max_buffer:
                return "dropped_slow"
            conn.outbuf = data[sent:]
            self.epoll.modify(conn.fd, READ_MASK | EPOLLOUT)
            self.armed.add(conn.fd)
        return None

    def flush(self, conn: Connection) -> str | None:
        """Write what waits (the fd is writable); returns why to drop, if so."""
        data = conn.outbuf
        try:
            sent = _write(conn.fd, data)
        except BlockingIOError:
            return None
        except OSError:
            return "dropped_closed"
        conn.outbuf = data[sent:]
        if not conn.outbuf and not conn.closing:
            self.epoll.modify(conn.fd, READ_MASK)
            if conn.tls is None:
                self.armed.discard(conn.fd)
        return None

    @staticmethod
    def last_words(conn: Connection, data: bytes) -> None:
        """What waits, then ``data``: one non-blocking write, whatever the
        kernel takes (the connection is closed right after)."""
        if data or conn.outbuf:
            try:
                _write(conn.fd, conn.outbuf + data)
            except OSError:
                pass

    def forget(self, conn: Connection) -> None:
        """Stop watching ``conn`` and close its fd."""
        self.armed.discard(conn.fd)
        try:
            self.epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        close_fd(conn)


def close_fd(conn: Connection) -> None:
    fd, conn.fd, conn.outbuf, conn.tls = conn.fd, -1, b"", None
    conn.state = State.CLOSED
    try:
        os.close(fd)
    except OSError:
        pass
