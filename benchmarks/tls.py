"""Streams over TLS: TLS at our gunicorn worker against plain streams and against nginx.

    python benchmarks/tls.py                        # 10,000 streams a case, 4-7 minutes a repeat
    python benchmarks/tls.py --connections 50 --rounds 2 --messages 1 --out /tmp/tls

Three cases in one invocation, each on ONE gunicorn worker with the
project's settings (``gunicorn.conf.py``, as ``benchmarks/kernel_memory.py``
runs it), heartbeat ``--heartbeat`` s, clients on ``/events?channel=bench``
(Server-Sent Events), each case on a fresh port with fresh client addresses:

``plain``
    plain streams on our gevent worker (the baseline);
``tls-gunicorn``
    TLS streams on our gevent worker, ``--certfile``/``--keyfile``: the
    reactor holds each connection's TLS state and encrypts every write for it
    (:mod:`wsgi_hijack.tls`);
``tls-nginx``
    nginx (Debian's ``nginx-light``; installed with apt-get if missing, as
    ``scripts/test.sh`` does) terminating TLS in front of the plain worker.
    The proxy's settings are the ones a stream needs (docs/tls.rst):

    - one worker process (as one gunicorn worker), ``worker_rlimit_nofile``
      at the fd hard limit: nginx holds two fds per stream (the client's and
      the upstream's), so at a hard limit of 20,000 it holds at most about
      9,990 streams. The case then runs at the most that fits (the nginx
      worker's own fds counted once it is up), and the report says so;
    - ``worker_connections`` an eighth above the fd limit, so that the fds,
      not the connection slots, are the limit: once fewer than a sixteenth of
      its slots are free, nginx closes connections still waiting for their
      first request ("worker_connections are not enough, reusing
      connections"), and a client whose handshake is under way is one. The
      slots are allocated at start (in the worker's RSS at start, not per
      stream);
    - ``proxy_buffering off`` (each event goes out as it comes),
      ``proxy_http_version 1.1``, ``proxy_read_timeout`` far above the
      heartbeat;
    - no upstream ``keepalive``: a stream's upstream connection is the
      stream's for its whole life, and the worker answers every stream with
      ``Connection: close``, so a pool of idle upstream connections could only
      serve short requests, which this benchmark does not send through nginx.

The clients (:mod:`tls_clients`) speak real TLS, Python's :mod:`ssl`,
verifying the certificate (a throw-away one, :func:`harness.tls.make_certificate`),
in ``--processes`` non-blocking client processes, one source address each.
The handshakes are paced (``--window`` in flight, ``--rate`` a second) and
progress goes to stderr.

Each case: a warm-up (20 streams, closed), then a snapshot before any
stream (the server processes' RSS and CPU; the kernel's slab caches and
every end's socket buffers, as :mod:`kernel_memory_probe` reads them, when
``/proc/slabinfo`` is readable), N streams connected, a heartbeat to settle,
a second snapshot; the **hold window**: ``--rounds`` heartbeats, over which
the server processes' CPU is divided by the heartbeats the clients
received (every client process counts its streams' ``: ping`` comments
since the window began, and each stream must have some); then
``--messages`` messages published to all by ``POST /publish`` (straight to
the worker, past nginx), one every ``--message-interval`` s, each timed from
just before its POST to the moment each client read it.

Figures per case (``results.md``'s table; raw in ``tls.json``): RSS per held
stream of the worker, of nginx's worker, and their sum; the kernel's
growth per stream, host-wide (slab caches and socket buffers of every end,
the clients' included: they are the same TCP sockets in every case, so the
differences between cases are the servers'); CPU per delivered heartbeat
(the worker's, plus nginx's master and worker); CPU per stream set up
(handshake and request); fds per stream; publish-to-receive latency; and
each figure of the TLS cases over ``plain``'s in the same repetition.

Writes ``tls.md``, ``tls.json`` and ``tls.png`` into ``--out`` (default
``benchmarks/results``); ``--render`` rewrites the markdown and the plot
from ``tls.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # run as a file: benchmarks/ and this tree

import kernel_memory_probe as probe  # noqa: E402
import kernel_memory_report as km_report  # noqa: E402
from storm import apt_install, git_state, sources_for, version  # noqa: E402
from tls_clients import TLSFleet  # noqa: E402

from harness import servers  # noqa: E402
from harness.tls import make_certificate  # noqa: E402
from wsgi_hijack.loadclient import children  # noqa: E402

CHANNEL = "bench"
PATH = f"/events?channel={CHANNEL}"
CASES = ("plain", "tls-gunicorn", "tls-nginx")
LABELS = {"plain": "a. plain, our gevent worker",
          "tls-gunicorn": "b. TLS at our gevent worker",
          "tls-nginx": "c. nginx terminating TLS, plain worker behind"}
WARM_UP = 20
#: fds the nginx worker may need beyond its idle set and two per stream.
NGINX_FD_MARGIN = 10
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[tls {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def hard_nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


# -- servers ---------------------------------------------------------------------------------

def client_context(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def connection(port: int, cafile: Path | None, timeout: float = 10) -> http.client.HTTPConnection:
    """An HTTP connection to 127.0.0.1:``port``, over TLS when ``cafile`` is given."""
    if cafile is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    # The certificate names 127.0.0.1 too (harness.tls.make_certificate): verified.
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                       context=client_context(cafile))


def answers(port: int, cafile: Path | None) -> bool:
    """A request to a path that does not stream gets a status line."""
    conn = connection(port, cafile, timeout=5)
    try:
        conn.request("GET", "/wsgi-hijack-ready", headers={"Connection": "close"})
        conn.getresponse().read()
        return True
    finally:
        conn.close()


def start_gunicorn(tls: tuple[Path, Path] | None, heartbeat: float,
                   workdir: Path) -> tuple[servers.Server, int]:
    """The demo under gunicorn with the project's settings, one worker; TLS if
    ``tls`` (cert, key). Returns the server and its worker's pid."""
    args = ("--certfile", str(tls[0]), "--keyfile", str(tls[1])) if tls else ()
    cafile = tls[0] if tls else None

    def ready(server: servers.Server) -> bool:
        return answers(server.port, cafile) and len(server.workers()) >= 1

    srv = servers.start("gunicorn", workdir, args=args, heartbeat=heartbeat, ready=ready,
                        raise_fd_limit=True, timeout=60, stop_timeout=30,
                        name="gunicorn-tls" if tls else "gunicorn")
    return srv, srv.workers()[0]


