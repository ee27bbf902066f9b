"""Connect storms, measured against the seed (the 2018 gist on Puma).

    python benchmarks/storm.py                       # N = 19,900, 3 pairs: results/storm.*
    python benchmarks/storm.py --n 300 --pairs 1 --hold 1 --out /tmp/storm   # small

Every client connects at once, as after a deploy (``wsgi-hijack-load --storm``:
no pacing, no retries, each client process makes its sockets first and all
connect on one signal), against, one after the other:

``ours``
    ``gunicorn -c gunicorn.conf.py wsgi_hijack:app`` (one worker);
``puma``
    the seed: ``puma -b tcp://127.0.0.1:PORT seed_config.ru``, in single mode
    (one process: no ``-w``, no config file, no ``WEB_CONCURRENCY``);
``gthread``
    ours under ``-k gthread --threads 4`` (OS-thread handlers, no monkeypatching);
``reuseport``
    ours with ``--workers 2``: ``gunicorn.conf.py`` gives each worker its own
    ``SO_REUSEPORT`` socket (``WSGI_HIJACK_ALLOW_LOCAL_BUS=1``: the demo never
    publishes).

The seed's heartbeat is a fixed 3 s, so ours runs with ``WSGI_HIJACK_HEARTBEAT=3``.
A storm's time is a step function of TCP's SYN retransmission timers (1, 3,
7, 15, 31, 63 s after a lost SYN): one backlog overflow more or less moves a
single run by 2 x. So ``ours`` and ``puma`` run as ``--pairs`` pairs, the
order alternating (ours, puma, puma, ours, ...), the other kinds after each
pair, and each kind is compared with the seed of its own round; the table
gives the median pair.

For each run: clients held, clients closed without an answer (the connect
succeeded, the server closed or reset it before any response head), the time
until all were hijacked (from the first connect to the last response head),
RSS per held connection after the storm (the server's RSS from ``/proc`` after
a ``--hold`` of two heartbeats, minus its RSS just before the storm, over
held; two workers summed), and the kernel's ``TcpExtListenOverflows``,
``TcpExtListenDrops`` and ``TcpExtTCPSynRetrans`` over the run (``nstat``:
the machine's counters, so whatever else runs on it counts too). Writes
``storm.md``, ``storm.json`` and ``storm.png`` (hijacked connections over
time) into ``--out``; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a file: the harness, and this tree's wsgi_hijack

from harness import servers, wire  # noqa: E402
from harness.servers import SEED_CONFIG  # noqa: E402
from wsgi_hijack import loadclient  # noqa: E402

KINDS = ("ours", "puma", "gthread", "reuseport")
LABELS = {"ours": "ours (gevent, 1 worker)", "puma": "the seed on Puma",
          "gthread": "ours, gthread (4 threads)", "reuseport": "ours, 2 workers SO_REUSEPORT"}
COLORS = {"ours": "tab:blue", "puma": "tab:red", "gthread": "tab:green",
          "reuseport": "tab:purple"}
# The kernel's counters read around each run (nstat's names).
COUNTERS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtTCPSynRetrans",
            "TcpExtSyncookiesSent", "TcpExtTCPReqQFullDoCookies", "TcpExtTCPReqQFullDrop")
ROUND_RE = re.compile(r"(?:\[(\d+)\] \[[^]]*\] )?Number of clients connected: (\d+), "
                      r"time for entire write run: ([0-9.e-]+)")
ERROR_RE = re.compile(r"Traceback|\[ERROR\]|\[CRITICAL\]")
WORKER_RE = re.compile(r"Using worker: (\S+)")


def log(msg: str) -> None:
    print(f"[storm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- what the run needs --------------------------------------------------------------------

def apt_install(*packages: str) -> None:
    """Install Debian packages the way scripts/test.sh does (root, non-interactive)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    log(f"installing {' '.join(packages)} with apt-get")
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


def ensure_tools(kinds: list[str]) -> None:
    if "puma" in kinds and shutil.which("puma") is None:
        apt_install("puma", "ruby-rack")
    if shutil.which("nstat") is None:
        apt_install("iproute2")


