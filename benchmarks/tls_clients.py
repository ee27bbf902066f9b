"""Client processes for ``benchmarks/tls.py``: SSE streams over TLS (or plain TCP), held.

Each process is the load client's worker (:class:`wsgi_hijack.loadclient_worker.Worker`:
its share of the streams from its own source address, one single-threaded
``epoll`` loop over non-blocking sockets) with TLS added: after the TCP
connect, the socket is wrapped by :mod:`ssl` (the certificate is verified
against ``cafile``, host name ``localhost``) and the handshake is driven by
the loop (``SSLWantReadError`` / ``SSLWantWriteError``). Then it sends the
``GET``, waits for a ``200`` head and counts, per stream:

- heartbeats: SSE comments ``: ping`` (the server's heartbeat);
- published messages: ``data: tlsbench-K`` lines, each with the moment
  (``time.monotonic()``, one clock for every process on the host) it was
  read, for publish-to-receive latency.

Connects are paced: at most ``window`` streams between ``connect()`` and
their response head at once, and at most ``rate`` new connects a second
(the handshakes cost CPU on both sides, which share the host's cores).

The parent (:class:`TLSFleet`) writes its settings as one JSON line on
stdin, then commands: ``mark`` (note every stream's heartbeat count: the
start of the measured window; answered ``marked``), ``tally`` (heartbeats
since the mark, per stream: answered ``tally``), ``stop`` (answered
``final``, with every message's receive times). The process reports
``progress`` every ``progress`` seconds and ``ready`` once every stream got
its head or was given up on.

    python benchmarks/tls_clients.py        # settings on stdin (benchmarks/tls.py starts it)
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import ssl
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's wsgi_hijack
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/

import fleet  # noqa: E402

from harness.servers import raise_nofile  # noqa: E402
from wsgi_hijack.loadclient import _WorkerProc  # noqa: E402
from wsgi_hijack.loadclient_worker import CONNECTING, STREAMING, Conn, Worker  # noqa: E402

HEARTBEAT = b": ping\n"
MESSAGE = b"data: tlsbench-"
#: The server's certificate names this host (harness.tls.make_certificate).
SERVER_NAME = "localhost"
#: Between the TCP connect and the request: the TLS handshake.
HANDSHAKE = 3


class NonBlockingSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` whose reads say "nothing yet" as a plain non-blocking
    socket does (``BlockingIOError``), so the load client's loop reads it as
    it reads TCP. A read returns at most one record; the rest stays in the
    kernel's buffer (OpenSSL reads no further ahead), so level-triggered
    ``epoll`` reports it."""

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError(errno.EAGAIN, "no whole TLS record yet") from None


