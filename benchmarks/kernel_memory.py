"""Total memory per connection: the server's RSS and the kernel's, idle and with messages flowing.

    python benchmarks/kernel_memory.py                       # 19,900 per server, ~20 minutes
    python benchmarks/kernel_memory.py --connections 300 --out /tmp/km --stall-seconds 10

For each server in ``--servers``, one after the other on a fresh port:

``hijack-sse`` / ``hijack-ws``
    this project's demo under gunicorn (``benchmarks/run.py``'s server: the
    project's settings, one worker), clients on ``/events?channel=bench``
    (Server-Sent Events) or ``/ws?channel=bench`` (WebSocket); messages flow by
    ``POST /publish`` (``--flowing`` a second, ``--size`` bytes each);
``greenlet-sse``
    the baseline, one greenlet per streaming response (``run.py``'s
    ``greenlet``: ``benchmarks/greenlet_baseline.py`` under gunicorn's gevent
    worker); messages flow as its beats, every 1 / ``--flowing`` s, ``--size`` bytes;
``seed-puma``
    the seed on Puma (``harness.servers.start("puma", ...)``, the seed's
    ``seed_config.ru``); with messages flowing, a copy whose reactor sleeps
    1 / ``--flowing`` s instead of 3 and writes ``--size`` bytes instead of ``BEEP``.

Each run takes a snapshot (:mod:`kernel_memory_probe`: ``/proc/slabinfo``,
``/proc/net/sockstat``, ``/proc/meminfo``, ``ss -tm`` per side, the server
process's RSS and CPU) after a warm-up and before any connection, then
connects half of ``--connections`` from one source address, snapshots,
the other half from another (so each cache's growth is seen at N/2 and N:
growth in proportion to connections doubles), and snapshots again
(**idle**: heartbeats only, every ``--heartbeat`` s; 3 s as the seed's).
With messages flowing (**flowing**), the clients read as they come and it
samples for ``--flowing-seconds``; then the clients stop reading
(**stalled**: the receive buffers fill, then the server's send buffers,
then what the server keeps itself) and it samples until the memory stops
growing, the server drops the clients, or ``--stall-seconds``. Servers whose
messages are their beats (greenlet, seed) run twice: idle, then flowing and
stalled.

Every client socket announces an MSS of ``--client-mss`` (1,448: the
server then sizes its send buffer as over Ethernet, not for loopback's
64 KiB MSS) and has a ``--client-rcvbuf`` receive buffer (4 KiB: a stalled
client's bytes then wait in the server's end, which is what is sized, not in
the client's receive buffer, on the client's own machine in a deployment).

**The clients' own kernel memory.** Over loopback both ends of every
connection are on this host and in the same counters. A first run
(``clients``) connects the same clients to a plain holder
(:mod:`kernel_memory_clients`: accepts, answers, holds in one epoll set),
snapshots, then has the holder close every connection it holds while the
clients keep theirs (in CLOSE_WAIT: the same objects): what grew from the
first snapshot to that point is the clients' ends alone, measured; what
went is a bare held server end (the holder's ends become 256-byte
timewait sockets in ``tw_sock_TCP``, left out). Each server's share of a
cache is its run's growth less the clients' share.

Writes ``runs.jsonl`` (one JSON line per run: every snapshot's deltas) and
``results.md`` (:mod:`kernel_memory_report`) into ``--out`` (default
``benchmarks/results/capacity``); ``--render`` rewrites ``results.md`` from
``runs.jsonl``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import resource
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # run as a file: benchmarks/ and this tree

import kernel_memory_probe as probe  # noqa: E402
import kernel_memory_report as report  # noqa: E402
from kernel_memory_clients import Fleet  # noqa: E402
from run import Server as BenchServer  # noqa: E402
from storm import git_state, sources_for  # noqa: E402

from harness import servers  # noqa: E402
from wsgi_hijack.loadclient import default_per_process  # noqa: E402

CHANNEL = "bench"
# kind -> (server, path, websocket, messages by POST /publish)
KINDS = {
    "hijack-sse": ("hijack", f"/events?channel={CHANNEL}", False, True),
    "hijack-ws": ("hijack", f"/ws?channel={CHANNEL}", True, True),
    "greenlet-sse": ("greenlet", "/", False, False),
    "seed-puma": ("puma", "/", False, False),
}
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[kernel_memory {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def payload(size: int, newline: bool = False) -> str:
    """A benchmark message: ``size`` bytes (a newline included if asked), one marker."""
    return "x" * (size - 1 - newline) + "!" + ("\n" if newline else "")


@contextmanager
def environ(**values: str | None):
    """Set (or, for None, remove) environment variables the servers inherit, for a while."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def seed_variant(workdir: Path, rate: float, size: int) -> Path:
    """The seed with messages flowing: its reactor sleeps 1/rate s and writes ``size`` bytes."""
    text = servers.SEED_CONFIG.read_text()
    changed = text.replace("sleep 3\n", f"sleep {1 / rate:g}\n").replace(
        'c << "BEEP\\n"', f'c << "{payload(size - 1)}\\n"')
    if changed.count(f"sleep {1 / rate:g}") != 1 or "BEEP\\n" in changed:
        raise RuntimeError(f"the seed's config changed; cannot vary it: {servers.SEED_CONFIG}")
    path = workdir / f"seed_flowing_{rate:g}_{size}.ru"
    path.write_text(changed)
    return path