NGINX_CONF = """\
# benchmarks/tls.py: nginx terminating TLS in front of one gunicorn worker
# (the settings and why: the module's docstring, docs/tls.rst).
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
{user}
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{
    worker_connections {slots};
}}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    ssl_protocols TLSv1.2 TLSv1.3;
    # WebSocket: the upgrade passed on; other requests: no Connection header.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        "" "";
    }}
    upstream app {{
        server 127.0.0.1:{upstream};
    }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-Proto https;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


def start_nginx(upstream: int, cert: Path, key: Path, workdir: Path) -> servers.Server:
    """nginx on a free port, TLS, proxying to 127.0.0.1:``upstream`` (see the module)."""
    if shutil.which("nginx") is None:
        apt_install("nginx-light")
    port = servers.free_port()
    work = workdir / f"nginx-{port}"
    work.mkdir()
    # As root, nginx's workers run as nobody unless told: root here, so that
    # they may read the certificate's key in this temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    nofile = hard_nofile()
    conf.write_text(NGINX_CONF.format(nofile=nofile, slots=nofile + nofile // 8, user=user,
                                      work=work, port=port, upstream=upstream, cert=cert,
                                      key=key))
    argv = ["nginx", "-p", str(work), "-e", str(work / "error.log"), "-c", str(conf)]

    def ready(server: servers.Server) -> bool:
        return answers(server.port, cert) and len(server.workers()) >= 1

    return servers.Server(argv, port, workdir / f"nginx-{port}.log", ready=ready,
                          raise_fd_limit=True, timeout=30, stop_timeout=30, name="nginx")


def nginx_errors(proxy: servers.Server) -> dict[str, int]:
    """nginx's error log, lines counted by what they say (the time stamp and
    the connection number cut off)."""
    counts: dict[str, int] = {}
    path = Path(proxy.argv[proxy.argv.index("-e") + 1])
    for line in path.read_text(errors="replace").splitlines():
        what = line.split("] ", 1)[-1].split(": ", 1)[-1].split(", client:")[0][:120]
        counts[what] = counts.get(what, 0) + 1
    return counts


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- measuring -------------------------------------------------------------------------------

def snapshot(ports: list[int], pids: dict[str, int], kernel: bool) -> dict:
    """The server processes' RSS and CPU; with ``kernel``, the slab caches,
    sockstat, meminfo and every end's socket buffers of connections to ``ports``."""
    snap: dict = {"t": time.monotonic(),
                  "procs": {name: probe.proc_memory(pid) for name, pid in pids.items()}}
    if kernel:
        snap.update(slab=probe.read_slabinfo(), sockstat=probe.read_sockstat(),
                    meminfo=probe.read_meminfo(),
                    sockets={str(p): probe.socket_memory(p) for p in ports})
    return snap


def cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: probe.proc_memory(pid)["cpu"] for name, pid in pids.items()}


def kernel_growth(before: dict, after: dict, held: int, skb: set[str]) -> dict | None:
    """Host-wide kernel memory per stream, from ``before`` to ``after``: every slab
    cache's growth (socket-buffer caches, timewait sockets and /proc lookups left
    out, as ``kernel_memory_report`` does) and the socket buffers' charges of
    every end of the connections to the measured ports."""
    if "slab" not in after or held <= 0:
        return None
    d = probe.delta(before, after)
    slab = km_report.without_proc_lookups(d["slab"])
    slab_bytes = sum(c["bytes"] for k, c in slab.items()
                     if k not in km_report.LEFT_OUT and k not in skb)
    ends = [side for port in after["sockets"].values() for side in (port["server"],
                                                                     port["client"])]
    ends_before = [side for port in before["sockets"].values()
                   for side in (port["server"], port["client"])]
    buffers = sum(s["charged"] for s in ends) - sum(s["charged"] for s in ends_before)
    sockets = sum(s["sockets"] for s in ends) - sum(s["sockets"] for s in ends_before)
    return {"slab": slab_bytes / held, "buffers": buffers / held,
            "total": (slab_bytes + buffers) / held, "sockets_per_stream": sockets / held,
            "tcp_inuse_per_stream": d["sockstat"].get("tcp_inuse", 0) / held}


class Publisher:
    """``POST /publish`` to the worker on a kept-alive connection (as
    ``kernel_memory.Publisher``), over TLS when ``cafile`` is given, opened
    again when the worker closed it.

    A request that gets no answer in ``first_timeout`` seconds on a new
    connection is sent again on another and counted (``retries``, in the
    report); a message's time is that of the request that was answered. A
    request the worker lost (as one sent right behind the client's TLS
    ``Finished`` once was) then shows in the report instead of stalling the
    run for the worker's whole head deadline."""

    def __init__(self, port: int, cafile: Path | None, first_timeout: float = 2.0,
                 tries: int = 10) -> None:
        self.port, self.cafile = port, cafile
        self.first_timeout, self.tries = first_timeout, tries
        self.retries = 0
        self.conn: http.client.HTTPConnection | None = None
        self.post(f"/publish?channel={CHANNEL}-warm-up", b"warm-up")

    def post(self, target: str, body: bytes) -> tuple[int, float]:
        """The answer's status, and when the request that got it was sent
        (``time.monotonic()``)."""
        for attempt in range(self.tries):
            fresh = self.conn is None
            if fresh:
                self.conn = connection(self.port, self.cafile, timeout=self.first_timeout)
            sent = time.monotonic()
            try:
                self.conn.request("POST", target, body=body)
                resp = self.conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt + 1 == self.tries:
                    raise
                # A kept-alive connection the worker closed meanwhile is no
                # failure; a request that got no answer is.
                self.retries += isinstance(exc, TimeoutError)
                continue
            if fresh:
                self.conn.sock.settimeout(30)
            if resp.getheader("Connection", "").lower() == "close":
                self.close()
            return resp.status, sent
        raise AssertionError("unreachable")

    def publish(self, body: bytes) -> tuple[int, float]:
        return self.post(f"/publish?channel={CHANNEL}", body)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


