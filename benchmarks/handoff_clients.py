"""EventSource clients for ``benchmarks/handoff.py``, on the load client's machinery.

Each client process is a :class:`wsgi_hijack.loadclient_worker.Worker` (its
paced connects, its source address, its retries, its JSON lines to the
parent), whose connections behave as a browser's ``EventSource``:

- the stream is parsed as Server-Sent Events: ``retry:`` sets the
  reconnection delay, ``id:`` the last event id, a comment (``: ping``) is a
  heartbeat, and ``data: SEQ T`` is a benchmark message, the SEQ-th
  published, at ``time.monotonic()`` T (one clock for every process here);
- when a held stream ends (EOF or a reset) the client counts a close and,
  after the reconnection delay, connects again with ``Last-Event-ID``;
- every receive is timestamped with ``time.monotonic()``.

A *client* is one EventSource and outlives its TCP connections. After the
parent's ``mark`` (sent just before the HUP) each client notes when it first
got a byte written by the new worker: a new response head (it reconnected)
or a heartbeat (a moved connection gets one at once from the worker that
resumes it). The parent HUPs just after a heartbeat round, so no heartbeat
of the old worker falls between the mark and its exit.

``final`` carries, beside the worker's own counts: each client's first
close and first new byte after the mark, the message sequence numbers each
client got (as bitmaps, grouped), duplicates, and per message a histogram of
its publish-to-receive latencies (1 % wide buckets).

    python benchmarks/handoff_clients.py   # settings as one JSON line on stdin
"""

from __future__ import annotations

import heapq
import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's wsgi_hijack

from harness.servers import raise_nofile  # noqa: E402
from wsgi_hijack.loadclient import _WorkerProc  # noqa: E402
from wsgi_hijack.loadclient_worker import STREAMING, Conn, Worker  # noqa: E402

#: Latency buckets: ``round(ln(seconds) * BUCKETS_PER_E)``, about 1 % wide.
BUCKETS_PER_E = 100


def bucket(seconds: float) -> int:
    return round(math.log(max(seconds, 1e-6)) * BUCKETS_PER_E)


def bucket_value(b: int) -> float:
    return math.exp(b / BUCKETS_PER_E)


class Client:
    """One EventSource: its parse state and what it received."""

    __slots__ = ("retry_ms", "last_id", "last_num", "buf", "seqs", "dups", "gaps", "id_back",
                 "closes", "closes_before", "first_close", "served", "head_at", "last_ping",
                 "max_gap", "pings_after", "opened")

    def __init__(self) -> None:
        self.retry_ms = 3000  # EventSource's default until the server says otherwise
        self.last_id: bytes | None = None
        self.last_num = -1
        self.buf = b""
        self.seqs = 0  # bit s set: message s received
        self.dups = 0
        self.gaps = 0
        self.id_back = 0  # ids that did not increase
        self.closes = 0
        self.closes_before = 0
        self.first_close: float | None = None
        self.served: float | None = None
        self.head_at: float | None = None
        self.last_ping: float | None = None
        self.max_gap = 0.0
        self.pings_after = 0
        self.opened = False  # got its stream's opening (``retry:``): subscribed