def counters() -> dict[str, int]:
    """The kernel's TCP counters, absolute. ``nstat -a`` ignores nstat's history
    file (whose deltas depend on whoever ran nstat last) and ``-s`` leaves it
    alone; the run's figures are after minus before."""
    out = subprocess.run(["nstat", "-asz", *COUNTERS], capture_output=True, text=True,
                         check=True).stdout
    values = {name: 0 for name in COUNTERS}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in values:
            values[parts[0]] = int(parts[1])
    return values


def listeners(port: int) -> int:
    """Listening TCP sockets on ``port`` (two under SO_REUSEPORT with 2 workers)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except FileNotFoundError:
            pass
    return count


def listen_backlogs(port: int) -> list[int]:
    """Each listening socket's backlog, as the kernel has it (``ss``'s Send-Q)."""
    try:
        out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [int(line.split()[2]) for line in out.splitlines() if len(line.split()) > 2]


def git_state() -> str:
    """The commit measured, and whether the tree had changes on top of it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head or '?'}{' with uncommitted changes' if dirty.strip() else ''}"


def version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


# -- the servers -----------------------------------------------------------------------------

class Server(servers.Server):
    """One server under test, on a fresh port (:mod:`harness.servers`): started,
    waited for until every process listens, measured, stopped."""

    def __init__(self, kind: str, args: argparse.Namespace, workdir: Path) -> None:
        self.kind = kind
        self.worker_count = 2 if kind == "reuseport" else 1
        self.warm: list[socket.socket] = []
        port = servers.free_port()
        if kind == "puma":
            # The seed as it was run: single mode, no config file (see argv_for).
            argv = servers.argv_for("puma", port, str(args.seed_config))
            env = servers.server_env()
            cwd = args.seed_config.parent
        else:
            env = servers.server_env(args.heartbeat)
            if kind == "gthread":
                extra = ["-k", "gthread", "--threads", str(args.threads), "--workers", "1"]
            elif kind == "reuseport":
                env["WSGI_HIJACK_ALLOW_LOCAL_BUS"] = "1"
                env.pop("WSGI_HIJACK_REUSEPORT", None)
                extra = ["--workers", "2"]
            else:
                extra = ["--workers", "1"]
            argv = servers.argv_for("gunicorn", port, args=extra)
            cwd = REPO
        super().__init__(argv, port, workdir / f"{kind}-{port}.log", env=env, cwd=cwd,
                         ready=self._listening, timeout=60, stop_timeout=30,
                         raise_fd_limit=True, name=kind)

    def pids(self) -> list[int]:
        """The processes that hold connections: Puma itself, gunicorn's workers."""
        return [self.proc.pid] if self.kind == "puma" else self.workers()

    def _listening(self, server: servers.Server) -> bool:
        return (len(self.pids()) == self.worker_count
                and listeners(self.port) >= self.worker_count)

    def warm_up(self, n: int) -> None:
        """``n`` clients, answered, so that the first requests' one-off costs
        (imports, first paths) fall before the RSS taken before the storm.

        Ours: then closed, so the worker holds only the storm (it may hold
        its fd limit minus 100: 19,900 here, every fd of the storm). The
        seed: kept open through the run, because it never drops a client that
        left, and the first dead one in its set ends every later client's
        BEEPs (its flaw), which would spoil the hold that follows."""
        self.warm += wire.open_streams(self.port, n, timeout=10)
        for s in self.warm:
            try:
                head, _ = wire.read_head(s)
            except wire.Closed:
                raise RuntimeError(f"{self.kind}: warm-up connection closed:\n"
                                   f"{self.log()[-2000:]}") from None
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"{self.kind}: warm-up got {head[:200]!r}")
        if self.kind != "puma":
            for s in self.warm:
                s.close()
            self.warm.clear()

    def last_rounds(self) -> dict[str, int]:
        """The connection count of each process's last logged write run (the
        seed prints the same line as ours): the server's own count."""
        last: dict[str, int] = {}
        for pid, count, _ in ROUND_RE.findall(self.log()):
            last[pid or str(self.proc.pid)] = int(count)
        return last

    def worker_class(self) -> str:
        """The worker class gunicorn says it uses ("puma" for the seed)."""
        found = WORKER_RE.search(self.log())
        return found.group(1) if found else self.kind

    def stop(self, timeout: float | None = None) -> None:
        for s in self.warm:
            s.close()
        super().stop(timeout)


