"""70,000 SSE connections on 4 workers sharing Redis; one publish reaches all.

Issue 5 item 5. One command::

    python benchmarks/scale_redis.py -n 70000 --workers 4 --messages 5

starts redis-server (``appendonly yes``, a free port, a temp dir:
``harness.servers.RedisServer``) and gunicorn
(``-c gunicorn.conf.py -w 4``, ``WSGI_HIJACK_REDIS_URL`` set, heartbeats every
30 s so that they stay out of the measurement), opens N SSE connections to
``/events?channel=bench`` with the project's load client (its worker,
:class:`wsgi_hijack.loadclient_worker.Worker`: paced non-blocking connects,
retries, one loopback source address per client process, 127.0.0.2, .3, ...),
then publishes ``--messages`` messages with ``POST /publish``, a few seconds
apart, each one's data being ``time.monotonic()`` just before the POST
(CLOCK_MONOTONIC is one clock for every process of the machine). Each client
connection notes, per message id, ``receive time - publish time`` (the
receive time is taken when its bytes are read). Reported per message: how many
of the held connections received it, and the latency p50, p99 and max over
all of them; per worker: held connections (open fds minus those before the
connect phase, from ``/proc/PID/fd``) and RSS.

Then the multi-host part (``--hosts 3 --host-workers 2 --host-connections
5000``): several gunicorn instances on different ports, all on the same Redis,
a client on each, one publish on the first instance, received on all.

The client-side subclass :class:`SSEWorker` is also used by ``soak.py``.
Progress lines go to stderr; the report is JSON (``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.servers import (  # noqa: E402
    RedisServer,
    Server,
    argv_for,
    free_port,
    server_env,
)
from wsgi_hijack import loadclient, loadclient_worker  # noqa: E402
from wsgi_hijack.loadclient_worker import STREAMING, Worker  # noqa: E402

CHANNEL = "bench"
BUCKET = 10000  # latency histogram buckets: 0.1 ms


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the client side: the load client's worker, reading SSE ids and publish times -------------

class Chain:
    """One logical client: a connection and the ones that replaced it (soak.py)."""

    __slots__ = ("first", "last", "received", "gaps", "dups", "gap_events", "conns")

    def __init__(self, last: int | None = None) -> None:
        self.first = None
        self.last = last
        self.received = 0  # distinct ids
        self.gaps = 0  # an id that was not last + 1
        self.dups = 0  # an id not after the last one
        self.gap_events = 0  # the server's "event: gap" (history lost)
        self.conns = 0


class SSEWorker(Worker):
    """The load client's worker, counting SSE events instead of lines.

    Per message id: a histogram of receive - publish latency (the event's data
    is the publish time). Per connection, a :class:`Chain` checks that ids come
    one after the other. ``replace`` in the configuration (a fraction) makes the
    parent's ``mark`` command mean "replace now": that fraction of the held
    connections are closed and as many opened, each sending ``Last-Event-ID``
    with the last id its predecessor received.
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__(cfg)
        self.base_request = self.request
        self.replace_fraction = float(cfg.get("replace", 0) or 0)
        self.per_message = bool(cfg.get("per_message", True))
        self.chains: dict = {}  # Conn -> Chain
        self.all_chains: list[Chain] = []
        self.waiting: deque[Chain] = deque()  # chains whose next connection is to be opened
        self.opening: dict = {}  # Conn (not streaming yet) -> Chain
        self.hist: dict[int, dict[int, int]] = {}  # id -> {bucket: count}
        self.events = 0
        self.replaced = 0
        self.rng = random.Random(cfg.get("seed", os.getpid()))

    # A connection's chain is chosen when it is created and follows it through
    # its retries (a retried connect picks the next waiting chain).
    def connect(self, tries: int, now: float) -> None:
        chain = self.waiting.popleft() if self.waiting else None
        if chain is None:
            chain = Chain()
            self.all_chains.append(chain)
        if chain.last is not None:
            self.request = self.base_request[:-2] + f"Last-Event-ID: {chain.last}\r\n\r\n".encode()
        else:
            self.request = self.base_request
        before = set(self.pending)
        super().connect(tries, now)
        new = [fd for fd in self.pending if fd not in before]
        if new:
            self.opening[self.conns[new[0]]] = chain
        else:
            self.waiting.appendleft(chain)

    def on_event(self, fd: int, mask: int, now: float) -> None:
        conn = self.conns.get(fd)
        if conn is not None and conn.state != STREAMING:
            chain = self.opening.get(conn)
            if chain is not None and chain.last is not None:
                self.request = (self.base_request[:-2]
                                + f"Last-Event-ID: {chain.last}\r\n\r\n".encode())
            else:
                self.request = self.base_request
            self.chains[conn] = chain
        super().on_event(fd, mask, now)
        if conn is not None and conn.state == STREAMING and conn in self.opening:
            chain = self.opening.pop(conn)
            chain.conns += 1

    def close(self, fd: int, conn) -> None:
        chain = self.opening.pop(conn, None)
        if chain is not None:  # it will be retried (or given up on): keep its chain
            self.waiting.append(chain)
        super().close(fd, conn)

    def count(self, conn, data: bytes) -> None:
        buf = conn.buf + data
        if b"\n\n" not in buf:
            conn.buf = buf
            return
        *blocks, conn.buf = buf.split(b"\n\n")
        now = time.monotonic()
        chain = self.chains.get(conn)
        for block in blocks:
            mid = sent = None
            gap = False
            for line in block.split(b"\n"):
                if line.startswith(b"id: "):
                    mid = int(line[4:])
                elif line.startswith(b"data: "):
                    try:
                        sent = float(line[6:])
                    except ValueError:
                        pass
                elif line == b"event: gap":
                    gap = True
            if gap and chain is not None:
                chain.gap_events += 1
            if mid is None:
                continue  # heartbeat, retry hint, gap notice
            conn.count += 1
            self.events += 1
            if sent is not None:
                hist = self.hist.setdefault(mid if self.per_message else 0, {})
                b = int((now - sent) * BUCKET)
                hist[b] = hist.get(b, 0) + 1
            if chain is not None:
                if chain.first is None:
                    chain.first = mid
                elif mid <= chain.last:
                    chain.dups += 1
                    continue
                elif mid != chain.last + 1:
                    chain.gaps += 1
                chain.last = mid
                chain.received += 1

    def replace(self) -> None:
        streaming = [(fd, c) for fd, c in self.conns.items() if c.state == STREAMING]
        k = round(len(streaming) * self.replace_fraction)
        for fd, conn in self.rng.sample(streaming, k):
            chain = self.chains.pop(conn)
            super().close(fd, conn)
            self.waiting.append(chain)
        # Reopened a second later, as a retry would be: the server has seen the
        # closes by then (at its fd limit, a new connection before them gets 503).
        not_before = time.monotonic() + 1.0
        self.retry.extend((not_before, 0) for _ in range(k))
        self.replaced += k

    def snapshot(self) -> dict:
        c = super().snapshot()
        c["messages"] = self.events
        c["replaced"] = self.replaced
        return c

    def emit(self, kind: str, **fields) -> None:
        if kind == "marked" and self.replace_fraction:
            self.replace()
            fields["replaced"] = self.replaced
        if kind == "final":
            fields.pop("messages_total", None)
            fields.pop("messages_window", None)
            fields["hist"] = {str(k): v for k, v in self.hist.items()}
            fields["chains"] = [[ch.first, ch.last, ch.received, ch.gaps, ch.dups,
                                 ch.gap_events, ch.conns] for ch in self.all_chains]
        super().emit(kind, **fields)