class Client(Worker):
    """One client process: the load client's worker (paced connects, retries,
    ``mark``, ``stop``, JSON lines), with a TLS handshake after the connect
    and SSE heartbeats and messages counted (see the module)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.context: ssl.SSLContext | None = None
        if cfg.get("tls"):
            self.context = ssl.create_default_context(cafile=cfg["cafile"])  # verifies
            self.context.set_alpn_protocols(["http/1.1"])
            self.context.sslsocket_class = NonBlockingSSLSocket
        self.counts["handshakes"] = 0
        self.received: dict[str, list[float]] = {}  # message tag -> receive times
        self.tls_version: str | None = None
        self.cipher: str | None = None

    def emit(self, kind: str, **fields: Any) -> None:
        if kind == "ready":
            fields.update(tls_version=self.tls_version, cipher=self.cipher)
        elif kind == "final":
            fields.update(tally=self.tally(), received=self.received,
                          tls_version=self.tls_version, cipher=self.cipher)
        super().emit(kind, **fields)

    def tally(self) -> dict:
        """Heartbeats per held stream since the mark: min, median, max, total."""
        per = [c.messages(since_mark=True) for c in self.conns.values()
               if c.state == STREAMING]
        return {"streams": len(per), "min": min(per, default=0), "max": max(per, default=0),
                "median": statistics.median(per) if per else 0, "total": sum(per),
                "without": sum(1 for x in per if x <= 0)}

    def on_command(self, cmd: str) -> None:
        if cmd == "tally":
            self.emit("tally", t=time.monotonic(), **self.tally())

    def on_event(self, fd: int, mask: int, now: float) -> None:
        conn = self.conns.get(fd)
        if conn is None or self.context is None or conn.state not in (CONNECTING, HANDSHAKE):
            super().on_event(fd, mask, now)
            return
        if conn.state == CONNECTING:
            if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or \
                    not mask & select.EPOLLOUT:
                super().on_event(fd, mask, now)  # a failed connect, or not yet
                return
            # The same fd, now speaking TLS (the plain socket object is detached).
            conn.sock = self.context.wrap_socket(conn.sock, server_hostname=SERVER_NAME,
                                                 do_handshake_on_connect=False)
            conn.state = HANDSHAKE
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
            return
        except ssl.SSLWantWriteError:
            self.ep.modify(fd, select.EPOLLOUT | select.EPOLLRDHUP)
            return
        except ssl.SSLCertVerificationError as exc:  # not the server we trust: no retry
            self.close(fd, conn)
            errors = self.counts["errors"]
            errors[exc.verify_message] = errors.get(exc.verify_message, 0) + 1
            self.counts["failed"] += 1
            return
        except (ssl.SSLError, OSError):
            self.close(fd, conn)
            self.again(conn.tries - 1, errno.ECONNRESET, now, "closed_without_answer")
            return
        self.counts["handshakes"] += 1
        if self.tls_version is None:
            self.tls_version, self.cipher = conn.sock.version(), conn.sock.cipher()[0]
        conn.state = CONNECTING  # connected and encrypted: the worker sends the request
        super().on_event(fd, select.EPOLLOUT, now)

    def count(self, conn: Conn, data: bytes) -> None:
        """Heartbeats into ``conn.count``; each message's receive time by its tag.

        Heartbeats are counted by their text whatever the framing: nginx
        passes the stream on in chunks, and a chunked ``Conn`` would halve
        its count (it counts two CRLFs a chunk)."""
        conn.chunked = False
        buf = conn.buf + data
        cut = buf.rfind(b"\n") + 1
        whole, conn.buf = buf[:cut], buf[cut:]
        conn.count += whole.count(HEARTBEAT)
        if MESSAGE in whole:
            now = round(time.monotonic(), 6)
            for line in whole.split(b"\n"):
                if line.startswith(MESSAGE):
                    tag = line[len(b"data: "):].decode("ascii", "replace")
                    self.received.setdefault(tag, []).append(now)


# -- the parent's side ----------------------------------------------------------------------

class ClientProc(_WorkerProc):
    """One client process (this file run as a script)."""

    command = (sys.executable, str(Path(__file__).resolve()))

    def __init__(self, index: int, cfg: dict) -> None:
        super().__init__(index, cfg)
        self.got: dict[str, dict] = {}  # the last report of each kind

    def feed(self) -> list[dict]:
        msgs = super().feed()
        for msg in msgs:
            self.got[msg["type"]] = msg
        return msgs


class TLSFleet(fleet.Fleet):
    """Client processes holding ``n`` streams to ``port`` between them, one per
    source address."""

    poll = 0.1

    def __init__(self, port: int, path: str, n: int, sources: list[str], tls: bool,
                 cafile: str | None, window: int, rate: float, progress: float = 1.0) -> None:
        shares = [n // len(sources) + (i < n % len(sources)) for i in range(len(sources))]
        request = (f"GET {path} HTTP/1.1\r\nHost: {SERVER_NAME}:{port}\r\n"
                   "User-Agent: tls-bench\r\nAccept: text/event-stream\r\n\r\n")
        self.n = n
        cfg = {"host": "127.0.0.1", "port": port, "request": request, "tls": tls,
               "cafile": cafile, "window": max(1, window // len(sources)),
               "rate": rate / len(sources) if rate else 0, "retries": 30,
               "head_timeout": 120, "progress": progress}
        super().__init__([ClientProc(i, dict(cfg, n=share, source=src))
                          for i, (share, src) in enumerate(zip(shares, sources, strict=True))
                          if share])

    def connect(self, timeout: float, tick: Any = None) -> bool:
        """Until every process has each of its streams held or given up on."""
        return self.until(lambda: all(p.ready for p in self.procs), timeout, tick)

    def ask(self, cmd: str, answer: str, timeout: float = 60.0) -> list[dict]:
        """Send ``cmd`` to every process and wait for each one's ``answer``."""
        for p in self.procs:
            p.got.pop(answer, None)
        self.send(cmd)
        if not self.until(lambda: all(answer in p.got for p in self.procs), timeout):
            raise RuntimeError(f"the clients did not answer {cmd!r} in {timeout:g} s")
        return [p.got[answer] for p in self.procs]

    def settle(self, seconds: float, tick: Any = None) -> None:
        self.until(lambda: False, seconds, tick)

    def first(self, key: str) -> Any:
        """``key`` of the first ``ready`` report that has it (the TLS version, the cipher)."""
        return next((p.ready[key] for p in self.procs if p.ready and p.ready.get(key)), None)


def main() -> None:
    raise_nofile()
    control = sys.stdin.buffer
    cfg = json.loads(control.readline())
    Client(cfg).run(os.fdopen(os.dup(control.fileno()), "rb", buffering=0))


if __name__ == "__main__":
    main()
