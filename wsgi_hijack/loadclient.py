"""The load client: open N streaming connections, hold them, and report.

``python -m wsgi_hijack.loadclient http://127.0.0.1:8000/ -n 19900 --server-pid PID``
(also installed as ``wsgi-hijack-load``).

It starts as many worker processes (:mod:`wsgi_hijack.loadclient_worker`) as the
file-descriptor limit needs (at most ``--per-process`` connections each), each
from its own loopback source address (127.0.0.2, 127.0.0.3, ...) once N passes
what one address's ephemeral ports allow. Each worker connects at a paced rate,
sends ``GET``, waits for the response head, then counts the messages
(newline-terminated lines; chunks for a chunked response) on every connection.

Phases: **connect** (until every connection has its head, or was given up on),
**hold** (``--duration`` seconds: the hold window, over which messages per
connection and the server's CPU are measured), **stop**. Given the server's
pids (``--server-pid``; ``--gunicorn-master`` resolves to its workers), it
samples their RSS, fd count and CPU time from ``/proc`` before the connect
phase, at the start and end of the hold window, and every ``--sample-interval``
seconds while holding (the soak timeline).

``--storm`` is a connect storm, as after a deploy: no pacing (the window is
N, no rate), no retries, and every connect in flight at once (each client
process makes its sockets first; all start on one signal). A client whose
connect succeeded but which was closed or reset before any response head is
counted as *closed without an answer*, not retried.

The report (:func:`run` returns it; ``--json`` prints it) is a dict with
``connections``, ``time_to_all_heads``, ``hold``, ``server``, ``storm``
(heads over time, time until all were hijacked) and ``latency`` (always
``None``: this client does not time messages; ``benchmarks/ws_memory.py``
measures publish-to-receive latency).

This module runs the phases; :mod:`wsgi_hijack.loadclient_machine` reads
``/proc`` and plans the client processes, :mod:`wsgi_hijack.loadclient_report`
builds the report and its table, and each client process is a
:mod:`wsgi_hijack.loadclient_worker`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import selectors
import subprocess
import sys
import time
from urllib.parse import urlsplit

from .loadclient_machine import (
    children,
    default_per_process,
    ephemeral_ports,
    ephemeral_range,
    free_server_port,
    plan,
    proc_stats,
    sample,
)
from .loadclient_report import (
    build_report,
    format_report,
    heads_over_time,
    server_section,
    storm_section,
)

__all__ = [
    "children", "default_per_process", "ephemeral_ports", "ephemeral_range",
    "format_report", "free_server_port", "heads_over_time", "main", "plan", "proc_stats",
    "run",
]


# -- running ---------------------------------------------------------------------------------

class _WorkerProc:
    #: The client process's command (a subclass may run another worker).
    command = (sys.executable, "-m", "wsgi_hijack.loadclient_worker")

    def __init__(self, index: int, cfg: dict) -> None:
        self.index = index
        self.cfg = cfg
        self.proc = subprocess.Popen(
            list(self.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.proc.stdin.write((json.dumps(cfg) + "\n").encode())
        self.buf = b""
        self.last: dict = {}
        self.ready: dict | None = None
        self.armed = False
        self.marked = False
        self.final: dict | None = None

    def send(self, cmd: str) -> None:
        try:
            self.proc.stdin.write(cmd.encode() + b"\n")
        except (BrokenPipeError, ValueError):
            pass

    def feed(self) -> list[dict]:
        chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        if not chunk:
            return [{"type": "eof"}]
        self.buf += chunk
        msgs = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msgs.append(json.loads(line))
        return msgs


def run(url: str, n: int, duration: float = 10.0, server_pids: list[int] | None = None,
        gunicorn_master: int | None = None, per_process: int | None = None,
        source_addresses: str = "auto", window: int = 1000, rate: float = 0.0,
        retries: int = 30, connect_timeout: float = 300.0, head_timeout: float | None = None,
        sample_interval: float = 0.0, progress: float = 2.0,
        progress_stream=None, storm: bool = False) -> dict:
    """Open ``n`` connections to ``url``, hold them ``duration`` seconds; return the report.

    ``storm``: every connect at once, none paced or retried (``window``, ``rate``
    and ``retries`` are ignored). ``head_timeout`` (default 60 s, 150 s in a
    storm: past the kernel's whole SYN retransmission schedule of about 127 s,
    so that TCP, not the client, decides who is lost) gives up on a connection
    that has no response head by then."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected an http:// URL, got {url!r}")
    host, port = parts.hostname, parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
               f"User-Agent: wsgi-hijack-load\r\nAccept: */*\r\n\r\n")
    pids = list(server_pids or [])
    if gunicorn_master is not None:
        pids += children(gunicorn_master)
    per_process = per_process or default_per_process()
    shares = plan(n, host, per_process, source_addresses)
    if storm:
        window, rate, retries = n, 0.0, 0
    if head_timeout is None:
        head_timeout = 150.0 if storm else 60.0
    window_each = max(1, window // len(shares))
    rate_each = rate / len(shares) if rate else 0.0

    samples: list[list[dict]] = []
    before = sample(pids)
    t_start = time.monotonic()
    workers = [
        _WorkerProc(i, {"n": s["n"], "source": s["source"], "host": host, "port": port,
                        "request": request, "window": window_each, "rate": rate_each,
                        "retries": retries, "head_timeout": head_timeout, "storm": storm,
                        "progress": min(progress, 1.0) if progress else 1.0})
        for i, s in enumerate(shares)
    ]
    sel = selectors.DefaultSelector()
    for w in workers:
        sel.register(w.proc.stdout, selectors.EVENT_READ, w)
    out = progress_stream if progress_stream is not None else sys.stderr
    # A storm starts once every client process has made its sockets ("arm"):
    # then all get "go" together, and the connect phase is timed from there.
    phase = "arm" if storm else "connect"
    t_go: float | None = None
    held_at = hold_end = None
    mark_sample: list[dict] = []
    end_sample: list[dict] = []
    next_print = time.monotonic() + progress if progress else math.inf
    next_sample = math.inf
    live = set(workers)

    def show(force: bool = False) -> None:
        nonlocal next_print
        now = time.monotonic()
        if not force and now < next_print:
            return
        next_print = now + progress
        tot = {k: sum(w.last.get(k, 0) for w in workers)
               for k in ("attempts", "headed", "held", "pending", "dropped", "failed",
                         "retries", "messages", "closed_without_answer")}
        print(f"[loadclient {now - t_start:7.1f}s {phase}] held {tot['held']}/{n} "
              f"pending {tot['pending']} dropped {tot['dropped']} failed {tot['failed']} "
              f"closed-without-answer {tot['closed_without_answer']} "
              f"retries {tot['retries']} messages {tot['messages']}", file=out, flush=True)

    try:
        while live:
            now = time.monotonic()
            if phase == "arm" and all(w.armed or w not in live for w in workers):
                phase = "connect"
                t_go = now
                for w in workers:
                    w.send("go")
            if phase == "connect" and (all(w.ready for w in workers)
                                       or now - (t_go or t_start) > connect_timeout):
                phase = "mark"
                held_at = now
                for w in workers:
                    w.send("mark")
            if phase == "mark" and all(w.marked or w not in live for w in workers):
                phase = "hold"
                mark_sample = sample(pids)
                hold_end = time.monotonic() + duration
                if sample_interval:
                    next_sample = time.monotonic() + sample_interval
            if phase == "hold":
                if now >= next_sample:
                    samples.append(sample(pids))
                    next_sample = now + sample_interval
                if now >= hold_end:
                    end_sample = sample(pids)
                    phase = "stop"
                    for w in workers:
                        w.send("stop")
            if progress:
                show()
            timeout = 0.2 if phase != "hold" else max(0.0, min(hold_end, next_sample,
                                                               next_print) - now)
            for key, _ in sel.select(min(timeout, 1.0)):
                w = key.data
                for msg in w.feed():
                    kind = msg["type"]
                    if kind == "eof":
                        sel.unregister(w.proc.stdout)
                        live.discard(w)
                    elif kind == "progress":
                        w.last = msg
                    elif kind == "armed":
                        w.armed = True
                    elif kind == "ready":
                        w.ready = msg
                        w.last = msg
                    elif kind == "marked":
                        w.marked = True
                    elif kind == "final":
                        w.final = msg
                        w.last = msg
    finally:
        for w in workers:
            try:
                w.proc.stdin.close()
            except OSError:
                pass
        for w in workers:
            try:
                w.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        sel.close()
    if progress:
        show(force=True)
    finals = [w.final or w.last for w in workers]
    server = server_section(pids, finals, before, mark_sample, end_sample, samples)
    report = build_report(url, n, duration, shares, finals, server, t_start, held_at)
    report["storm"] = storm_section(finals, n, storm, t_go)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wsgi-hijack-load", description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="http://HOST:PORT/PATH of a streaming endpoint")
    ap.add_argument("-n", "--connections", type=int, required=True, dest="n")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="seconds to hold once all are connected (the hold window); "
                         "600 for a 10-minute soak")
    ap.add_argument("--server-pid", type=int, action="append", default=[],
                    help="a server process to measure (repeatable)")
    ap.add_argument("--gunicorn-master", type=int,
                    help="measure this gunicorn master's worker processes")
    ap.add_argument("--source-addresses", default="auto",
                    help="auto (127.0.0.2, .3, ... when one address's ports do not suffice), "
                         "none, or a comma-separated list")
    ap.add_argument("--per-process", type=int, default=None,
                    help=f"connections per client process (default {default_per_process()})")
    ap.add_argument("--storm", action="store_true",
                    help="a connect storm: every connect in flight at once (window N, no "
                         "rate, no retries); counts clients closed without an answer and "
                         "records heads over time")
    ap.add_argument("--window", type=int, default=1000,
                    help="connections between connect() and their head at once, in all")
    ap.add_argument("--rate", type=float, default=0.0, help="new connects per second (0: any)")
    ap.add_argument("--retries", type=int, default=30)
    ap.add_argument("--connect-timeout", type=float, default=300.0)
    ap.add_argument("--head-timeout", type=float, default=None,
                    help="give up on a connection with no response head after S seconds "
                         "(default 60; 150 with --storm)")
    ap.add_argument("--sample-interval", type=float, default=0.0,
                    help="sample server RSS and fds every S seconds while holding")
    ap.add_argument("--progress", type=float, default=2.0, help="seconds between progress lines")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    report = run(args.url, args.n, duration=args.duration, server_pids=args.server_pid,
                 gunicorn_master=args.gunicorn_master, per_process=args.per_process,
                 source_addresses=args.source_addresses, window=args.window, rate=args.rate,
                 retries=args.retries, connect_timeout=args.connect_timeout,
                 head_timeout=args.head_timeout, sample_interval=args.sample_interval,
                 progress=args.progress, storm=args.storm)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    c = report["connections"]
    return 0 if c["held"] == args.n and not c["dropped"] else 1


if __name__ == "__main__":
    sys.exit(main())