class Progress:
    """A progress line every ``every`` seconds while a fleet connects and holds."""

    def __init__(self, label: str, every: float) -> None:
        self.label, self.every = label, every
        self.fleet: TLSFleet | None = None
        self.phase = ""
        self.next = time.monotonic() + every

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.fleet is None or (not force and now < self.next):
            return
        self.next = now + self.every
        f = self.fleet
        t = {k: f.total(k) for k in ("held", "pending", "handshakes", "dropped", "failed",
                                     "retries", "messages")}
        log(f"{self.label} {self.phase}: held {t['held']:,}/{f.n:,} pending {t['pending']} "
            f"TLS handshakes {t['handshakes']:,} dropped {t['dropped']} failed {t['failed']} "
            f"retries {t['retries']} heartbeats {t['messages']:,}")


def run_case(case: str, args: argparse.Namespace, index: int, repeat: int, workdir: Path,
             cert: Path, key: Path) -> dict:
    """One case (see the module): its record for ``tls.json``."""
    tls_at_gunicorn = case == "tls-gunicorn"
    nginx = case == "tls-nginx"
    kernel = os.access("/proc/slabinfo", os.R_OK)
    rec: dict[str, Any] = {"case": case, "repeat": repeat, "heartbeat": args.heartbeat,
                           "wanted": args.connections, "loadavg_before": os.getloadavg()[0]}
    started: list[servers.Server] = []
    fleet: TLSFleet | None = None
    try:
        gunicorn, worker = start_gunicorn((cert, key) if tls_at_gunicorn else None,
                                          args.heartbeat, workdir)
        started.append(gunicorn)
        pids = {"gunicorn worker": worker}
        ports = [gunicorn.port]
        front = gunicorn.port
        n = args.connections
        if nginx:
            proxy = start_nginx(gunicorn.port, cert, key, workdir)
            started.append(proxy)
            nginx_workers = children(proxy.proc.pid)
            pids.update({"nginx worker": nginx_workers[0], "nginx master": proxy.proc.pid})
            front = proxy.port
            ports.insert(0, proxy.port)
            idle_fds = fd_count(nginx_workers[0])
            fits = (hard_nofile() - idle_fds - NGINX_FD_MARGIN) // 2
            rec["nginx"] = {"version": version(["nginx", "-v"]), "idle_fds": idle_fds,
                            "fd_limit": hard_nofile(), "fits": fits}
            if fits < n:
                log(f"{case}: nginx holds 2 fds a stream; at an fd limit of {hard_nofile():,} "
                    f"with {idle_fds} fds of its own it fits {fits:,} streams: running "
                    f"{fits:,}, not {n:,}")
                n = fits
        tls = case != "plain"
        cafile = str(cert) if tls else None
        per = math.ceil(n / args.processes)
        sources = sources_for(args.source_block + index, 1 + math.ceil(n / per), 1)
        rec.update(n=n, port=front, pids=pids, sources=sources[1:], tls=tls)
        label = f"{case} (run {index + 1})"
        log(f"{label}: {n:,} streams to port {front}"
            f"{f' (nginx, upstream {gunicorn.port})' if nginx else ''}, pids {pids}, "
            f"clients from {', '.join(sources[1:])}")

        warm = TLSFleet(front, PATH, WARM_UP, sources[:1], tls, cafile, WARM_UP, 0)
        if not warm.connect(60):
            raise RuntimeError(f"{label}: the warm-up streams did not connect: "
                               f"{[p.last for p in warm.procs]}\n{gunicorn.log()[-2000:]}")
        warm.settle(args.heartbeat + 0.5)
        warm.stop()
        time.sleep(max(2.0, args.heartbeat))  # the warm-up's closes seen, their fds freed
        publisher = Publisher(gunicorn.port, cert if tls_at_gunicorn else None)
        fds_idle = {name: fd_count(pid) for name, pid in pids.items()}
        before = snapshot(ports, pids, kernel)

        prog = Progress(label, args.progress)
        fleet = TLSFleet(front, PATH, n, sources[1:], tls, cafile, args.window, args.rate,
                         progress=min(1.0, args.progress))
        prog.fleet, prog.phase = fleet, "connect"
        t_connect = time.monotonic()
        if not fleet.connect(args.connect_timeout, prog):
            raise RuntimeError(f"{label}: not every stream got its head in "
                               f"{args.connect_timeout:g} s")
        rec["connect_s"] = time.monotonic() - t_connect
        cpu_connected = cpu(pids)
        rec["tls_version"], rec["cipher"] = fleet.first("tls_version"), fleet.first("cipher")
        prog.phase = "settle"
        fleet.settle(args.heartbeat + 1.0, prog)
        prog(force=True)
        after = snapshot(ports, pids, kernel)
        held = fleet.total("held")
        rec["held_after_connect"] = held
        rec["failed"] = fleet.total("failed")
        rec["retries"] = fleet.total("retries")

        # The hold window: heartbeats only.
        prog.phase = "hold"
        fleet.ask("mark", "marked")
        cpu0, t0 = cpu(pids), time.monotonic()
        fleet.settle(args.rounds * args.heartbeat, prog)
        cpu1, t1 = cpu(pids), time.monotonic()
        tallies = fleet.ask("tally", "tally")

        # One message to all, --messages times.
        prog.phase = "publish"
        published: dict[str, float] = {}
        statuses = []
        for k in range(args.messages):
            tag = f"tlsbench-{repeat}-{k}"
            status, published[tag] = publisher.publish(tag.encode())
            statuses.append(status)
            fleet.settle(args.message_interval, prog)
        fleet.settle(max(2.0, args.heartbeat), prog)
        fds = {name: fd_count(pid) for name, pid in pids.items()}
        publisher.close()
        prog(force=True)
        finals = fleet.stop()
        fleet = None
        rec["write_runs"] = gunicorn.write_runs(held)
        if nginx:
            rec["nginx"]["errors"] = nginx_errors(proxy)
    finally:
        if fleet is not None:
            fleet.stop()
        for srv in reversed(started):
            srv.stop()
    skb = km_report.skb_caches({"slab_aliases": probe.slab_aliases()})
    window = {
        "seconds": t1 - t0,
        "cpu": {name: cpu1[name] - cpu0[name] for name in pids},
        "heartbeats": sum(t["total"] for t in tallies),
        "streams": sum(t["streams"] for t in tallies),
        "without_heartbeat": sum(t["without"] for t in tallies),
        "min": min(t["min"] for t in tallies), "max": max(t["max"] for t in tallies),
        "median_of_processes": statistics.median(t["median"] for t in tallies),
    }
    cpu_total = sum(window["cpu"].values())
    window["cpu_total"] = cpu_total
    window["cpu_per_heartbeat_us"] = (cpu_total / window["heartbeats"] * 1e6
                                      if window["heartbeats"] else None)
    window["cpu_per_heartbeat_us_by_process"] = {
        name: (c / window["heartbeats"] * 1e6 if window["heartbeats"] else None)
        for name, c in window["cpu"].items()}
    received: dict[str, list[float]] = {}
    for f in finals:
        for tag, times in f.get("received", {}).items():
            received.setdefault(tag, []).extend(times)
    latencies = [t - published[tag] for tag, times in received.items() if tag in published
                 for t in times]
    rss = {name: (after["procs"][name]["rss"] - before["procs"][name]["rss"]) / held
           for name in pids}
    rec.update(
        held=held, held_at_end=sum(f.get("held", 0) for f in finals),
        client_errors=_merged(f.get("errors", {}) for f in finals),
        dropped=sum(f.get("dropped", 0) for f in finals),
        rss_start={name: before["procs"][name]["rss"] for name in pids},
        rss_per_stream=rss, rss_per_stream_total=sum(rss.values()),
        setup_cpu_per_stream_us={name: (cpu_connected[name] - before["procs"][name]["cpu"])
                                 / held * 1e6 for name in pids},
        kernel=kernel_growth(before, after, held, skb), window=window,
        fds=fds, fds_idle=fds_idle,
        fds_per_stream=(sum(fds.values()) - sum(fds_idle.values())) / held if held else None,
        published={"messages": args.messages, "statuses": statuses,
                   "retries": publisher.retries,
                   "delivered": len(latencies), "expected": args.messages * held,
                   "p50_ms": _ms(percentile(latencies, 0.50)),
                   "p99_ms": _ms(percentile(latencies, 0.99)),
                   "max_ms": _ms(max(latencies, default=None))},
        write_run_median_s=statistics.median(rec["write_runs"]) if rec["write_runs"] else None,
    )
    rec["setup_cpu_per_stream_us_total"] = sum(rec["setup_cpu_per_stream_us"].values())
    log(one_line(rec))
    return rec