def start_server(kind: str, flowing: bool, args, workdir: Path) -> tuple[servers.Server, int]:
    """The server of ``kind`` (the flowing variant for greenlet and seed) and its pid."""
    server_kind = KINDS[kind][0]
    if server_kind == "puma":
        config = seed_variant(workdir, args.flowing, args.size) if flowing else servers.SEED_CONFIG
        srv = servers.start("puma", workdir, app=str(config), raise_fd_limit=True,
                            timeout=60, stop_timeout=30)
        return srv, srv.proc.pid
    beat = payload(args.size - 1) if flowing and server_kind == "greenlet" else None
    heartbeat = 1 / args.flowing if beat else args.heartbeat
    with environ(GREENLET_BASELINE_BEAT=beat, WSGI_HIJACK_REDIS_URL=None,
                 WSGI_HIJACK_WS_PONG_TIMEOUT="100000"):
        srv = BenchServer(server_kind, heartbeat, workdir, None)
    return srv, srv.pid


class Publisher:
    """``POST /publish`` ``rate`` times a second, one kept-alive connection."""

    def __init__(self, port: int, rate: float, body: bytes) -> None:
        self.port, self.rate, self.body = port, rate, body
        self.sent = self.failed = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = None
        due = time.monotonic()
        while not self._halt.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", f"/publish?channel={CHANNEL}", body=self.body)
                resp = conn.getresponse()
                resp.read()
                self.sent += resp.status == 202
                self.failed += resp.status != 202
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
            due = max(due + 1 / self.rate, time.monotonic() - 1)
            self._halt.wait(max(0.0, due - time.monotonic()))
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._halt.set()
        self._thread.join(timeout=60)


class Progress:
    """A progress line every ``every`` seconds while fleets connect and hold."""

    def __init__(self, label: str, every: float) -> None:
        self.label, self.every = label, every
        self.fleets: list[Fleet] = []
        self.phase = ""
        self.next = time.monotonic() + every

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self.next:
            return
        self.next = now + self.every
        total = {k: sum(f.total(k) for f in self.fleets)
                 for k in ("held", "pending", "dropped", "failed", "delivered", "bytes")}
        want = sum(f.n for f in self.fleets)
        log(f"{self.label} {self.phase}: held {total['held']:,}/{want:,} pending "
            f"{total['pending']} dropped {total['dropped']} failed {total['failed']} "
            f"messages {total['delivered']:,} bytes {total['bytes']:,}")