class SSEWorker(Worker):
    """The load client's worker with EventSource clients on its connections."""

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.base_request = self.request
        self.clients: list[Client] = []
        self.client_of: dict[int, Client] = {}
        self.waiting: deque[Client] = deque()  # to connect (again), oldest first
        self.reconnects: list[tuple[float, int, Client]] = []  # heap of (due, n, client)
        self.t_mark: float | None = None
        self.latency: dict[int, dict[int, int]] = {}  # seq -> bucket -> receipts
        self.pings = 0
        self.last_ping = 0.0
        self.received = 0
        self.served = 0
        self.closed_clients = 0
        self.opened = 0
        self.n_reconnects = 0

    # -- connections belong to clients --------------------------------------------------

    def connect(self, tries: int, now: float, sock=None) -> None:
        before = len(self.conns)
        super().connect(tries, now, sock)
        if len(self.conns) > before:  # a new connection, last in the dict
            fd = next(reversed(self.conns))
            if self.waiting:
                client = self.waiting.popleft()
            else:
                client = Client()
                self.clients.append(client)
            self.client_of[fd] = client

    def close(self, fd: int, conn: Conn) -> None:
        client = self.client_of.pop(fd, None)
        super().close(fd, conn)
        if client is not None and conn.state != STREAMING:
            self.waiting.appendleft(client)  # this attempt failed: the next connect is its

    def open_more(self, now: float) -> None:
        super().open_more(now)
        while self.reconnects and self.reconnects[0][0] <= now:
            client = heapq.heappop(self.reconnects)[2]
            self.waiting.append(client)
            self.n_reconnects += 1
            self.connect(0, now)

    def on_event(self, fd: int, mask: int, now: float) -> None:
        conn = self.conns.get(fd)
        client = self.client_of.get(fd)
        if conn is not None and conn.state != STREAMING and client is not None:
            # The request goes out on this event (connected): with the client's last id.
            self.request = self.base_request if client.last_id is None else (
                self.base_request[:-2] + b"Last-Event-ID: " + client.last_id + b"\r\n\r\n")
        super().on_event(fd, mask, now)

    def count(self, conn: Conn, data: bytes) -> None:
        """Called once, with what followed the response head: the stream starts."""
        now = time.monotonic()
        client = self.client_of[conn.sock.fileno()]
        client.buf = b""
        client.head_at = now
        if self.t_mark is not None and now >= self.t_mark:
            self.serve(client, now)
        if data:
            self.feed(client, data, now)

    def on_stream(self, fd: int, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        now = time.monotonic()
        client = self.client_of[fd]
        if data:
            self.feed(client, data, now)
            return
        self.close(fd, conn)
        self.counts["dropped"] += 1
        if self.t_mark is None or now < self.t_mark:
            client.closes_before += 1
        else:
            client.closes += 1
            if client.first_close is None:
                client.first_close = now
                self.closed_clients += 1
        heapq.heappush(self.reconnects, (now + client.retry_ms / 1000, id(client), client))

    # -- Server-Sent Events ----------------------------------------------------------------

    def serve(self, client: Client, now: float) -> None:
        if client.served is None:
            client.served = now
            self.served += 1

    def feed(self, client: Client, data: bytes, now: float) -> None:
        buf = client.buf + data if client.buf else data
        if b"\n\n" not in buf:
            client.buf = buf
            return
        blocks = buf.split(b"\n\n")
        client.buf = blocks.pop()
        for block in blocks:
            if block[:1] == b":":
                self.ping(client, now)
                continue
            data_lines = []
            event = None
            for line in block.split(b"\n"):
                name, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if name == b"data":
                    data_lines.append(value)
                elif name == b"id":
                    client.last_id = value
                    num = int(value) if value.isdigit() else -1
                    if num <= client.last_num:
                        client.id_back += 1
                    client.last_num = num
                elif name == b"retry" and value.isdigit():
                    client.retry_ms = int(value)
                    if not client.opened:
                        client.opened = True
                        self.opened += 1
                elif name == b"event":
                    event = value
                elif name == b"" and value:
                    self.ping(client, now)
            if not data_lines:
                continue
            if event == b"gap":
                client.gaps += 1
                continue
            seq_text, _, sent = data_lines[0].partition(b" ")
            try:
                seq, t_pub = int(seq_text), float(sent)
            except ValueError:
                continue
            self.received += 1
            bit = 1 << seq
            if client.seqs & bit:
                client.dups += 1
            else:
                client.seqs |= bit
            hist = self.latency.get(seq)
            if hist is None:
                hist = self.latency[seq] = {}
            b = bucket(now - t_pub)
            hist[b] = hist.get(b, 0) + 1

    def ping(self, client: Client, now: float) -> None:
        self.pings += 1
        self.last_ping = now
        if self.t_mark is not None and now >= self.t_mark:
            self.serve(client, now)
            client.pings_after += 1
            if client.last_ping is not None:
                client.max_gap = max(client.max_gap, now - client.last_ping)
        client.last_ping = now

    # -- reports ---------------------------------------------------------------------------

    def snapshot(self) -> dict:
        c = dict(self.counts)
        c["held"] = len(self.conns) - len(self.pending)
        c["pending"] = len(self.pending)
        c.update(messages=self.received, pings=self.pings, last_ping=self.last_ping,
                 served=self.served, closed_clients=self.closed_clients,
                 waiting=len(self.waiting) + len(self.reconnects),
                 reconnects=self.n_reconnects, clients=len(self.clients), opened=self.opened)
        return c

    def emit(self, kind: str, **fields) -> None:
        if kind == "marked":
            self.t_mark = fields["t"]
        elif kind == "final":
            fields.update(self.summary())
            fields["messages_total"] = fields["messages_window"] = []
        super().emit(kind, **fields)

    def summary(self) -> dict:
        groups: dict[str, int] = {}
        for c in self.clients:
            key = format(c.seqs, "x")
            groups[key] = groups.get(key, 0) + 1
        gaps = sorted(c.max_gap for c in self.clients if c.pings_after)
        return {
            "t_mark": self.t_mark,
            "served_at": [c.served for c in self.clients],
            "first_close_at": [c.first_close for c in self.clients if c.first_close],
            "closes_before_mark": sum(c.closes_before for c in self.clients),
            "closes_after_mark": sum(c.closes for c in self.clients),
            "seq_bitmaps": groups,
            "duplicates": sum(c.dups for c in self.clients),
            "clients_with_duplicates": sum(1 for c in self.clients if c.dups),
            "gap_events": sum(c.gaps for c in self.clients),
            "id_not_increasing": sum(c.id_back for c in self.clients),
            "ping_gap_max": gaps[-1] if gaps else None,
            "ping_gap_median": gaps[len(gaps) // 2] if gaps else None,
            "not_connected": len(self.waiting) + len(self.reconnects),
            "latency": {str(s): {str(b): n for b, n in h.items()}
                        for s, h in self.latency.items()},
        }


class ClientProc(_WorkerProc):
    """One client process (this file run as a script), spoken to as the load
    client speaks to its workers (``send``, ``feed``)."""

    command = (sys.executable, str(Path(__file__).resolve()))


def main() -> None:
    # As wsgi_hijack.loadclient_worker.main, with this worker.
    raise_nofile()
    control = sys.stdin.buffer
    cfg = json.loads(control.readline())
    SSEWorker(cfg).run(os.fdopen(os.dup(control.fileno()), "rb", buffering=0))


if __name__ == "__main__":
    main()
