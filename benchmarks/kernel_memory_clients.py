"""Clients and a plain holder for ``benchmarks/kernel_memory.py``.

**Clients.** Each client process is a :class:`wsgi_hijack.loadclient_worker.Worker`
(its paced connects, its source address, its JSON lines to the parent) with
three changes (:class:`HoldWorker`):

- ``websocket`` in its settings: the request is a WebSocket upgrade and a
  ``101`` head starts the stream (pings are not answered: the server runs
  with a pong timeout longer than the run);
- ``mss`` and ``rcvbuf`` in its settings: ``TCP_MAXSEG`` and ``SO_RCVBUF``,
  set on each socket before it connects;
- it counts bytes, and messages by a marker byte (``!``) that every
  benchmark message carries once and nothing else sends;
- three reading modes, switched by a command from the parent: ``read``
  (drain every socket as data comes: the buffers stay near empty), ``pause``
  (stop reading: the client's receive buffer fills, then the server's send
  buffer, then whatever the server buffers itself; a close is still seen
  and counted as dropped) and ``freeze`` (no event at all, not even a close:
  the sockets are only kept).

**The plain holder** (``--holder PORT``): a listening socket that accepts
every connection, registers it in one ``epoll`` set, reads its request and
answers with a bare ``200`` head (``101`` for an upgrade), then holds it and
drains what comes. On ``SIGUSR1`` it closes every connection it holds. It
is the other end for measuring the clients' own kernel memory
(:func:`kernel_memory.client_side`).

    python benchmarks/kernel_memory_clients.py                 # a client: settings on stdin
    python benchmarks/kernel_memory_clients.py --holder 20001  # the plain holder
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's wsgi_hijack
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/

import fleet  # noqa: E402

from harness.servers import raise_nofile  # noqa: E402
from wsgi_hijack.loadclient import _WorkerProc  # noqa: E402
from wsgi_hijack.loadclient_worker import STREAMING, Worker  # noqa: E402

MARKER = "!"
_MASKS = {"read": select.EPOLLIN | select.EPOLLRDHUP, "pause": select.EPOLLRDHUP, "freeze": 0}
_GONE = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# Any well-formed key will do: the server's answer is not checked.
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def request(path: str, port: int, websocket: bool) -> str:
    """The request each client sends: a GET, or a WebSocket upgrade."""
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kernel-memory-bench\r\n"
    if websocket:
        head += (f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
                 "Sec-WebSocket-Version: 13\r\n")
    return head + "\r\n"


class HoldWorker(Worker):
    """A load-client worker that counts marked messages and can stop reading."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.websocket = bool(cfg.get("websocket"))
        self.marker = cfg.get("marker", MARKER).encode()
        self.mode = "read"
        self.bytes = 0
        self.delivered = 0
        self.mss = int(cfg.get("mss") or 0)
        self.rcvbuf = int(cfg.get("rcvbuf") or 0)

    def new_socket(self) -> socket.socket:
        sock = super().new_socket()
        if self.mss:  # before connect: the MSS this client announces in its SYN
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.mss)
        if self.rcvbuf:  # before connect: fixes the receive window, no autotuning
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        return sock

    def head_ok(self, status: int) -> bool:
        return status == 101 if self.websocket else super().head_ok(status)

    def count(self, conn, data: bytes) -> None:
        self.bytes += len(data)
        self.delivered += data.count(self.marker)

    def on_command(self, cmd: str) -> None:
        if cmd not in _MASKS:
            return
        self.mode = cmd
        for fd, conn in self.conns.items():
            if conn.state == STREAMING:
                self.ep.modify(fd, _MASKS[cmd])
        self.emit("mode", t=time.monotonic(), **self.snapshot())  # with the mode

    def on_event(self, fd: int, mask: int, now: float) -> None:
        conn = self.conns.get(fd)
        if conn is not None and conn.state == STREAMING and self.mode != "read":
            if mask & _GONE:  # closed by the server while we were not reading
                self.close(fd, conn)
                self.counts["dropped"] += 1
            return
        super().on_event(fd, mask, now)

    def snapshot(self) -> dict:
        c = super().snapshot()
        c.update(bytes=self.bytes, delivered=self.delivered, mode=self.mode)
        return c