# -- one storm -------------------------------------------------------------------------------

def sources_for(run_index: int, processes: int, block: int) -> list[str]:
    """The client source addresses of one run: its own block, 127.0.B.2, .3, ...

    TIME_WAIT keeps a closed connection's (source, port, destination, port)
    for 60 s on the side that closed first (the clients, here). Every run
    gets a third octet of its own (``--source-block`` + the run's index), so
    back-to-back runs never meet the last run's ports, and a run's clients
    get the whole ephemeral range on each of their addresses."""
    third = (block + run_index - 1) % 254 + 1
    return [f"127.0.{third}.{2 + i}" for i in range(processes)]


def storm(kind: str, round_no: int, run_index: int, args: argparse.Namespace,
          workdir: Path) -> dict:
    per_process = args.per_process or loadclient.default_per_process()
    processes = max(1, -(-args.n // per_process))
    sources = sources_for(run_index, processes, args.source_block)
    server = Server(kind, args, workdir)
    try:
        server.warm_up(args.warmup)
        time.sleep(1.0)  # ours: the warm-up clients' closes are seen and their fds freed
        backlog = listen_backlogs(server.port)
        pids = server.pids()
        log(f"run {run_index + 1} (round {round_no + 1}) {kind}: {args.n:,} at once on "
            f"port {server.port}, pids {pids}, backlog {backlog}, from {', '.join(sources)}")
        load = os.getloadavg()[0]  # the machine is shared: what else ran, roughly
        before = counters()
        report = loadclient.run(server.url, args.n, duration=args.hold, server_pids=pids,
                                per_process=per_process, source_addresses=",".join(sources),
                                head_timeout=args.head_timeout, progress=args.progress,
                                storm=True)
        after = counters()
        rounds = server.last_rounds()
        errors = [ln for ln in server.log().splitlines() if ERROR_RE.search(ln)]
        exited = server.proc.poll()
        worker_class = server.worker_class()
    finally:
        server.stop()
    c, st = report["connections"], report["storm"]
    held = c["held"]
    procs = [s for s in report["server"] if not s.get("gone")]
    rss_before = sum(s["rss_before"] for s in procs)
    rss_after = sum(s["rss_end"] for s in procs)
    rss_hijacked = sum(s["rss_held"] for s in procs)
    gone = len(procs) != len(report["server"])
    result = {
        "kind": kind, "round": round_no, "run": run_index, "n": args.n,
        "sources": sources, "port": server.port, "backlog": backlog, "argv": server.argv,
        "worker_class": worker_class, "loadavg_before": load,
        "held": held, "closed_without_answer": c["closed_without_answer"],
        "timed_out": c["timed_out"], "connect_failed": c["connect_failed"],
        "failed": c["failed"], "dropped": c["dropped"], "errors": c["errors"],
        "time_to_all_hijacked_s": st["time_to_all_hijacked"],
        "time_to_half_s": st["time_to_half"], "time_to_last_head_s": st["time_to_last_head"],
        "connect_spread_s": st["connect_spread"],
        "rss_before": rss_before, "rss_after": rss_after,
        # After the hold (every client had its heartbeats), as a settled figure;
        # the RSS the moment the last was hijacked is kept beside it.
        "rss_per_held": (rss_after - rss_before) / held if held and not gone else None,
        "rss_per_held_at_hijack": (rss_hijacked - rss_before) / held if held and not gone
        else None,
        "server_processes": [{k: s.get(k) for k in ("pid", "rss_before", "rss_held", "rss_end",
                                                    "fds_held", "cpu_connect_s", "gone")}
                             for s in report["server"]],
        "server_cpu_s": sum(s["cpu_connect_s"] for s in procs),
        "server_last_round_counts": rounds,
        "server_log_errors": errors[:20], "server_exited": exited,
        "messages_min": report["hold"]["messages_per_connection_total"]["min"],
        "hold_s": args.hold,
        "counters": {k: after[k] - before[k] for k in COUNTERS},
        "heads_over_time": thin(st["heads_over_time"], args.plot_points),
    }
    took = result["time_to_all_hijacked_s"]
    log(f"  {kind}: held {held:,}/{args.n:,}, closed without an answer "
        f"{result['closed_without_answer']}, all hijacked in "
        f"{f'{took:.2f} s' if took is not None else '- (not all)'}, RSS/held "
        f"{_b(result['rss_per_held'])}, overflows {result['counters']['TcpExtListenOverflows']}, "
        f"SYN retransmits {result['counters']['TcpExtTCPSynRetrans']}")
    return result


def thin(points: list[list[float]], most: int) -> list[list[float]]:
    """At most about ``most`` points of a heads-over-time curve, the last kept."""
    if len(points) <= most:
        return points
    step = points[-1][0] / most
    out, last_t = [points[0]], points[0][0]
    for p in points[1:-1]:
        if p[0] - last_t >= step:
            out.append(p)
            last_t = p[0]
    out.append(points[-1])
    return out


# -- the report ------------------------------------------------------------------------------

def _b(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} B"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _all(r: dict) -> str:
    """Time until all were hijacked, or when the last head came if not all did."""
    if r["time_to_all_hijacked_s"] is not None or r["time_to_last_head_s"] is None:
        return _s(r["time_to_all_hijacked_s"])
    return f"- (last head {r['time_to_last_head_s']:.2f})"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def ratios(runs: list[dict]) -> dict:
    """Each kind against the seed's run of the same round: per round, and the
    median pair. A run where not all were hijacked has no time; its pair is
    left out of the time ratio (and says so in the table)."""
    out: dict = {}
    seeds = {r["round"]: r for r in runs if r["kind"] == "puma"}
    for kind in KINDS:
        mine = sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["round"])
        if not mine:
            continue
        entry: dict = {"times": [r["time_to_all_hijacked_s"] for r in mine],
                       "rss": [r["rss_per_held"] for r in mine],
                       "held": [r["held"] for r in mine],
                       "closed_without_answer": [r["closed_without_answer"] for r in mine]}
        for key, field in (("time", "time_to_all_hijacked_s"), ("rss", "rss_per_held")):
            pairs = []
            for r in mine:
                seed = seeds.get(r["round"])
                a, b = r[field], seed[field] if seed else None
                pairs.append(a / b if a is not None and b else None)
            done = [p for p in pairs if p is not None]
            entry[f"{key}_ratio_pairs"] = pairs
            entry[f"{key}_ratio_median"] = statistics.median(done) if done else None
        vals = [t for t in entry["times"] if t is not None]
        entry["time_median"] = statistics.median(vals) if vals else None
        vals = [t for t in entry["rss"] if t is not None]
        entry["rss_median"] = statistics.median(vals) if vals else None
        out[kind] = entry
    return out


def write_markdown(path: Path, runs: list[dict], summary: dict, meta: dict) -> None:
    n = meta["n"]
    lines = [
        f"# Connect storm: {n:,} clients at once, against the seed",
        "",
        f"{meta['date']}; {meta['machine']}. `{meta['command']}`.",
        "",
        f"Each run: one server on a fresh port, {meta['warmup']} warm-up clients "
        "answered (then closed; on the seed kept open, as it never lets go of a client "
        f"that left), then `wsgi-hijack-load --storm`: {n:,} connects issued at "
        "once (no pacing, no retries) from client processes with source addresses of that "
        f"run's own, then a {meta['hold']:g} s hold. Heartbeat {meta['heartbeat']:g} s for "
        "ours (the seed's is a fixed 3 s). Ratios are against the seed's run of the same "
        "round; the median pair is given with every pair in round order.",
        "",
        f"Versions: {meta['versions']}; this repository at {meta['git']}. Worker classes: "
        + ", ".join(f"{k}: `{v}`" for k, v in meta["worker_classes"].items()) + ".",
        "",
        "## Against the seed, median pair",
        "",
        "| server | held | closed without an answer | time until all hijacked (s) | "
        "x seed (median pair; pairs) | RSS per held connection | x seed (median pair; pairs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, e in summary.items():
        times = ", ".join(_s(t) for t in e["times"])
        tpairs = ", ".join(_x(p) for p in e["time_ratio_pairs"])
        rpairs = ", ".join(_x(p) for p in e["rss_ratio_pairs"])
        rss = ", ".join(_b(v) for v in e["rss"])
        if kind == "puma":
            tratio = rratio = "1 (the anchor)"
        else:
            tratio = f"**{_x(e['time_ratio_median'])}** ({tpairs})"
            rratio = f"**{_x(e['rss_ratio_median'])}** ({rpairs})"
        lines.append(
            f"| {LABELS[kind]} | {', '.join(f'{h:,}' for h in e['held'])} | "
            f"{', '.join(str(c) for c in e['closed_without_answer'])} | {times} | "
            f"{tratio} | {rss} | {rratio} |")
    lines += [
        "",
        "Per kind, its runs in round order. *Closed without an answer*: the connect "
        "succeeded, then the server closed or reset the connection before any response "
        "head. *Time until all hijacked*: from the first connect to the last response head "
        "(`-`: not all got one). *RSS per held connection*: the server's RSS after the hold "
        "minus its RSS just before the storm, over the clients held (two workers summed; "
        "the seed: its one process).",
        "",
        "## Every run, in run order",
        "",
        "| run | round | server | held | closed without an answer | no head in time | "
        "all hijacked (s) | half (s) | RSS per held | at hijack | ListenOverflows | "
        "ListenDrops | SYN retransmits | heartbeats (min) | backlog | sources |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        k = r["counters"]
        lines.append(
            f"| {r['run'] + 1} | {r['round'] + 1} | {r['kind']} | {r['held']:,} | "
            f"{r['closed_without_answer']} | {r['timed_out']} | "
            f"{_all(r)} | {_s(r['time_to_half_s'])} | "
            f"{_b(r['rss_per_held'])} | {_b(r['rss_per_held_at_hijack'])} | "
            f"{k['TcpExtListenOverflows']:,} | {k['TcpExtListenDrops']:,} | "
            f"{k['TcpExtTCPSynRetrans']:,} | {r['messages_min']} | "
            f"{', '.join(str(b) for b in r['backlog'])} | "
            f"{', '.join(r['sources'])} |")
    lines += [
        "",
        "Kernel counters (`nstat -asz`, after minus before the storm and its hold) are the "
        "machine's: clients and server share loopback, and anything else running counts "
        "too. A SYN that finds the listen queue full is dropped (ListenOverflows, "
        "ListenDrops) and the client's kernel sends it again 1, 3, 7, 15 ... s later "
        "(TCPSynRetrans, which also counts SYN-ACKs sent again), which is what makes a "
        "storm's time a step function. Backlog: "
        "each listening socket's, as `ss` shows it (Puma's default is 1024, "
        "`gunicorn.conf.py` asks 4096, capped by `net.core.somaxconn`). Heartbeats (min): "
        "the fewest BEEPs any held client got by the end of the hold. *At hijack*: RSS per "
        "held connection the moment the last was hijacked, before the hold.",
        "",
        "![hijacked connections over time](storm.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(path: Path, runs: list[dict], summary: dict, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ("-", "--", ":", "-.")
    panels = [("ours beside the seed", ("ours", "puma")),
              ("gthread and 2 workers (SO_REUSEPORT), the seed again", ("gthread", "reuseport",
                                                                          "puma"))]
    panels = [(t, [k for k in ks if k in summary]) for t, ks in panels]
    panels = [(t, ks) for t, ks in panels if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), dpi=110,
                             sharey=True, squeeze=False)
    for ax, (title, kinds) in zip(axes[0], panels, strict=True):
        for kind in kinds:
            for r in sorted((r for r in runs if r["kind"] == kind), key=lambda r: r["round"]):
                pts = r["heads_over_time"]
                label = f"{LABELS[kind]}, round {r['round'] + 1}"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=COLORS[kind],
                        linestyle=styles[r["round"] % len(styles)], linewidth=1.4, label=label)
        ax.axhline(n, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds since the first connect")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel(f"connections hijacked (of {n:,})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------

def order_of_rounds(pairs: int, kinds: list[str]) -> list[list[str]]:
    """ours, puma, puma, ours, ...: the pair's order alternates each round, and
    the other kinds follow their pair (their order alternating too)."""
    rounds = []
    for r in range(pairs):
        pair = [k for k in ("ours", "puma") if k in kinds]
        rest = [k for k in kinds if k not in ("ours", "puma")]
        if r % 2:
            pair.reverse()
            rest.reverse()
        rounds.append(pair + rest)
    return rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=19900, help="clients in each storm")
    ap.add_argument("--pairs", type=int, default=3, help="rounds (ours/puma pairs)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"which servers, comma-separated (of {', '.join(KINDS)})")
    ap.add_argument("--hold", type=float, default=6.0,
                    help="seconds to hold after the last head (two heartbeats), then read RSS")
    ap.add_argument("--heartbeat", type=float, default=3.0,
                    help="ours (the seed's is a fixed 3 s)")
    ap.add_argument("--threads", type=int, default=4, help="gthread's threads")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--head-timeout", type=float, default=150.0,
                    help="give up on a client with no head after S s (past the SYN "
                         "retransmission schedule, ~127 s)")
    ap.add_argument("--per-process", type=int, default=None,
                    help="clients per client process (default: the fd limit's ~19,000)")
    ap.add_argument("--source-block", type=int, default=1,
                    help="run k's clients bind to 127.0.(B+k).2, .3, ...")
    ap.add_argument("--seed-config", type=Path, default=SEED_CONFIG)
    ap.add_argument("--plot-points", type=int, default=600,
                    help="points kept per heads-over-time curve")
    ap.add_argument("--progress", type=float, default=2.0,
                    help="seconds between the load client's progress lines (0: none)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    if "puma" in kinds and not args.seed_config.is_file():
        ap.error(f"the seed's Rack app is not at {args.seed_config}")
    ensure_tools(kinds)
    servers.raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="storm-"))
    plan = order_of_rounds(args.pairs, kinds)
    total = sum(len(r) for r in plan)
    log(f"{total} storms of {args.n:,}: " + " | ".join(", ".join(r) for r in plan)
        + f"; server logs in {workdir}")
    runs: list[dict] = []
    for round_no, kinds_here in enumerate(plan):
        for kind in kinds_here:
            runs.append(storm(kind, round_no, len(runs), args, workdir))
            time.sleep(1.0)  # let the last server's closes settle
    summary = ratios(runs)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Linux "
                   f"{platform.release()}, Python {platform.python_version()}, "
                   f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}",
        "command": "python benchmarks/storm.py " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "n": args.n, "pairs": args.pairs, "kinds": kinds, "hold": args.hold,
        "heartbeat": args.heartbeat, "warmup": args.warmup, "threads": args.threads,
        "logs": str(workdir),
        "git": git_state(),
        "worker_classes": {r["kind"]: r["worker_class"] for r in runs},
        "versions": ", ".join(v for v in (
            version(["puma", "--version"]) if "puma" in kinds else "",
            version(["ruby", "--version"]).split(" [")[0] if "puma" in kinds else "",
            version([sys.executable, "-m", "gunicorn", "--version"]),
            f"Python {platform.python_version()}") if v),
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
        "tcp_syncookies": Path("/proc/sys/net/ipv4/tcp_syncookies").read_text().strip(),
    }
    data = {"meta": meta, "summary": summary, "runs": runs}
    text = json.dumps(data, indent=1)
    # One line per [t, heads] point, not three.
    text = re.sub(r"\[\s+(-?[0-9.e+-]+),\s+(-?[0-9.e+-]+)\s+\]", r"[\1, \2]", text)
    (args.out / "storm.json").write_text(text + "\n")
    write_markdown(args.out / "storm.md", runs, summary, meta)
    plot(args.out / "storm.png", runs, summary, args.n)
    print((args.out / "storm.md").read_text())
    log(f"wrote {args.out / 'storm.md'}, storm.json, storm.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