def _merged(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def one_line(r: dict) -> str:
    w = r["window"]
    return (f"{r['case']} (repeat {r['repeat'] + 1}): held {r['held']:,}/{r['n']:,}, "
            f"heartbeats per stream {w['min']}-{w['max']} over {w['seconds']:.1f} s, "
            f"RSS/stream {r['rss_per_stream_total']:,.0f} B, CPU/heartbeat "
            f"{_f(w['cpu_per_heartbeat_us'], '.2f')} us, p99 {_f(r['published']['p99_ms'])} ms")


# -- the report ------------------------------------------------------------------------------

def _f(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(v: float | None, base: float | None) -> str:
    return "-" if v is None or not base else f"{v / base:.2f}"


def ratios(runs: list[dict]) -> list[dict]:
    """Each run's figures over ``plain``'s of the same repetition."""
    out = []
    for r in runs:
        base = next((b for b in runs if b["case"] == "plain" and b["repeat"] == r["repeat"]),
                    None)
        if base is None:
            continue
        k, kb = r.get("kernel") or {}, base.get("kernel") or {}
        out.append({
            "case": r["case"], "repeat": r["repeat"],
            "rss_per_stream": _div(r["rss_per_stream_total"], base["rss_per_stream_total"]),
            "kernel_per_stream": _div(k.get("total"), kb.get("total")),
            "cpu_per_heartbeat": _div(r["window"]["cpu_per_heartbeat_us"],
                                      base["window"]["cpu_per_heartbeat_us"]),
            "setup_cpu_per_stream": _div(r["setup_cpu_per_stream_us_total"],
                                         base["setup_cpu_per_stream_us_total"]),
            "fds_per_stream": _div(r["fds_per_stream"], base["fds_per_stream"]),
            "p99": _div(r["published"]["p99_ms"], base["published"]["p99_ms"]),
        })
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def markdown(data: dict) -> str:
    meta, runs = data["meta"], data["runs"]
    lines = [
        "# Streams over TLS: at our gunicorn worker, at nginx, and plain",
        "",
        f"`{meta['command']}` on {meta['date']}, commit {meta['commit']}; {meta['machine']}; "
        f"{meta['nginx']}; OpenSSL {meta['openssl']}. Clients and servers share the host's "
        "cores. One gunicorn worker (the project's settings), SSE on "
        f"`{PATH}`, heartbeat {meta['args']['heartbeat']:g} s. Written by "
        "`benchmarks/tls.py` (its docstring says how each figure is taken).",
        "",
        "| case | repeat | streams held | heartbeats per stream in the window (min-max) | TLS | "
        "RSS per stream: worker | nginx | sum | kernel per stream (host-wide) | "
        "CPU per heartbeat (us) | CPU per stream set up (us) | fds per stream | "
        "publish-to-receive p50 / p99 (ms) | delivered |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        w, p, k = r["window"], r["published"], r.get("kernel") or {}
        rss = r["rss_per_stream"]
        lines.append(
            f"| {r['case']} | {r['repeat'] + 1} | {r['held']:,} of {r['n']:,} | "
            f"{w['min']}-{w['max']} | "
            f"{r.get('tls_version') or '-'} {r.get('cipher') or ''} | "
            f"{_f(rss.get('gunicorn worker'))} | {_f(rss.get('nginx worker'))} | "
            f"**{_f(r['rss_per_stream_total'])}** | {_f(k.get('total'))} | "
            f"**{_f(w['cpu_per_heartbeat_us'], '.2f')}** | "
            f"{_f(r['setup_cpu_per_stream_us_total'], ',.0f')} | "
            f"{_f(r['fds_per_stream'], '.2f')} | {_f(p['p50_ms'])} / {_f(p['p99_ms'])} | "
            f"{p['delivered']:,} of {p['expected']:,} |")
    rat = [x for x in ratios(runs) if x["case"] != "plain"]
    if rat:
        lines += ["", "## Against plain streams in the same run", "",
                  "| case | repeat | RSS per stream (sum) | kernel per stream | "
                  "CPU per heartbeat | CPU per stream set up | fds per stream | "
                  "publish p99 |", "|---|---|---|---|---|---|---|---|"]
        for x in rat:
            lines.append(
                f"| {x['case']} | {x['repeat'] + 1} | **{_f(x['rss_per_stream'], '.2f')}** | "
                f"{_f(x['kernel_per_stream'], '.2f')} | "
                f"**{_f(x['cpu_per_heartbeat'], '.2f')}** | "
                f"{_f(x['setup_cpu_per_stream'], '.2f')} | {_f(x['fds_per_stream'], '.2f')} | "
                f"{_f(x['p99'], '.2f')} |")
    lines += ["", "## By process", "",
              "| case | repeat | process | RSS at start (MB) | RSS per stream | "
              "CPU per heartbeat (us) | CPU per stream set up (us) | fds at the end |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = r["window"]
        for name in r["pids"]:
            lines.append(
                f"| {r['case']} | {r['repeat'] + 1} | {name} | "
                f"{r['rss_start'][name] / 1e6:.1f} | "
                f"{_f(r['rss_per_stream'][name])} | "
                f"{_f(w['cpu_per_heartbeat_us_by_process'][name], '.2f')} | "
                f"{_f(r['setup_cpu_per_stream_us'][name])} | {r['fds'][name]:,} |")
    if any(r.get("kernel") for r in runs):
        lines += ["", "## The kernel, host-wide, per stream", "",
                  "Every end of every connection is on this host: the clients' ends are in "
                  "these figures, the same TCP sockets in every case, so the differences "
                  "between cases are the servers' (nginx adds a socket for the client and one "
                  "for the upstream, the worker's socket stays).", "",
                  "| case | repeat | TCP sockets per stream | slab | socket buffers | total |",
                  "|---|---|---|---|---|---|"]
        for r in runs:
            k = r.get("kernel")
            if k:
                lines.append(f"| {r['case']} | {r['repeat'] + 1} | "
                             f"{k['sockets_per_stream']:.2f} | "
                             f"{_f(k['slab'])} | {_f(k['buffers'])} | {_f(k['total'])} |")
    lines += ["", "## The hold window", "",
              "| case | repeat | seconds | heartbeats received | streams without one | CPU (s) "
              "by process | heartbeat write run, median (ms) | connect phase (s) | "
              "load average before |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = r["window"]
        by = ", ".join(f"{n} {c:.2f}" for n, c in w["cpu"].items())
        lines.append(f"| {r['case']} | {r['repeat'] + 1} | {w['seconds']:.1f} | "
                     f"{w['heartbeats']:,} | "
                     f"{w['without_heartbeat']} | {by} | "
                     f"{_f(_ms(r.get('write_run_median_s')), '.1f')} | "
                     f"{r['connect_s']:.1f} | {r['loadavg_before']:.2f} |")
    errors = [r for r in runs if r.get("client_errors") or (r.get("nginx") or {}).get("errors")
              or r["published"].get("retries")]
    if errors:
        lines += ["", "## Errors and retries", "",
                  "What the clients met while connecting (each retried, up to 30 times), "
                  "publishes sent again after no answer in 2 s on a new connection, and "
                  "nginx's error log, by line.", "",
                  "| case | retries | clients gave up | client errors | publishes sent again | "
                  "nginx error log |", "|---|---|---|---|---|---|"]
        for r in errors:
            ce = ", ".join(f"{k} {v:,}" for k, v in r.get("client_errors", {}).items()) or "-"
            ne = ", ".join(f"{k} ({v:,})" for k, v in
                           (r.get("nginx") or {}).get("errors", {}).items()) or "-"
            lines.append(f"| {r['case']} | {r['retries']:,} | {r['failed']:,} | {ce} | "
                         f"{r['published'].get('retries', 0)} | {ne.replace('|', '/')} |")
    notes = [r for r in runs if r["n"] < r["wanted"]]
    if notes:
        r = notes[0]
        lines += ["", f"nginx holds two fds per stream (the client's and the upstream's): at "
                  f"this host's fd limit of {r['nginx']['fd_limit']:,} per process, with "
                  f"{r['nginx']['idle_fds']} fds of its own, one nginx worker fits "
                  f"{r['nginx']['fits']:,} streams, so `tls-nginx` ran at {r['n']:,} "
                  f"(the others at {r['wanted']:,}); every figure is per held stream."]
    lines += ["", "Raw figures: `tls.json`; plot (the last repeat): `tls.png`.", ""]
    return "\n".join(lines)


def plot(out: Path, runs: list[dict]) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = max(r["repeat"] for r in runs)
    shown = [r for r in runs if r["repeat"] == last]
    names = [r["case"] for r in shown]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=110)
    for ax, key, title in ((axes[0], "rss", "RSS per held stream (bytes)"),
                           (axes[1], "cpu", "CPU per delivered heartbeat (us)")):
        bottom = [0.0] * len(shown)
        for proc, colour in (("gunicorn worker", "tab:blue"), ("nginx worker", "tab:orange"),
                             ("nginx master", "tab:red")):
            if key == "rss":
                vals = [r["rss_per_stream"].get(proc) or 0 for r in shown]
            else:
                vals = [r["window"]["cpu_per_heartbeat_us_by_process"].get(proc) or 0
                        for r in shown]
            if any(vals):
                ax.bar(names, vals, bottom=bottom, label=proc, color=colour)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{shown[0]['held']:,} SSE streams, heartbeat {shown[0]['heartbeat']:g} s, "
                 f"one gunicorn worker (repeat {last + 1} of {last + 1})")
    fig.tight_layout()
    path = out / "tls.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def write(out: Path, data: dict) -> str:
    data["ratios"] = ratios(data["runs"])
    (out / "tls.json").write_text(json.dumps(data, indent=1) + "\n")
    text = markdown(data)
    (out / "tls.md").write_text(text)
    plot(out, data["runs"])
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--cases", default=",".join(CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the cases this many times, in turn (ratios within each)")
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=20, help="heartbeats in the hold window")
    ap.add_argument("--messages", type=int, default=5, help="messages published to all")
    ap.add_argument("--message-interval", type=float, default=1.0)
    ap.add_argument("--processes", type=int, default=4, help="client processes a case")
    ap.add_argument("--window", type=int, default=200,
                    help="streams between connect() and their head at once, in all")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="new connects a second, in all (0: only the window paces)")
    ap.add_argument("--connect-timeout", type=float, default=600.0)
    ap.add_argument("--source-block", type=int, default=int(time.time() // 60) % 200 + 20,
                    help="third octet of the first run's client addresses (127.0.B.x)")
    ap.add_argument("--progress", type=float, default=5.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--render", action="store_true", help="only rewrite tls.md and tls.png")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        data = json.loads((out / "tls.json").read_text())
        print(write(out, data))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}: {', '.join(CASES)}")
    if "tls-nginx" in cases and shutil.which("nginx") is None:
        apt_install("nginx-light")
    os.environ.pop("WSGI_HIJACK_REDIS_URL", None)  # the in-process bus, one worker
    command = "python benchmarks/tls.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command.strip(), "commit": git_state(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, kernel "
                       f"{platform.release()}, Python {platform.python_version()}, "
                       f"RLIMIT_NOFILE {hard_nofile()}",
            "nginx": version(["nginx", "-v"]) if shutil.which("nginx") else "no nginx",
            "openssl": ssl.OPENSSL_VERSION, "args": vars(args)}
    runs: list[dict] = []
    data = {"meta": meta, "runs": runs}
    with tempfile.TemporaryDirectory(prefix="tls-bench-") as tmp:
        workdir = Path(tmp)
        cert, key = make_certificate(workdir / "cert")
        index = 0
        for repeat in range(args.repeat):
            for case in cases:
                runs.append(run_case(case, args, index, repeat, workdir, cert, key))
                index += 1
                write(out, data)  # what is done so far, in case a later case fails
    print(write(out, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