class ClientProc(_WorkerProc):
    """One client process (this file run as a script)."""

    command = (sys.executable, str(Path(__file__).resolve()))


class Fleet(fleet.Fleet):
    """Client processes holding ``n`` connections to ``port`` between them, one
    per source address, spoken to as the load client speaks to its workers."""

    poll = 0.1

    def __init__(self, port: int, path: str, n: int, sources: list[str], websocket: bool,
                 window: int = 1000, progress: float = 0.5, mss: int = 0,
                 rcvbuf: int = 0) -> None:
        shares = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))]
        req = request(path, port, websocket)
        self.n = n
        super().__init__([ClientProc(i, {"n": share, "source": src, "host": "127.0.0.1",
                                         "port": port, "request": req, "websocket": websocket,
                                         "window": max(1, window // len(sources)), "rate": 0,
                                         "retries": 30, "head_timeout": 120,
                                         "progress": progress, "mss": mss, "rcvbuf": rcvbuf})
                          for i, (share, src) in enumerate(zip(shares, sources, strict=True))
                          if share])

    def connect(self, timeout: float, tick=None) -> bool:
        """Until every process has each of its connections held or given up."""
        return self.until(lambda: all(p.ready for p in self.procs), timeout, tick)

    def mode(self, mode: str, timeout: float = 30.0) -> None:
        """Switch every client to ``read``, ``pause`` or ``freeze``; wait until done."""
        self.send(mode)
        if not self.until(lambda: all(p.last.get("mode") == mode for p in self.procs),
                          timeout):
            raise RuntimeError(f"the clients did not switch to {mode!r} in {timeout:g} s")

    def settle(self, seconds: float, tick=None) -> None:
        """Keep reading the processes' reports for ``seconds``."""
        self.until(lambda: False, seconds, tick)


# -- the plain holder ------------------------------------------------------------------------

def hold(port: int) -> None:
    """Accept, answer and hold every connection to 127.0.0.1:``port`` (see the module)."""
    raise_nofile()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    held: dict[int, list] = {}  # fd -> [socket, request bytes so far or None once answered]
    closing = []
    signal.signal(signal.SIGUSR1, lambda *_: closing.append(True))
    while True:
        if closing:
            closing.clear()
            for fd, (sock, _) in list(held.items()):
                ep.unregister(fd)
                sock.close()
            held.clear()
            print(f"holder: closed every connection at {time.monotonic():.3f}", flush=True)
        try:
            events = ep.poll(1.0)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == listener.fileno():
                _accept(listener, ep, held)
                continue
            entry = held.get(fd)
            if entry is None:
                continue
            try:
                data = entry[0].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                ep.unregister(fd)
                entry[0].close()
                del held[fd]
            elif entry[1] is not None:
                entry[1] += data
                if b"\r\n\r\n" in entry[1]:
                    upgrade = b"upgrade: websocket" in entry[1].lower()
                    entry[0].send(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" if upgrade
                                  else b"HTTP/1.1 200 OK\r\n\r\n")
                    entry[1] = None


def _accept(listener: socket.socket, ep, held: dict) -> None:
    while True:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of fds: leave the rest in the backlog
            print(f"holder: accept failed: {exc}", flush=True)
            return
        sock.setblocking(False)
        ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        held[sock.fileno()] = [sock, b""]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--holder":
        hold(int(sys.argv[2]))
        return
    # As wsgi_hijack.loadclient_worker.main, with this worker.
    raise_nofile()
    control = sys.stdin.buffer
    cfg = json.loads(control.readline())
    HoldWorker(cfg).run(os.fdopen(os.dup(control.fileno()), "rb", buffering=0))


if __name__ == "__main__":
    main()
