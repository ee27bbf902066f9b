"""One load-client process: opens its share of the connections and holds them.

Started by :mod:`wsgi_hijack.loadclient` as ``python -m wsgi_hijack.loadclient_worker``
with its settings as one JSON line on stdin. It speaks JSON lines on stdout:

- ``armed`` (storm only) once every socket is made: the parent writes ``go``
  when all worker processes are armed, and each then issues all its connects
  in one loop;
- ``progress`` every ``progress`` seconds (counts so far);
- ``ready`` once every connection got its response head or was given up on;
- ``marked`` after the parent wrote ``mark`` (the start of the hold window:
  each connection's message count is noted);
- ``final`` after the parent wrote ``stop`` (or closed stdin): the counts and,
  per held connection, the messages received in total and since the mark,
  and the moment (``time.monotonic()``, one clock for all processes) each
  response head arrived: the parent turns them into heads over time.

Everything is one single-threaded ``epoll`` loop over non-blocking sockets.
Connects are paced: at most ``window`` connections are between ``connect()``
and their response head at any time (so a connect storm does not overflow the
server's listen backlog), optionally at most ``rate`` new connects a second.
A connect refused or reset before the head is retried after a short pause.

A **storm** (``storm`` in the settings) is the other way round: nothing is
paced and nothing is retried, because what the server does to clients that
all arrive at once is what is measured. Every connection's socket is made
(and bound to the source address) first, and the connects go out back to
back on the parent's ``go``. Each client ends as exactly one of: holding
(or dropped after its head), *closed without an answer* (the connect
succeeded, then the server closed or reset it before a response head),
connect failed, no head within ``head_timeout``, or a non-2xx answer.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket
import sys
import time
from collections import deque

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLRDHUP = select.EPOLLRDHUP
_HEAD_END = b"\r\n\r\n"
_MAX_HEAD = 16384
_RETRY_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE,
                 errno.EAGAIN, errno.EADDRNOTAVAIL, errno.ECONNABORTED}
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# Connection states
CONNECTING, AWAIT_HEAD, STREAMING = 0, 1, 2


class Conn:
    __slots__ = ("sock", "state", "buf", "count", "mark", "tries", "chunked", "started")

    def __init__(self, sock: socket.socket, tries: int, now: float) -> None:
        self.sock = sock
        self.state = CONNECTING
        self.buf = b""
        self.count = 0  # newlines (plain) or CRLFs (chunked) received after the head
        self.mark = 0
        self.tries = tries
        self.chunked = False
        self.started = now

    def messages(self, since_mark: bool = False) -> int:
        n = self.count - (self.mark if since_mark else 0)
        return n // 2 if self.chunked else n  # a chunk is "size CRLF data CRLF"


class Worker:
    def __init__(self, cfg: dict) -> None:
        self.n = int(cfg["n"])
        self.host = cfg["host"]
        self.port = int(cfg["port"])
        self.source = cfg.get("source")
        self.window = max(1, int(cfg.get("window", 1000)))
        self.rate = float(cfg.get("rate", 0) or 0)
        self.max_tries = int(cfg.get("retries", 30)) + 1
        self.head_timeout = float(cfg.get("head_timeout", 60))
        self.progress = float(cfg.get("progress", 1.0))
        self.request = cfg["request"].encode("latin-1")
        self.family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.pending: dict[int, Conn] = {}  # not yet streaming
        self.retry: deque[tuple[float, int]] = deque()  # (not before, tries so far)
        self.to_open = self.n
        self.storm = bool(cfg.get("storm"))
        if self.storm:  # one shot each: a storm measures who is answered, not persistence
            self.window = max(1, self.n)
            self.rate = 0.0
            self.max_tries = 1
        # closed_without_answer, timed_out, connect_failed: why a connect got no
        # head. In a storm each client counts once; paced, each attempt (retried).
        self.counts = {"attempts": 0, "opened": 0, "headed": 0, "dropped": 0, "failed": 0,
                       "retries": 0, "closed_without_answer": 0, "timed_out": 0,
                       "connect_failed": 0, "errors": {}}
        self.head_times: list[float] = []
        self.armed: list[socket.socket] = []
        self.t_first = None
        self.t_ready = None
        self.t_last_head = None
        self.tokens = 0.0
        self.last_tokens = time.monotonic()

    # -- output -------------------------------------------------------------------

    def emit(self, kind: str, **fields) -> None:
        fields["type"] = kind
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def snapshot(self) -> dict:
        c = dict(self.counts)
        c["held"] = len(self.conns) - len(self.pending)
        c["pending"] = len(self.pending)
        c["messages"] = sum(conn.messages() for conn in self.conns.values()
                            if conn.state == STREAMING)
        return c

    # -- opening ------------------------------------------------------------------------

    def open_more(self, now: float) -> None:
        if self.rate:
            self.tokens = min(self.tokens + (now - self.last_tokens) * self.rate,
                              max(1.0, self.rate / 10))
            self.last_tokens = now
        while len(self.pending) < self.window:
            if self.retry and self.retry[0][0] <= now:
                tries = self.retry.popleft()[1]
            elif self.to_open > 0:
                self.to_open -= 1
                tries = 0
            else:
                return
            if self.rate:
                if self.tokens < 1:
                    # Put it back and wait for tokens.
                    if tries:
                        self.retry.appendleft((now, tries))
                    else:
                        self.to_open += 1
                    return
                self.tokens -= 1
            self.connect(tries, now)

    def new_socket(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        if self.source:
            # The port is chosen at connect(), per destination: a source address
            # then reaches the whole ephemeral range for each server port.
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((self.source, 0))
        return sock

    def arm(self) -> None:
        """Storm: make every socket before the signal, so that the connects
        themselves go out back to back (a socket and a bind cost more than a
        non-blocking connect)."""
        self.armed = [self.new_socket() for _ in range(self.to_open)]

    def fire(self, now: float) -> None:
        """Storm: every connect at once, nothing between them."""
        armed, self.armed = self.armed, []
        self.to_open -= len(armed)
        for sock in armed:
            self.connect(0, now, sock)

    def connect(self, tries: int, now: float, sock: socket.socket | None = None) -> None:
        if self.t_first is None:
            self.t_first = now
        self.counts["attempts"] += 1
        try:
            if sock is None:
                sock = self.new_socket()
            err = sock.connect_ex((self.host, self.port))
        except OSError as exc:
            err = exc.errno
        if err not in (0, errno.EINPROGRESS):
            if sock is not None:
                sock.close()
            self.counts["connect_failed"] += 1
            self.again(tries, err, now)
            return
        conn = Conn(sock, tries + 1, now)
        fd = sock.fileno()
        self.conns[fd] = conn
        self.pending[fd] = conn
        self.ep.register(fd, EPOLLOUT | EPOLLIN | EPOLLRDHUP)

    def again(self, tries: int, err: int | None, now: float, why: str | None = None) -> None:
        """Count a connect that got no head (``why``: the counter to add one to),
        then retry it or give up."""
        if why:
            self.counts[why] += 1
        name = errno.errorcode.get(err or 0, str(err))
        errors = self.counts["errors"]
        errors[name] = errors.get(name, 0) + 1
        if tries + 1 >= self.max_tries or (err is not None and err not in _RETRY_ERRNOS):
            self.counts["failed"] += 1
            return
        self.counts["retries"] += 1
        self.retry.append((now + min(0.05 * 2 ** tries, 1.0), tries + 1))

    def close(self, fd: int, conn: Conn) -> None:
        del self.conns[fd]
        self.pending.pop(fd, None)
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        conn.sock.close()

    # -- events ---------------------------------------------------------------------------

    def on_event(self, fd: int, mask: int, now: float) -> None:
        conn = self.conns.get(fd)
        if conn is None:
            return
        if conn.state == STREAMING:
            self.on_stream(fd, conn)
            return
        if conn.state == CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(fd, conn)
                # Linux reports a reset during the handshake as ECONNREFUSED;
                # ECONNRESET (or EPIPE) means it was established, then reset
                # before this loop saw it writable.
                why = ("closed_without_answer" if err in (errno.ECONNRESET, errno.EPIPE)
                       else "connect_failed")
                self.again(conn.tries - 1, err, now, why)
                return
            if not mask & EPOLLOUT:
                return
            self.counts["opened"] += 1  # TCP connects that completed, retries included
            try:
                conn.sock.send(self.request)
            except OSError as exc:
                self.close(fd, conn)
                self.again(conn.tries - 1, exc.errno, now, "closed_without_answer")
                return
            conn.state = AWAIT_HEAD
            self.ep.modify(fd, EPOLLIN | EPOLLRDHUP)
            return
        # AWAIT_HEAD
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(fd, conn)
            self.again(conn.tries - 1, exc.errno, now, "closed_without_answer")
            return
        if not data:  # closed before a whole head: recorded as a reset (ECONNRESET)
            self.close(fd, conn)
            self.again(conn.tries - 1, errno.ECONNRESET, now, "closed_without_answer")
            return
        buf = conn.buf + data
        end = buf.find(_HEAD_END)
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self.close(fd, conn)
                self.again(self.max_tries, None, now)
            else:
                conn.buf = buf
            return
        head, rest = buf[:end], buf[end + 4:]
        conn.buf = b""
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 0
        if not self.head_ok(status):
            self.close(fd, conn)
            errors = self.counts["errors"]
            errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
            self.counts["failed"] += 1
            return
        conn.chunked = b"transfer-encoding: chunked" in head.lower()
        conn.state = STREAMING
        del self.pending[fd]
        self.counts["headed"] += 1
        self.t_last_head = now
        self.head_times.append(now)
        self.count(conn, rest)

    def head_ok(self, status: int) -> bool:
        """Whether a response head with ``status`` starts a stream (a subclass
        speaking WebSocket takes 101)."""
        return 200 <= status < 300

    def on_command(self, cmd: str) -> None:
        """A command line from the parent other than ``mark`` and ``stop``
        (none here; a subclass may take its own)."""

    def count(self, conn: Conn, data: bytes) -> None:
        if conn.chunked:
            if conn.buf:  # a CR that ended the last read
                data = conn.buf + data
            conn.count += data.count(b"\r\n")
            conn.buf = b"\r" if data.endswith(b"\r") else b""
        else:
            conn.count += data.count(b"\n")

    def on_stream(self, fd: int, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close(fd, conn)
            self.counts["dropped"] += 1
            return
        self.count(conn, data)

    def expire(self, now: float) -> None:
        for fd, conn in list(self.pending.items()):
            if now - conn.started > self.head_timeout:
                self.close(fd, conn)
                self.again(conn.tries - 1, errno.ETIMEDOUT, now, "timed_out")

    # -- the loop -----------------------------------------------------------------------

    def run(self, control) -> None:
        ctl_fd = control.fileno()
        ctl_buf = b""
        if self.storm:
            self.arm()
            self.emit("armed", sockets=len(self.armed))
            ctl_buf, go = _read_line(ctl_fd)
            if go != b"go":
                self.armed.clear()  # the parent went away or stopped before the start
                return
            self.fire(time.monotonic())
        self.ep.register(ctl_fd, EPOLLIN)
        next_progress = time.monotonic()
        next_expire = next_progress + 1.0
        stopping = False
        while not stopping:
            now = time.monotonic()
            self.open_more(now)
            if self.t_ready is None and not self.pending and not self.retry and not self.to_open:
                self.t_ready = now
                self.emit("ready", t_first=self.t_first, t_last_head=self.t_last_head,
                          t_ready=now, **self.snapshot())
            if now >= next_progress:
                self.emit("progress", t=now, **self.snapshot())
                next_progress = now + self.progress
            if now >= next_expire:
                self.expire(now)
                next_expire = now + 1.0
            timeout = min(next_progress, next_expire) - now
            if self.retry or (self.rate and self.to_open):
                timeout = min(timeout, 0.01)
            for fd, mask in self.ep.poll(max(0.0, timeout), 4096):
                if fd == ctl_fd:
                    chunk = os.read(ctl_fd, 4096)
                    if not chunk:
                        stopping = True
                        break
                    ctl_buf += chunk
                    while b"\n" in ctl_buf:
                        line, ctl_buf = ctl_buf.split(b"\n", 1)
                        cmd = line.strip().decode()
                        if cmd == "mark":
                            for conn in self.conns.values():
                                conn.mark = conn.count
                            self.emit("marked", t=time.monotonic())
                        elif cmd == "stop":
                            stopping = True
                        elif cmd:
                            self.on_command(cmd)
                    continue
                self.on_event(fd, mask, now)
        streaming = [c for c in self.conns.values() if c.state == STREAMING]
        final = self.snapshot()
        final.update(
            t_first=self.t_first, t_last_head=self.t_last_head, t_ready=self.t_ready,
            messages_total=[c.messages() for c in streaming],
            messages_window=[c.messages(since_mark=True) for c in streaming],
            head_times=[round(t, 4) for t in self.head_times],
        )
        self.emit("final", **final)
        for conn in list(self.conns.values()):
            conn.sock.close()


def _read_line(fd: int) -> tuple[bytes, bytes]:
    """Block for one command line on ``fd``: (what came after it, the line);
    the line is ``b""`` when the other end closed."""
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"", b""
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return rest, line.strip()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    control = sys.stdin.buffer
    cfg = json.loads(control.readline())
    # From here on stdin is read through its fd (unbuffered), in the epoll loop.
    Worker(cfg).run(os.fdopen(os.dup(control.fileno()), "rb", buffering=0))


if __name__ == "__main__":
    main()