def _client_main() -> None:
    # The load client's worker process, running this subclass.
    loadclient_worker.Worker = SSEWorker
    loadclient_worker.main()


class Clients:
    """Client processes (``SSEWorker``) against one server; spoken to in JSON lines."""

    def __init__(self, port: int, n: int, per_process: int = 17500, window: int = 1000,
                 source_addresses: str = "auto", first_source: int = 2,
                 replace: float = 0.0, name: str = "clients", per_message: bool = True) -> None:
        self.name = name
        self.n = n
        shares = loadclient.plan(n, "127.0.0.1", per_process, source_addresses)
        if source_addresses == "auto" and len(shares) > 1:
            # Always one address per process (so several Clients never share one).
            shares = [dict(s, source=f"127.0.0.{first_source + i}") for i, s in enumerate(shares)]
        request = (f"GET /events?channel={CHANNEL} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   "Accept: text/event-stream\r\n\r\n")
        self.procs = []
        for i, share in enumerate(shares):
            cfg = {"n": share["n"], "source": share["source"], "host": "127.0.0.1",
                   "port": port, "request": request, "window": max(1, window // len(shares)),
                   "retries": 30, "head_timeout": 60, "progress": 1.0, "replace": replace,
                   "seed": i, "per_message": per_message}
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()),
                                     "--client-worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, bufsize=0)
            proc.stdin.write((json.dumps(cfg) + "\n").encode())
            self.procs.append({"proc": proc, "cfg": cfg, "buf": b"", "last": {}, "ready": None,
                               "marked": 0, "final": None})
        self.sel = selectors.DefaultSelector()
        for p in self.procs:
            self.sel.register(p["proc"].stdout, selectors.EVENT_READ, p)

    def pump(self, timeout: float = 0.2) -> None:
        for key, _ in self.sel.select(timeout):
            p = key.data
            chunk = os.read(p["proc"].stdout.fileno(), 1 << 22)
            if not chunk:
                self.sel.unregister(p["proc"].stdout)
                p["eof"] = True
                continue
            p["buf"] += chunk
            while b"\n" in p["buf"]:
                line, p["buf"] = p["buf"].split(b"\n", 1)
                msg = json.loads(line)
                kind = msg["type"]
                p["last"] = msg if kind in ("progress", "ready") else p["last"]
                if kind == "ready":
                    p["ready"] = msg
                elif kind == "marked":
                    p["marked"] += 1
                    p["last"]["replaced"] = msg.get("replaced", 0)
                elif kind == "final":
                    p["final"] = msg

    def total(self, key: str) -> int:
        return sum(p["last"].get(key, 0) for p in self.procs)

    def status(self) -> str:
        return (f"{self.name}: held {self.total('held')}/{self.n} pending {self.total('pending')}"
                f" failed {self.total('failed')} dropped {self.total('dropped')} "
                f"retries {self.total('retries')} events {self.total('messages')}")

    def wait_ready(self, timeout: float = 600.0, progress: float = 5.0) -> float:
        start = time.monotonic()
        next_log = start + progress
        while not all(p["ready"] for p in self.procs):
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"not all connected after {timeout} s: {self.status()}")
            if any(p.get("eof") for p in self.procs):
                raise RuntimeError(f"a client process exited: {self.status()}")
            self.pump()
            if time.monotonic() >= next_log:
                log(self.status())
                next_log += progress
        return time.monotonic() - start

    def command(self, cmd: str) -> None:
        for p in self.procs:
            p["proc"].stdin.write(cmd.encode() + b"\n")

    def mark(self, timeout: float = 60.0) -> None:
        """Ask every process to mark (with ``replace``: to replace) and wait for it."""
        want = [p["marked"] + 1 for p in self.procs]
        self.command("mark")
        deadline = time.monotonic() + timeout
        while any(p["marked"] < w for p, w in zip(self.procs, want, strict=True)):
            if time.monotonic() > deadline:
                raise RuntimeError("clients did not answer mark")
            self.pump()

    def stop(self, timeout: float = 120.0) -> list[dict]:
        self.command("stop")
        deadline = time.monotonic() + timeout
        while not all(p["final"] for p in self.procs) and time.monotonic() < deadline:
            self.pump(0.5)
        for p in self.procs:
            try:
                p["proc"].wait(timeout=30)
            except subprocess.TimeoutExpired:
                p["proc"].kill()
        return [p["final"] for p in self.procs if p["final"]]

    def kill(self) -> None:
        for p in self.procs:
            if p["proc"].poll() is None:
                p["proc"].kill()
                p["proc"].wait()


