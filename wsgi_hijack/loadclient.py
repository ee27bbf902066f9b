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
(heads over time, time until all were hijacked) and ``latency`` (``None``
for now: a later issue measures publish-to-receive latency).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import random
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import time
from urllib.parse import urlsplit

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# fds a worker keeps for itself (stdio, epoll, Python's own) on top of its connections.
_FD_RESERVE = 64


# -- the server's processes, from /proc ----------------------------------------------------

def proc_stats(pid: int) -> dict:
    """RSS (bytes), open fds, and CPU seconds (user + system) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"pid": pid, "rss": rss, "fds": fds, "cpu": (utime + stime) / _CLK_TCK,
            "cpu_user": utime / _CLK_TCK, "t": time.monotonic()}


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (a gunicorn master's workers)."""
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    except FileNotFoundError:
        pass
    return sorted(kids)


def _sample(pids: list[int]) -> list[dict]:
    out = []
    for pid in pids:
        try:
            out.append(proc_stats(pid))
        except (FileNotFoundError, ProcessLookupError):
            out.append({"pid": pid, "gone": True, "t": time.monotonic()})
    return out


# -- planning --------------------------------------------------------------------------------

def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (outgoing connections take these)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def ephemeral_ports() -> int:
    low, high = ephemeral_range()
    return high - low + 1


def free_server_port(host: str = "127.0.0.1") -> int:
    """A free port *below* the ephemeral range, for a server under load: the
    load client's many outgoing connections take ephemeral ports, and could
    take the server's between this check and its bind."""
    low = ephemeral_range()[0]
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_per_process() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(1, min(19000, hard - _FD_RESERVE))


def plan(n: int, host: str, per_process: int, source_addresses: str) -> list[dict]:
    """Split N into worker shares and pick each worker's source address."""
    procs = max(1, math.ceil(n / per_process))
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    if source_addresses == "auto":
        loopback = _is_loopback(host) and ":" not in host
        # Leave a tenth of the ports for everything else on the machine.
        needed = loopback and n > ephemeral_ports() * 0.9
        sources = [f"127.0.0.{2 + i}" for i in range(procs)] if needed else [None] * procs
    elif source_addresses in ("none", ""):
        sources = [None] * procs
    else:
        given = [a.strip() for a in source_addresses.split(",") if a.strip()]
        sources = [given[i % len(given)] for i in range(procs)]
    return [{"n": share, "source": src} for share, src in zip(shares, sources, strict=True)]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _summary(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None, "total": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "total": sum(values)}


# -- running ---------------------------------------------------------------------------------

class _WorkerProc:
    def __init__(self, index: int, cfg: dict) -> None:
        self.index = index
        self.cfg = cfg
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wsgi_hijack.loadclient_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
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
    before = _sample(pids)
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
                mark_sample = _sample(pids)
                hold_end = time.monotonic() + duration
                if sample_interval:
                    next_sample = time.monotonic() + sample_interval
            if phase == "hold":
                if now >= next_sample:
                    samples.append(_sample(pids))
                    next_sample = now + sample_interval
                if now >= hold_end:
                    end_sample = _sample(pids)
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
    report = _report(url, n, duration, shares, workers, pids, before, mark_sample, end_sample,
                     samples, t_start, held_at)
    report["storm"] = _storm_section(workers, n, storm, t_go)
    return report


def heads_over_time(times: list[float], t0: float, step: float = 0.01) -> list[list[float]]:
    """Response heads received by each moment, as ``[seconds since t0, heads]``
    points: the end of each ``step`` in which heads arrived, the start of each
    stretch without any, and the origin; a line through them is the curve of
    hijacked-over-time, kept small at 20,000 heads."""
    rel = sorted(t - t0 for t in times)
    if rel and rel[-1] > step * 4000:  # a slow storm: at most ~8000 points
        step = rel[-1] / 4000
    points: list[list[float]] = [[0.0, 0]]
    i = 0
    while i < len(rel):
        start = math.floor(rel[i] / step) * step
        if start > points[-1][0] + step / 2:
            # No heads since the last point: a flat stretch (a SYN waiting for
            # its retransmission), so that a line drawn through the points is flat.
            points.append([round(start, 3), i])
        edge = start + step
        while i < len(rel) and rel[i] < edge:
            i += 1
        # Each point is the end of a step with heads in it; the last one is the
        # last head itself, so the curve ends where the storm did.
        points.append([round(edge if i < len(rel) else rel[-1], 3), i])
    return points