def fleet_sources(run_index: int, n: int, args) -> tuple[str, list[list[str]]]:
    """A warm-up address and, for each half, its clients' addresses (fresh per run)."""
    halves = [n // 2, n - n // 2]
    per = [max(1, math.ceil(h / args.per_process)) for h in halves]
    addrs = sources_for(args.source_block + run_index, 1 + sum(per), 1)
    return addrs[0], [addrs[1:1 + per[0]], addrs[1 + per[0]:]]


def connect_halves(port: int, path: str, ws: bool, n: int, sources: list[list[str]],
                   pid: int | None, prog: Progress, settle: float, args) -> tuple[list, dict]:
    """Half the clients, a snapshot, the other half, a snapshot: (fleets, {"half", "full"})."""
    fleets, snaps = [], {}
    for label, share, addrs in (("half", n // 2, sources[0]), ("full", n - n // 2, sources[1])):
        fleet = Fleet(port, path, share, addrs, ws, window=args.window,
                      mss=args.client_mss, rcvbuf=args.client_rcvbuf)
        fleets.append(fleet)
        prog.fleets = fleets
        prog.phase = f"connect ({label})"
        if not fleet.connect(args.connect_timeout, prog):
            raise RuntimeError(f"{prog.label}: not every client connected in "
                               f"{args.connect_timeout:g} s")
        prog.phase = f"settle ({label})"
        for f in fleets:
            f.settle(settle / len(fleets), prog)
        snaps[label] = probe.snapshot(port, pid, label)
    prog(force=True)
    return fleets, snaps


def stop_fleets(fleets: list[Fleet]) -> dict:
    finals = [x for f in fleets for x in f.stop()]
    return {k: sum(x.get(k, 0) for x in finals)
            for k in ("held", "dropped", "failed", "delivered", "bytes")}


def client_run(args, run_index: int, workdir: Path) -> dict:
    """The clients' own kernel memory, against the plain holder (see the module)."""
    n = args.connections
    port = servers.free_port()
    argv = [sys.executable, str(HERE / "kernel_memory_clients.py"), "--holder", str(port)]
    holder = servers.Server(argv, port, workdir / f"holder-{port}.log", raise_fd_limit=True,
                            name="holder", stop_timeout=30)
    _, sources = fleet_sources(run_index, n, args)
    prog = Progress("clients", args.progress)
    fleets: list[Fleet] = []
    try:
        log(f"clients: {n:,} to the plain holder on port {port} from "
            f"{', '.join(a for s in sources for a in s)}")
        time.sleep(1)
        base = probe.snapshot(port, None, "before")
        fleets, snaps = connect_halves(port, "/", False, n, sources, None, prog, 2.0, args)
        for f in fleets:
            f.mode("freeze")
        holder.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 60
        while probe.socket_memory(port)["server"]["sockets"] and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.0)  # FINs acknowledged; the holder's ends are timewait sockets
        alone = probe.snapshot(port, None, "clients alone")
        gone = snaps["full"]["sockstat"]["tcp_inuse"] - alone["sockstat"]["tcp_inuse"]
        log(f"clients: the holder closed its ends: TCP sockets in use {gone:,} fewer, "
            f"timewait {alone['sockstat']['tcp_tw'] - snaps['full']['sockstat']['tcp_tw']:+,}")
    finally:
        counts = stop_fleets(fleets) if fleets else {}
        holder.stop()
    return {"kind": "clients", "run": run_index, "n": n, "port": port, "counts": counts,
            "sources": sources,
            "half": probe.delta(base, snaps["half"]), "pair": probe.delta(base, snaps["full"]),
            "alone": probe.delta(base, alone)}


def server_run(kind: str, states: tuple[str, ...], args, run_index: int,
               workdir: Path) -> dict:
    """One server: before, half, idle (or flowing at once), flowing, stalled."""
    n = args.connections
    server_kind, path, ws, publishes = KINDS[kind]
    flowing_config = "flowing" in states and not publishes
    srv, pid = start_server(kind, flowing_config, args, workdir)
    warm_addr, sources = fleet_sources(run_index, n, args)
    label = f"{kind} ({'+'.join(states)})"
    prog = Progress(label, args.progress)
    rec: dict = {"kind": kind, "server": server_kind, "states": list(states), "run": run_index,
                 "n": n, "port": srv.port, "pid": pid, "heartbeat": args.heartbeat,
                 "flowing": args.flowing, "size": args.size, "sources": sources,
                 "loadavg_before": os.getloadavg()[0], "samples": {}}
    fleets: list[Fleet] = []
    warm: Fleet | None = Fleet(srv.port, path, 20, [warm_addr], ws, mss=args.client_mss,
                               rcvbuf=args.client_rcvbuf)
    publisher = None
    try:
        log(f"{label}: port {srv.port}, pid {pid}, clients from "
            f"{', '.join(a for s in sources for a in s)}")
        if not warm.connect(60):
            raise RuntimeError(f"{label}: the warm-up clients did not connect:\n"
                               f"{srv.log()[-2000:]}")
        if server_kind != "puma":  # the seed never lets go of a client (its flaw): kept
            warm.stop()
            warm = None
        time.sleep(max(2.0, min(args.heartbeat, 5.0)))
        base = probe.snapshot(srv.port, pid, "before")
        settle = max(2.0, args.heartbeat + 1.0)
        fleets, snaps = connect_halves(srv.port, path, ws, n, sources, pid, prog, settle, args)
        rec["half"] = probe.delta(base, snaps["half"])
        rec["samples"]["idle" if "idle" in states else "connected"] = [
            probe.delta(base, snaps["full"])]
        if "flowing" in states:
            if publishes:
                publisher = Publisher(srv.port, args.flowing, payload(args.size).encode())
            prog.phase = "flowing"
            for f in fleets:
                f.settle(2.0, prog)
            rec["samples"]["flowing"] = sample(fleets, base, srv.port, pid, prog,
                                               args.flowing_seconds, args)
            rec["flowing_cpu"] = cpu_per_message(rec["samples"]["flowing"])
        if "stalled" in states:
            prog.phase = "stalled"
            for f in fleets:
                f.mode("pause")
            rec["samples"]["stalled"] = sample(fleets, base, srv.port, pid, prog,
                                               args.stall_seconds, args, stall=True)
        if publisher:
            rec["published"] = {"sent": publisher.sent, "failed": publisher.failed}
    finally:
        if publisher:
            publisher.stop()
        rec["counts"] = stop_fleets(fleets) if fleets else {}
        if warm is not None:
            warm.stop()
        srv.stop()
        rec["log_tail"] = srv.log()[-1500:]
    return rec


def sample(fleets: list[Fleet], base: dict, port: int, pid: int, prog: Progress,
           seconds: float, args, stall: bool = False) -> list[dict]:
    """Deltas from ``base`` every ``--sample-every`` s for ``seconds``, each with the
    clients' counts then. Stalled, it ends sooner (``stop`` in the last sample)
    once ``--stall-min`` s have passed and the connections' memory (the
    server's RSS, both ends' buffers) grew by under 1 % over the last five
    sample intervals; once half the clients were dropped; or once the host's TCP
    memory reached 90 % of its hard limit (``tcp_mem``'s last value; past it
    the kernel refuses socket memory to every process here)."""
    out: list[dict] = []
    start = time.monotonic()
    hard = probe.tcp_mem_limits()[2]
    while True:
        snap = probe.snapshot(port, pid, "sample")
        d = probe.delta(base, snap)
        d["t"] = round(time.monotonic() - start, 2)
        d["tcp_mem_pages"] = snap["sockstat"].get("tcp_mem", 0)
        d["clients"] = {k: sum(f.total(k) for f in fleets)
                        for k in ("held", "dropped", "delivered", "bytes")}
        out.append(d)
        stop = "time" if time.monotonic() - start >= seconds else None
        if stall and not stop:
            mem = [x["proc"]["rss"] + x["sockets"]["server"]["charged"]
                   + x["sockets"]["client"]["charged"] for x in out[-6:]]
            if d["tcp_mem_pages"] >= 0.9 * hard:
                stop = "host TCP memory near its limit"
            elif d["sockets"]["server"]["sockets"] < args.connections / 2:
                stop = "clients dropped"
            elif len(mem) == 6 and d["t"] >= args.stall_min and max(mem) <= mem[0] * 1.01:
                stop = "plateau"
        if stop:
            d["stop"] = stop
            return out
        for f in fleets:
            f.settle(args.sample_every / len(fleets), prog)


def cpu_per_message(samples: list[dict]) -> dict:
    """Server CPU per delivered message over a flowing window (first to last sample)."""
    a, b = samples[0], samples[-1]
    msgs = b["clients"]["delivered"] - a["clients"]["delivered"]
    cpu = b["proc"]["cpu"] - a["proc"]["cpu"]
    span = b["t"] - a["t"]
    return {"seconds": span, "cpu_s": cpu, "delivered": msgs,
            "cpu_per_message_us": cpu / msgs * 1e6 if msgs else None,
            "cpu_share": cpu / span if span else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=19900)
    ap.add_argument("--servers", default=",".join(KINDS),
                    help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--flowing", type=float, default=10.0,
                    help="messages a second with messages flowing (0: idle only)")
    ap.add_argument("--size", type=int, default=200, help="bytes per message")
    ap.add_argument("--heartbeat", type=float, default=3.0)
    ap.add_argument("--flowing-seconds", type=float, default=20.0)
    ap.add_argument("--stall-seconds", type=float, default=120.0,
                    help="at most this long with the clients not reading (0: skip)")
    ap.add_argument("--stall-min", type=float, default=30.0,
                    help="stalled at least this long before a plateau ends it")
    ap.add_argument("--sample-every", type=float, default=3.0)
    ap.add_argument("--client-mss", type=int, default=1448,
                    help="TCP_MAXSEG of every client socket: the server's ends then size "
                         "their send buffers as over Ethernet, not for loopback's 64 KiB "
                         "MSS (0: loopback's)")
    ap.add_argument("--client-rcvbuf", type=int, default=4096,
                    help="SO_RCVBUF of every client socket (0: the kernel's, autotuned): a "
                         "stalled client's receive buffer is on its own machine in a real "
                         "deployment; small here, the host's TCP memory goes to the server's "
                         "ends")
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--connect-timeout", type=float, default=300.0)
    ap.add_argument("--per-process", type=int, default=min(default_per_process(), 10000))
    ap.add_argument("--source-block", type=int, default=int(time.time() // 60) % 200 + 20,
                    help="third octet of the first run's client addresses (127.0.B.x)")
    ap.add_argument("--progress", type=float, default=5.0)
    ap.add_argument("--out", default=str(HERE / "results" / "capacity"))
    ap.add_argument("--render", action="store_true", help="only rewrite results.md")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines() if x]
        report.write(out, runs)
        return 0
    kinds = [k for k in args.servers.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            ap.error(f"unknown server {k!r}: {', '.join(KINDS)}")
    command = "python benchmarks/kernel_memory.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    meta = {"kind": "meta", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": command.strip(), "commit": git_state(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, kernel "
                       f"{platform.release()}, Python {platform.python_version()}, "
                       f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}",
            **probe.tcp_settings(), "page": probe.PAGE,
            "slab_aliases": probe.slab_aliases(), "args": vars(args)}
    plan: list[tuple[str, tuple[str, ...]]] = []
    moving = ("flowing", "stalled") if args.stall_seconds > 0 else ("flowing",)
    for k in kinds:
        if not args.flowing:
            plan.append((k, ("idle",)))
        elif KINDS[k][3]:
            plan.append((k, ("idle", *moving)))
        else:
            plan += [(k, ("idle",)), (k, moving)]
    runs = [meta]
    jsonl = out / "runs.jsonl"
    jsonl.write_text(json.dumps(meta) + "\n")
    with tempfile.TemporaryDirectory(prefix="kernel-memory-") as tmp:
        workdir = Path(tmp)
        for index, (kind, states) in enumerate([("clients", ()), *plan]):
            rec = (client_run(args, index, workdir) if kind == "clients"
                   else server_run(kind, states, args, index, workdir))
            runs.append(rec)
            with jsonl.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            log(report.one_line(rec, runs))
    text = report.write(out, runs)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