# -- latency over histograms --------------------------------------------------------------------

def merge_hists(hists: list[dict]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in hists:
        for b, c in h.items():
            out[int(b)] = out.get(int(b), 0) + c
    return out


def hist_stats(hist: dict[int, int]) -> dict:
    """Count, p50, p99, max (ms) of a 0.1 ms histogram."""
    n = sum(hist.values())
    if not n:
        return {"received": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    keys = sorted(hist)

    def pct(q: float) -> float:
        rank = max(1, math.ceil(q * n))
        seen = 0
        for k in keys:
            seen += hist[k]
            if seen >= rank:
                return round((k + 0.5) * 1000 / BUCKET, 1)
        return round(keys[-1] * 1000 / BUCKET, 1)

    return {"received": n, "min_ms": round(keys[0] * 1000 / BUCKET, 1), "p50_ms": pct(0.5),
            "p99_ms": pct(0.99), "max_ms": round((keys[-1] + 1) * 1000 / BUCKET, 1)}


# -- the server side ------------------------------------------------------------------------

def tcp_counters() -> dict[str, int]:
    """The kernel's listen-queue and reset counters (``/proc/net/netstat``,
    machine-wide: other processes' connections count too)."""
    want = {"ListenOverflows", "ListenDrops", "TCPAbortOnData", "TCPAbortOnClose",
            "TCPReqQFullDrop", "TCPReqQFullDoCookies"}
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        for k, v in zip(names.split()[1:], values.split()[1:], strict=False):
            if k in want:
                out[k] = int(v)
    return out


def established_inodes(port: int) -> set[str]:
    """Inodes of the established TCP sockets whose local port is ``port`` (``ss``,
    over netlink: reading ``/proc/net/tcp`` takes seconds at 140,000 sockets)."""
    if shutil.which("ss") is None:  # iproute2 missing: the slow way
        with open("/proc/net/tcp") as f:
            next(f)
            rows = [line.split() for line in f]
        return {r[9] for r in rows if r[3] == "01" and int(r[1].rsplit(":", 1)[1], 16) == port}
    out = subprocess.run(["ss", "-tnHe", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {field[4:] for line in out.splitlines() for field in line.split()
            if field.startswith("ino:")}


def socket_fds(pid: int, inodes: set[str]) -> int:
    """How many of ``pid``'s fds are sockets among ``inodes``."""
    n = 0
    base = f"/proc/{pid}/fd"
    for fd in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            n += 1
    return n


def every_worker_answers(workers: int):
    """Ready when gunicorn has all its workers and /metrics answers 4 times
    per worker (each has its own SO_REUSEPORT listener)."""
    def ready(server: Server) -> bool:
        if len(server.workers()) != workers:
            return False
        for _ in range(4 * workers):
            with urllib.request.urlopen(f"{server.url}metrics", timeout=2):
                pass
        return True
    return ready


class Gunicorn(Server):
    """The demo under ``gunicorn -c gunicorn.conf.py -w W`` (:mod:`harness.servers`);
    its workers (``pids``) found via /proc."""

    def __init__(self, workdir: Path, workers: int, redis_url: str | None,
                 heartbeat: float = 30.0, extra_env: dict | None = None) -> None:
        port = free_port()
        env = server_env(heartbeat, WSGI_HIJACK_LOG_LEVEL="WARNING",
                         WEB_CONCURRENCY=str(workers))
        env.pop("WSGI_HIJACK_REDIS_URL", None)
        if redis_url:
            env["WSGI_HIJACK_REDIS_URL"] = redis_url
        env.update(extra_env or {})
        super().__init__(argv_for("gunicorn", port, args=("-w", str(workers))), port,
                         workdir / f"gunicorn-{port}.log", env=env,
                         ready=every_worker_answers(workers), timeout=60, stop_timeout=60,
                         raise_fd_limit=True, name="gunicorn")
        time.sleep(1.0)
        self.pids = self.workers()

    def sample(self) -> list[dict]:
        """Per worker: RSS, fds, and ``held``: its fds that are established TCP
        connections on the public port (``/proc/net/tcp`` matched by inode)."""
        inodes = established_inodes(self.port)
        out = []
        for pid in self.pids:
            s = loadclient.proc_stats(pid)
            s["held"] = socket_fds(pid, inodes)
            out.append(s)
        return out

    def publish(self, data: str) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/publish?channel={CHANNEL}", data=data.encode(),
            method="POST", headers={"Content-Type": "application/octet-stream"})  # not a form
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["id"]


def publish_and_measure(publisher: Gunicorn, clients: list[Clients], messages: int,
                        interval: float, settle: float) -> tuple[list[int], list[dict]]:
    """Publish ``messages`` timestamped messages; stop the clients; their finals."""
    ids = []
    for i in range(messages):
        if i:
            time.sleep(interval)
        ids.append(publisher.publish(repr(time.monotonic())))
        log(f"published id {ids[-1]}")
        for c in clients:
            c.pump(0)
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        for c in clients:
            c.pump(0.1)
    return ids, [c.stop() for c in clients]


def per_message(ids: list[int], finals: list[dict], held: int) -> list[dict]:
    out = []
    for mid in ids:
        stats = hist_stats(merge_hists([f["hist"].get(str(mid), {}) for f in finals]))
        stats.update(id=mid, held=held, all_received=stats["received"] == held)
        out.append(stats)
    return out


def run_scale(workdir: Path, redis: RedisServer, n: int, workers: int, messages: int,
              interval: float, per_process: int, window: int) -> dict:
    log(f"scale: gunicorn -w {workers}, {n} SSE connections")
    server = Gunicorn(workdir, workers, redis.url)
    clients = None
    try:
        log(f"gunicorn on port {server.port}, workers {server.pids}")
        counters_before = tcp_counters()
        clients = Clients(server.port, n, per_process=per_process, window=window, name="scale")
        connect_s = clients.wait_ready()
        counters = {k: v - counters_before.get(k, 0) for k, v in tcp_counters().items()}
        log(f"kernel counters over the connect phase (machine-wide): {counters}")
        time.sleep(2.0)
        clients.pump(0)
        held_clients = clients.total("held")
        workers_held = server.sample()
        log(f"connected in {connect_s:.1f} s: {clients.status()}; per worker "
            + ", ".join(f"{w['pid']}: {w['held']} held, RSS {w['rss'] >> 20} MiB"
                        for w in workers_held))
        ids, finals = publish_and_measure(server, [clients], messages, interval,
                                          settle=max(5.0, interval))
        workers_after = server.sample()
        finals = finals[0]
        held_end = sum(f["held"] for f in finals)
        msgs = per_message(ids, finals, held_clients)
        for m in msgs:
            log(f"id {m['id']}: {m['received']}/{m['held']} p50 {m['p50_ms']} ms "
                f"p99 {m['p99_ms']} ms max {m['max_ms']} ms")
        overall = hist_stats(merge_hists([f["hist"].get(str(i), {}) for f in finals
                                          for i in ids]))
        return {
            "connections": n, "workers": workers, "client_processes": len(clients.procs),
            "sources": [p["cfg"]["source"] for p in clients.procs],
            "connect_seconds": round(connect_s, 1), "held_by_clients": held_clients,
            "held_at_end": held_end,
            "failed": sum(f["failed"] for f in finals),
            "dropped": sum(f["dropped"] for f in finals),
            "retries": sum(f["retries"] for f in finals),
            "errors": [f["errors"] for f in finals],
            "kernel_counters_connect_phase": counters,
            "per_worker": [{"pid": w["pid"], "held": w["held"], "fds": w["fds"],
                            "rss_mib": round(w["rss"] / 2**20, 1),
                            "rss_after_publish_mib": round(a["rss"] / 2**20, 1)}
                           for w, a in zip(workers_held, workers_after, strict=True)],
            "held_by_workers": sum(w["held"] for w in workers_held),
            "messages": msgs,
            "latency_all_messages": overall,
            "all_held": held_clients == n and sum(w["held"] for w in workers_held) == n,
            "all_received": all(m["all_received"] for m in msgs),
        }
    finally:
        if clients is not None:
            clients.kill()
        server.stop()


def run_multihost(workdir: Path, redis: RedisServer, hosts: int, host_workers: int,
                  per_host: int, window: int) -> dict:
    log(f"multi-host: {hosts} gunicorn instances x {host_workers} workers, "
        f"{per_host} connections each")
    servers: list[Gunicorn] = []
    clients: list[Clients] = []
    try:
        for _ in range(hosts):
            servers.append(Gunicorn(workdir, host_workers, redis.url))
        for i, s in enumerate(servers):
            clients.append(Clients(s.port, per_host, window=window, source_addresses=
                                   f"127.0.0.{20 + i}", name=f"host{i} :{s.port}"))
        for c in clients:
            c.wait_ready()
        time.sleep(2.0)
        held = []
        for c in clients:
            c.pump(0)
            held.append(c.total("held"))
            log(c.status())
        samples = [s.sample() for s in servers]
        ids, finals = publish_and_measure(servers[0], clients, 1, 0.0, settle=5.0)
        mid = ids[0]
        per_host = []
        for i, (s, fin) in enumerate(zip(servers, finals, strict=True)):
            stats = hist_stats(merge_hists([f["hist"].get(str(mid), {}) for f in fin]))
            stats.update(port=s.port, held=held[i], all_received=stats["received"] == held[i],
                         per_worker_held=[w["held"] for w in samples[i]])
            per_host.append(stats)
            log(f"host {i} (:{s.port}): {stats['received']}/{held[i]} p50 {stats['p50_ms']} "
                f"p99 {stats['p99_ms']} max {stats['max_ms']} ms")
        overall = hist_stats(merge_hists([f["hist"].get(str(mid), {}) for fin in finals
                                          for f in fin]))
        return {"hosts": hosts, "workers_per_host": host_workers,
                "connections_per_host": per_host and [h["held"] for h in per_host],
                "published_on": servers[0].port, "id": mid, "per_host": per_host,
                "overall": overall, "all_held": all(h == per_host_n for h, per_host_n in
                                                    zip(held, [c.n for c in clients],
                                                        strict=True)),
                "all_received": all(h["all_received"] for h in per_host)}
    finally:
        for c in clients:
            c.kill()
        for s in servers:
            s.stop()


def markdown(report: dict) -> str:
    """The report as ``benchmarks/results/scale.md``."""
    m = report["machine"]
    out = ["# 70,000 SSE connections on 4 workers over Redis; multi-host on loopback", "",
           f"- Date: {report['date']}",
           f"- Command: `{report['command']}`",
           f"- Machine: {m['cpus']} cores, {m['mem_gib']} GiB, Linux {m['kernel']}, Python "
           f"{m['python']}, RLIMIT_NOFILE hard {m['nofile_hard']} per process; load average "
           f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end "
           "(clients, servers and Redis on the same 2 cores)",
           f"- Result: **{'all held, all received' if report['ok'] else 'FAILED'}**", ""]
    s = report.get("scale")
    if s:
        out += [f"## {s['connections']:,} connections, {s['workers']} workers, one Redis", "",
                f"{s['client_processes']} client processes (source addresses "
                f"{', '.join(str(a) for a in s['sources'])}); all connected in "
                f"{s['connect_seconds']} s ({s['retries']} connects retried: "
                f"{s['errors']}; failed {s['failed']}; kernel counters over the connect "
                f"phase, machine-wide: {s.get('kernel_counters_connect_phase', 'not recorded')})."
                f" Held: {s['held_by_clients']:,} by the clients, {s['held_by_workers']:,} by "
                "the workers (each worker's fds that are established sockets on the port).", "",
                "| worker pid | held | open fds | RSS held (MiB) | RSS after publishes (MiB) |",
                "| --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {w['pid']} | {w['held']:,} | {w['fds']:,} | {w['rss_mib']} | "
                f"{w['rss_after_publish_mib']} |" for w in s["per_worker"]]
        out += ["", "Publish-to-receive latency (from just before the `POST /publish` to "
                "the client's read of the event), over every held connection:", "",
                "| message id | received | p50 (ms) | p99 (ms) | max (ms) | first (ms) |",
                "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {x['id']} | {x['received']:,} / {x['held']:,} | {x['p50_ms']} | "
                f"{x['p99_ms']} | {x['max_ms']} | {x['min_ms']} |" for x in s["messages"]]
        a = s["latency_all_messages"]
        out += [f"| all | {a['received']:,} | {a['p50_ms']} | {a['p99_ms']} | {a['max_ms']} | "
                f"{a['min_ms']} |", ""]
    h = report.get("multihost")
    if h:
        out += [f"## Multi-host on loopback: {h['hosts']} gunicorn instances x "
                f"{h['workers_per_host']} workers, one Redis", "",
                f"One publish (id {h['id']}) on the instance on port {h['published_on']}:", "",
                "| instance port | held | per worker | received | p50 (ms) | p99 (ms) | "
                "max (ms) |", "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {x['port']} | {x['held']:,} | {x['per_worker_held']} | {x['received']:,} "
                f"| {x['p50_ms']} | {x['p99_ms']} | {x['max_ms']} |" for x in h["per_host"]]
        o = h["overall"]
        out += [f"| all | {sum(x['held'] for x in h['per_host']):,} | | {o['received']:,} | "
                f"{o['p50_ms']} | {o['p99_ms']} | {o['max_ms']} |", ""]
    return "\n".join(out)


def machine() -> dict:
    return {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PHYS_PAGES")
                                                      * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
            "loadavg_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client-worker"]:
        _client_main()
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=70000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between publishes")
    parser.add_argument("--per-process", type=int, default=17500,
                        help="connections per client process")
    parser.add_argument("--window", type=int, default=1000,
                        help="connects in flight at once, over all client processes")
    parser.add_argument("--hosts", type=int, default=3, help="multi-host part: instances (0: skip)")
    parser.add_argument("--host-workers", type=int, default=2)
    parser.add_argument("--host-connections", type=int, default=5000)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--json-out", type=Path, help="write the report here too")
    parser.add_argument("--md-out", type=Path, help="write the report as Markdown here")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="scale_redis-"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "command": "python benchmarks/scale_redis.py " + " ".join(argv),
                    "machine": machine()}
    redis = RedisServer(workdir)
    try:
        log(f"redis-server on port {redis.port} (appendonly yes), workdir {workdir}")
        if not args.skip_scale:
            report["scale"] = run_scale(workdir, redis, args.connections, args.workers,
                                        args.messages, args.interval, args.per_process,
                                        args.window)
        if args.hosts:
            report["multihost"] = run_multihost(workdir, redis, args.hosts, args.host_workers,
                                                args.host_connections, args.window)
    finally:
        redis.kill()
        report["machine"]["loadavg_end"] = os.getloadavg()
        shutil.rmtree(workdir, ignore_errors=True)
    checks = [report[k]["all_held"] and report[k]["all_received"]
              for k in ("scale", "multihost") if k in report]
    report["ok"] = all(checks)
    return write_report(report, args.json_out, args.md_out, markdown)


def write_report(report: dict, json_out: Path | None, md_out: Path | None, render) -> int:
    """Print the report as JSON, write it (and ``render(report)``) where asked; exit code."""
    text = json.dumps(report, indent=2)
    for path, content in ((json_out, text + "\n"), (md_out, None)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content if content is not None else render(report))
    print(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