def _storm_section(workers: list[_WorkerProc], n: int, storm: bool,
                   t_go: float | None) -> dict:
    """Heads over time from the first connect, and when the last of N got its head."""
    finals = [w.final or w.last for w in workers]
    times = [t for f in finals for t in f.get("head_times", [])]
    firsts = [f["t_first"] for f in finals if f.get("t_first") is not None]
    t0 = min(firsts) if firsts else t_go
    if t0 is None:
        return {"storm": storm, "heads_over_time": [], "time_to_last_head": None,
                "time_to_all_hijacked": None, "time_to_half": None, "connect_spread": None}
    rel = sorted(t - t0 for t in times)
    return {
        "storm": storm,
        # How long the client processes took to issue their first connects
        # after one another (the "at once" of the storm, as measured).
        "connect_spread": (max(firsts) - min(firsts)) if firsts else None,
        "heads_over_time": heads_over_time(times, t0),
        "time_to_half": rel[(n + 1) // 2 - 1] if len(rel) >= (n + 1) // 2 and rel else None,
        "time_to_last_head": rel[-1] if rel else None,
        # Every one of the N got its head (was hijacked): when the last did.
        "time_to_all_hijacked": rel[-1] if rel and len(rel) >= n else None,
    }


def _report(url, n, duration, shares, workers, pids, before, mark_sample, end_sample,
            samples, t_start, held_at) -> dict:
    finals = [w.final or w.last for w in workers]
    total = {k: sum(f.get(k, 0) for f in finals)
             for k in ("attempts", "opened", "headed", "held", "dropped", "failed", "retries",
                       "closed_without_answer", "timed_out", "connect_failed")}
    errors: dict[str, int] = {}
    for f in finals:
        for k, v in f.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    total["errors"] = errors
    firsts = [f["t_first"] for f in finals if f.get("t_first") is not None]
    heads = [f["t_last_head"] for f in finals if f.get("t_last_head") is not None]
    all_headed = total["headed"] == n
    t_heads = (max(heads) - min(firsts)) if firsts and heads and all_headed else None
    window_counts = [c for f in finals for c in f.get("messages_window", [])]
    total_counts = [c for f in finals for c in f.get("messages_total", [])]
    window_sum = sum(window_counts)
    server = []
    for i, pid in enumerate(pids):
        b, m, e = (before[i] if i < len(before) else {}), (
            mark_sample[i] if i < len(mark_sample) else {}), (
            end_sample[i] if i < len(end_sample) else {})
        entry: dict = {"pid": pid}
        if b.get("gone") or m.get("gone") or e.get("gone") or not (b and m and e):
            entry["gone"] = True
            server.append(entry)
            continue
        held = max(total["held"], 1)
        cpu_window = e["cpu"] - m["cpu"]
        entry.update(
            rss_before=b["rss"], rss_held=m["rss"], rss_end=e["rss"],
            rss_per_connection=(e["rss"] - b["rss"]) / held,
            fds_before=b["fds"], fds_held=m["fds"], fds_end=e["fds"],
            cpu_connect_s=m["cpu"] - b["cpu"],
            cpu_per_connection_us=(m["cpu"] - b["cpu"]) / held * 1e6,
            cpu_window_s=cpu_window,
            cpu_window_user_s=e["cpu_user"] - m["cpu_user"],
            cpu_per_message_us=(cpu_window / window_sum * 1e6) if window_sum else None,
        )
        timeline = [s[i] for s in samples if i < len(s) and not s[i].get("gone")]
        if timeline:
            timeline = [m] + timeline + [e]
            t0 = timeline[0]["t"]
            entry["timeline"] = [{"t": round(s["t"] - t0, 3), "rss": s["rss"], "fds": s["fds"],
                                  "cpu": s["cpu"]} for s in timeline]
            rss = [s["rss"] for s in timeline]
            fds = [s["fds"] for s in timeline]
            entry["soak"] = {"rss_min": min(rss), "rss_max": max(rss),
                             "rss_growth": rss[-1] - rss[0], "fds_min": min(fds),
                             "fds_max": max(fds)}
        server.append(entry)
    return {
        "url": url,
        "n": n,
        "processes": len(shares),
        "source_addresses": [s["source"] for s in shares],
        "connections": total,
        "time_to_all_heads": t_heads,
        "connect_phase_s": (held_at - t_start) if held_at else None,
        "hold": {
            "seconds": duration,
            "messages_per_connection": _summary(window_counts),
            "messages_per_connection_total": _summary(total_counts),
        },
        "server": server,
        # Room for a later issue: publish-to-receive latency (min, median, p99, max).
        "latency": None,
    }


# -- the human-readable table ------------------------------------------------------------------

def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024
    return str(b)


def format_report(r: dict) -> str:
    c = r["connections"]
    rows = [
        ("URL", r["url"]),
        ("connections asked", f"{r['n']} from {r['processes']} process(es)"
         + (f", sources {', '.join(s for s in r['source_addresses'] if s)}"
            if any(r["source_addresses"]) else "")),
        ("opened (TCP connects)", f"{c['opened']} in {c['attempts']} attempts, "
         f"{c['retries']} retries"),
        ("got a response head", str(c["headed"])),
        ("held at the end", str(c["held"])),
        ("dropped after the head", str(c["dropped"])),
        ("failed (gave up)", str(c["failed"])),
        ("closed without an answer", str(c.get("closed_without_answer", 0))
         + ("" if r.get("storm", {}).get("storm") else " (each retried)")),
        ("no head in time / connect failed",
         f"{c.get('timed_out', 0)} / {c.get('connect_failed', 0)}"),
        ("time until all got their head",
         f"{r['time_to_all_heads']:.3f} s" if r["time_to_all_heads"] is not None else "-"),
    ]
    st = r.get("storm") or {}
    if st.get("storm"):
        rows.append(("storm: time until all were hijacked",
                     f"{st['time_to_all_hijacked']:.3f} s from the first connect"
                     if st.get("time_to_all_hijacked") is not None else "- (not all)"))
        rows.append(("storm: half had their head after",
                     f"{st['time_to_half']:.3f} s" if st.get("time_to_half") is not None
                     else "-"))
    if c["errors"]:
        rows.append(("errors seen", ", ".join(f"{k} x{v}" for k, v in c["errors"].items())))
    for label, key in (("messages per connection in the hold window", "messages_per_connection"),
                       ("messages per connection in total", "messages_per_connection_total")):
        s = r["hold"][key]
        rows.append((label, f"min {s['min']}, median {s['median']}, max {s['max']} "
                            f"(total {s['total']})"))
    rows.append(("hold window", f"{r['hold']['seconds']:g} s"))
    for s in r["server"]:
        p = f"server pid {s['pid']}"
        if s.get("gone"):
            rows.append((p, "gone (exited during the run)"))
            continue
        rows += [
            (f"{p} RSS", f"{_fmt_bytes(s['rss_before'])} before, {_fmt_bytes(s['rss_end'])} "
                         f"held: {s['rss_per_connection']:.0f} B per connection"),
            (f"{p} fds", f"{s['fds_before']} before, {s['fds_held']} held, {s['fds_end']} end"),
            (f"{p} CPU", f"{s['cpu_connect_s']:.2f} s connecting "
                         f"({s['cpu_per_connection_us']:.1f} us/connection), "
                         f"{s['cpu_window_s']:.2f} s holding"
             + (f" ({s['cpu_per_message_us']:.2f} us per delivered message)"
                if s["cpu_per_message_us"] is not None else "")),
        ]
        if "soak" in s:
            k = s["soak"]
            rows.append((f"{p} soak", f"RSS {_fmt_bytes(k['rss_min'])}..{_fmt_bytes(k['rss_max'])}"
                                      f" (growth {_fmt_bytes(k['rss_growth'])}), fds "
                                      f"{k['fds_min']}..{k['fds_max']}"))
    rows.append(("latency", "not measured yet" if r["latency"] is None else str(r["latency"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
