"""Server memory per idle WebSocket connection, and publish-to-receive latency.

Starts the demo under gunicorn (``gunicorn.conf.py``, one worker), opens N
WebSocket connections to ``/ws?channel=bench`` from several client processes
(raw sockets doing the RFC 6455 handshake; frames parsed by wsproto's client
side, pings answered with pongs), and reports:

- the worker's RSS (psutil; the worker is the gunicorn master's child) before
  the connections -- after one warm-up WebSocket opened and closed, so that
  imports and first-use allocations are not counted -- and after all N are
  held and a heartbeat round of pings and pongs has passed; the difference
  divided by N is the memory per idle connection. The kernel's socket buffers
  are not in the process's RSS and are not counted;
- publish-to-receive latency over every connection: a message is published
  with ``POST /publish``; for each connection, the time from just before the
  POST to the moment its client read the frame (the clients' loop overhead is
  included, so this is an upper bound). Several messages, one a second.

``--sse`` runs the same measurement over ``/events`` (Server-Sent Events),
for comparison. Usage::

    python benchmarks/ws_memory.py --connections 19900 --processes 4

The server's fd limit is 20,000 (``RLIMIT_NOFILE`` hard limit here), and the
admission control keeps 100 in reserve, so 19,900 is the most one worker holds.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import resource
import select
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

# Run as a file: benchmarks/ for run.py, the repository root for the harness.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from run import Server as BenchServer  # noqa: E402

from harness import wire  # noqa: E402

CHANNEL = "bench"


def _request(port: int, sse: bool = False) -> bytes:
    if sse:
        return (f"GET /events?channel={CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "\r\n").encode()
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws?channel={CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def _handshake_batch(port: int, n: int, sse: bool = False) -> list[tuple[socket.socket, bytes]]:
    socks = []
    for _ in range(n):
        socks.append(wire.connect(port, _request(port, sse), timeout=30))
    done = []
    for s in socks:
        head, rest = wire.read_head(s)
        if not head.startswith(b"HTTP/1.1 200" if sse else b"HTTP/1.1 101"):
            raise RuntimeError(f"handshake refused: {head!r}")
        s.setblocking(False)
        done.append((s, rest))
    return done


class _SSEParser:
    """Just enough of an event-stream parser to find each event's id."""

    def __init__(self) -> None:
        self.buf = b""

    def receive_data(self, data: bytes) -> None:
        self.buf += data

    def ids(self) -> list[int]:
        *blocks, self.buf = self.buf.split(b"\n\n")
        return [int(line[4:]) for block in blocks for line in block.split(b"\n")
                if line.startswith(b"id: ")]


def client(port: int, n: int, conn, sse: bool = False) -> None:
    """One client process: open n WebSockets (or SSE streams), answer pings,
    time messages."""
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import CloseConnection, Ping, TextMessage

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks: dict[int, tuple[socket.socket, Connection]] = {}
    poller = select.epoll()
    try:
        while len(socks) < n:
            for s, rest in _handshake_batch(port, min(200, n - len(socks)), sse):
                parser = _SSEParser() if sse else Connection(ConnectionType.CLIENT)
                parser.receive_data(rest)
                socks[s.fileno()] = (s, parser)
                poller.register(s.fileno(), select.EPOLLIN)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc} after {len(socks)}"))
        return
    conn.send(("ready", len(socks)))
    poller.register(conn.fileno(), select.EPOLLIN)
    received: dict[int, list[float]] = {}
    closed = 0
    if sse:
        _sse_loop(poller, conn, socks, received)
        return
    while True:
        events = poller.poll(1.0, len(socks) + 1)
        # Read every ready socket first, timestamping each read, then parse: the
        # parsing of one socket's frames does not delay the next one's timestamp.
        batch = []
        for fd, _ in events:
            if fd == conn.fileno():
                conn.recv()  # "stop"
                conn.send(("done", received, closed))
                return
            s, parser = socks[fd]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            batch.append((time.monotonic(), fd, data))
        for now, fd, data in batch:
            s, parser = socks[fd]
            if not data:
                poller.unregister(fd)
                closed += 1
                continue
            parser.receive_data(data)
            for event in parser.events():
                if isinstance(event, Ping):
                    try:
                        s.send(parser.send(event.response()))
                    except OSError:
                        pass  # closed by the server: counted when its EOF is read
                elif isinstance(event, TextMessage) and event.message_finished:
                    received.setdefault(json.loads(event.data)["id"], []).append(now)
                elif isinstance(event, CloseConnection):
                    closed += 1


