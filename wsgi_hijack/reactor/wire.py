"""The wire: everything between a protocol's bytes and a client's fd.

One ``epoll`` set for every held connection, non-blocking ``read`` and
``write``, the TLS records of a TLS connection, what waits in each
connection's ``outbuf``, a replay handed out as the socket drains, and the
close. It decides nothing about a connection's life: each call says what
happened (a reason to drop it, or None), and the reactor (:mod:`.core`)
acts on it. This is the reactor's only code that makes syscalls on client
fds.

The cap: a connection may have ``max_buffer`` bytes of live traffic
waiting; past it the client has stopped reading and is dropped as slow. A
replay (:class:`~wsgi_hijack.connection.CatchUp`) is not live traffic: it
is handed out frame by frame while less than the cap waits, so it arrives
whole however large, and buffers no more than live traffic does.
"""

from __future__ import annotations

import logging
import os
import select as _select_module
from typing import Any

from gevent import monkey

from ..connection import CatchUp, Connection, State
from ..tls import TLSError

log = logging.getLogger("wsgi_hijack.reactor")

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

    def decrypt(self, conn: Connection, wire: bytes) -> tuple[bytes, str | None]:
        """The plain text in ``wire`` for a TLS connection, and why to drop it,
        if so. What TLS answers by itself (a key update)
        is written; a peer that breaks TLS gets the alert, if any."""
        assert conn.tls is not None
        try:
            plain, out = conn.tls.receive(wire)
        except TLSError as exc:
            log.info("closing fd %d: %s", conn.fd, exc)
            self.last_words(conn, exc.goodbye)
            return b"", "dropped_protocol"
        return plain, self.send(conn, out) if out else None

    def write(self, conn: Connection, data: bytes) -> str | None:
        """Write the protocol's ``data`` (encrypted for a TLS connection),
        behind any replay still draining; returns why to drop ``conn``, if so."""
        catch_up = conn.catch_up
        if catch_up is not None:
            catch_up.live += len(data)
            if catch_up.live > self.max_buffer:
                return "dropped_slow"
            catch_up.frames.append(data)
            return None
        tls = conn.tls
        return self.send(conn, data if tls is None else tls.encrypt(data))

    def catch_up(self, conn: Connection, frames: list[bytes]) -> str | None:
        """Write a replay as the socket drains, ahead of what follows."""
        if conn.catch_up is not None:  # a second one queues behind the first
            conn.catch_up.frames.extend(frames)
            conn.catch_up.replayed += len(frames)
            return None
        conn.catch_up = CatchUp(frames)
        self.armed.add(conn.fd)  # the fan-out must not write past it
        return self.pump(conn)

    def pump(self, conn: Connection, everything: bool = False) -> str | None:
        """Hand the replay's frames to the socket while less than the cap
        waits (``everything``: all of it, for a response that ends now)."""
        catch_up = conn.catch_up
        assert catch_up is not None
        frames, tls, cap = catch_up.frames, conn.tls, self.max_buffer
        while frames and (everything or len(conn.outbuf) < cap):
            frame = frames.popleft()
            if catch_up.replayed:
                catch_up.replayed -= 1
            else:
                catch_up.live -= len(frame)
            reason = self.send(conn, frame if tls is None else tls.encrypt(frame),
                               capped=False)
            if reason is not None:
                return reason
        if not frames:
            conn.catch_up = None
            if not conn.outbuf and tls is None:
                self.armed.discard(conn.fd)
        return None

    def send(self, conn: Connection, data: bytes, capped: bool = True) -> str | None:
        """Write wire bytes behind what waits; returns why to drop ``conn``, if
        so. ``capped``: past the cap the client is slow (live traffic)."""
        if conn.outbuf:
            if capped and len(conn.outbuf) + len(data) > self.max_buffer:
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
            if capped and len(data) - sent > self.max_buffer:
                return "dropped_slow"
            conn.outbuf = data[sent:]
            self.epoll.modify(conn.fd, READ_MASK | EPOLLOUT)
            self.armed.add(conn.fd)
        return None

    def flush(self, conn: Connection) -> str | None:
        """Write what waits (the fd is writable), then more of a replay;
        returns why to drop, if so."""
        data = conn.outbuf
        try:
            sent = _write(conn.fd, data)
        except BlockingIOError:
            return None
        except OSError:
            return "dropped_closed"
        conn.outbuf = data[sent:]
        if conn.catch_up is not None and len(conn.outbuf) < self.max_buffer:
            reason = self.pump(conn)
            if reason is not None:
                return reason
        if not conn.outbuf and not conn.closing:
            self.epoll.modify(conn.fd, READ_MASK)
            if conn.tls is None and conn.catch_up is None:
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
    fd, conn.fd, conn.outbuf, conn.tls, conn.catch_up = conn.fd, -1, b"", None, None
    conn.state = State.CLOSED
    try:
        os.close(fd)
    except OSError:
        pass