def _sse_loop(poller, conn, socks: dict, received: dict[int, list[float]]) -> None:
    """The SSE client's hot loop: read and timestamp, nothing else.

    An SSE client never has to answer, so parsing waits until the end: the
    loop's own cost per delivery (which lands on the same two cores as the
    server, and shows as latency) is one read and one clock reading."""
    reads: list[tuple[float, int, bytes]] = []
    append, read, monotonic = reads.append, os.read, time.monotonic
    control = conn.fileno()
    closed = 0
    while True:
        for fd, _ in poller.poll(1.0, len(socks) + 1):
            if fd == control:
                conn.recv()  # "stop"
                for now, fd, data in reads:
                    if not data:
                        closed += 1
                        continue
                    parser = socks[fd][1]
                    parser.receive_data(data)
                    for message_id in parser.ids():
                        received.setdefault(message_id, []).append(now)
                conn.send(("done", received, closed))
                return
            try:
                data = read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            append((monotonic(), fd, data))
            if not data:
                poller.unregister(fd)


def _publish(port: int, data: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/publish?channel={CHANNEL}",
                                     data=data.encode(), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())["id"]


def _write_runs(port: int) -> tuple[float, float] | None:
    """(seconds summed, rounds) of heartbeat write runs so far, from /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        for key in ("wsgi_hijack_write_run_seconds_sum", "wsgi_hijack_write_run_seconds_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[1])
    if "wsgi_hijack_write_run_seconds_count" not in values:
        return None
    return (values["wsgi_hijack_write_run_seconds_sum"],
            values["wsgi_hijack_write_run_seconds_count"])


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(connections: int, processes: int, heartbeat: float = 10.0,
        messages: int = 5, sse: bool = False) -> dict:
    """Measure; see the module docstring. Returns the figures as a dict."""
    # Clients answer pings only once all their connections are open (a client
    # process is busy with handshakes until then): a long pong timeout keeps
    # the first connections from being closed as dead meanwhile.
    os.environ.update(WSGI_HIJACK_WS_PONG_TIMEOUT="600", WSGI_HIJACK_LOG_LEVEL="WARNING")
    for name in ("WSGI_HIJACK_REDIS_URL", "WEB_CONCURRENCY"):
        os.environ.pop(name, None)
    # benchmarks/run.py's server: the demo under gunicorn.conf.py, its fd limit raised.
    server = BenchServer("hijack", heartbeat, Path(tempfile.mkdtemp(prefix="ws_memory-")), None)
    port = server.port
    clients = []
    try:
        worker = psutil.Process(server.pid)
        # Warm-up: one WebSocket through the whole path, then closed.
        for s, _ in _handshake_batch(port, 1, sse):
            s.close()
        time.sleep(heartbeat + 0.5)
        rss_before = worker.memory_info().rss
        fds_before = worker.num_fds()

        ctx = multiprocessing.get_context("fork")
        start = time.monotonic()
        share = [connections // processes + (i < connections % processes)
                 for i in range(processes)]
        for n in share:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client, args=(port, n, child, sse),
                               daemon=True)
            proc.start()
            clients.append((proc, parent))
        opened = 0
        for _, pipe in clients:
            kind, value = pipe.recv()
            if kind != "ready":
                raise RuntimeError(value)
            opened += value
        connect_seconds = time.monotonic() - start
        runs_before = _write_runs(port)  # rounds from here on run over all connections
        # Pings queued while the clients were busy connecting are answered, and
        # at least one more round of pings and pongs passes.
        time.sleep(2 * heartbeat + 1)
        rss_held = worker.memory_info().rss
        fds_held = worker.num_fds()

        sent: dict[int, float] = {}
        post_ms: list[float] = []
        for i in range(messages):
            t0 = time.monotonic()
            sent[_publish(port, f"latency probe {i}")] = t0
            post_ms.append(round((time.monotonic() - t0) * 1000, 2))
            time.sleep(2.0)
        rss_after = worker.memory_info().rss
        runs_after = _write_runs(port)
        write_run_ms = None
        if runs_before and runs_after and runs_after[1] > runs_before[1]:
            write_run_ms = round((runs_after[0] - runs_before[0])
                                 / (runs_after[1] - runs_before[1]) * 1000, 2)
        latencies: list[float] = []
        per_message: dict[int, list[float]] = {}
        closed = 0
        for _, pipe in clients:
            pipe.send("stop")
            _, received, gone = pipe.recv()
            closed += gone
            for message_id, times in received.items():
                latencies.extend(t - sent[message_id] for t in times)
                per_message.setdefault(message_id, []).extend(times)
        expected = opened * messages
        return {
            "protocol": "sse" if sse else "websocket",
            "connections": opened,
            "server_fds_held": fds_held - fds_before,
            "connect_seconds": round(connect_seconds, 2),
            "rss_before": rss_before,
            "rss_held": rss_held,
            "rss_after_publishes": rss_after,
            "bytes_per_connection": round((rss_held - rss_before) / opened),
            "closed_by_server": closed,
            "deliveries": len(latencies),
            "deliveries_expected": expected,
            "publish_post_ms": post_ms,
            # Per message: the first and the last connection's latency, in ms.
            "first_last_ms": [[round((min(t) - sent[m]) * 1000, 1),
                               round((max(t) - sent[m]) * 1000, 1)]
                              for m, t in sorted(per_message.items())],
            "latency_ms": {
                "min": round(min(latencies) * 1000, 2),
                "median": round(statistics.median(latencies) * 1000, 2),
                "p99": round(_percentile(latencies, 0.99) * 1000, 2),
                "max": round(max(latencies) * 1000, 2),
            } if latencies else None,
            # The reactor's mean heartbeat write run over the same connections in
            # this run (from /metrics), and p99 latency as a multiple of it.
            "write_run_ms": write_run_ms,
            "p99_over_write_run": (round(_percentile(latencies, 0.99) * 1000 / write_run_ms, 2)
                                   if latencies and write_run_ms else None),
        }
    finally:
        for proc, _ in clients:
            if proc.is_alive():
                proc.kill()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=19900)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--heartbeat", type=float, default=10.0)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--sse", action="store_true",
                        help="the same measurement with Server-Sent Events, to compare")
    parser.add_argument("--out", help="also write <protocol>_latency.json and .md here "
                                      "(benchmarks/results for the figures in the repo)")
    args = parser.parse_args(argv)
    result = run(args.connections, args.processes, args.heartbeat, args.messages, args.sse)
    print(json.dumps(result, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        command = "python benchmarks/ws_memory.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        stem = f"{result['protocol']}_latency"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(result, command))


def markdown(r: dict, command: str) -> str:
    """The latency table for the repo, every ratio from this one run."""
    name = {"sse": "SSE", "websocket": "WebSocket"}[r["protocol"]]
    lat = r["latency_ms"] or {}
    ratio = r["p99_over_write_run"]
    verdict = "-" if ratio is None else ("met" if ratio <= 1.2 else "**not met**")
    firsts = [f for f, _ in r["first_last_ms"]]
    lasts = [last for _, last in r["first_last_ms"]]
    return "\n".join([
        f"# Publish-to-receive latency, {r['connections']:,} {name} subscribers, one worker",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores "
        "shared by the server and the client processes, "
        f"`{command}`.",
        "Latency is measured at the clients: receive time minus the time the POST /publish "
        "was sent.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| subscribers | {r['connections']:,} ({r['closed_by_server']} closed by the server) |",
        f"| deliveries | {r['deliveries']:,} of {r['deliveries_expected']:,} |",
        f"| latency min / p50 / p99 / max | {lat.get('min')} / {lat.get('median')} / "
        f"{lat.get('p99')} / {lat.get('max')} ms |",
        f"| first and last subscriber per message | {min(firsts, default=0):g}-"
        f"{max(firsts, default=0):g} ms / {min(lasts, default=0):g}-"
        f"{max(lasts, default=0):g} ms |",
        f"| heartbeat write run over the same subscribers (same run) | {r['write_run_ms']} ms |",
        f"| p99 / write run | {ratio} (target <= 1.2: {verdict}) |",
        f"| server RSS per connection | {r['bytes_per_connection']} B |",
        "",
        f"Raw figures: `{r['protocol']}_latency.json`.",
        "",
    ])


if __name__ == "__main__":
    main()
