"""A reload with handoff against a reload with goodbye and reconnect, in one run.

    python benchmarks/handoff.py --connections 19900 --repeat 3
    python benchmarks/handoff.py --connections 300 --repeat 1 --out /tmp/handoff   # small

Each run starts the demo (``wsgi_hijack:app``) under gunicorn with the
project's settings, one worker, its own handoff directory, and either
``WSGI_HIJACK_HANDOFF=1`` (**handoff**: on HUP the old worker gives every
held connection to the master's park, which gives them to the new worker) or
``WSGI_HIJACK_HANDOFF=0`` (**goodbye**: each connection gets ``retry: 1000``
and is closed; its client reconnects with ``Last-Event-ID`` and replays).
The two modes alternate (``--repeat K`` pairs), each run's clients bind to
addresses of their own (127.0.B.2, .3, ...: TIME_WAIT holds a closed
connection's ports for 60 s).

A run: N EventSource clients (``benchmarks/handoff_clients.py``, several
processes) open ``GET /events?channel=bench`` until every one is held; a
publisher sends ``POST /publish?channel=bench`` ``--rate`` times a second,
the body carrying its number and the time it was sent. Just after a
heartbeat round (so that no heartbeat of the old worker comes after the HUP),
and at least ``--before`` seconds into the publishing, the clients note the
moment (``mark``) and the master gets SIGHUP. Publishing goes on until every
client is served by the new worker and ``--after`` seconds more. Measured:

1. **closes**: clients that saw their stream end (EOF or reset) after the HUP;
2. **served**: seconds from the HUP until every client has received a byte
   written by the new worker: its first heartbeat after the HUP (a moved
   connection gets one at once when the new worker resumes it) or a new
   response head (it reconnected; the new worker holds it);
3. **CPU**: user + system seconds of the master's children (old worker, new
   worker, park; ``/proc/<pid>/stat``, plus the master's ``cutime``/``cstime``
   for those it has reaped), from the HUP until (2);
4. **latency**: publish-to-receive p50/p99 of every delivery of the messages
   published from 1 s before the HUP to the end, and per client every
   message missed or received twice.

Writes ``runs.jsonl`` (one run a line, as it ends), ``results.md`` and
``handoff.png`` into ``--out`` (default ``benchmarks/results/handoff``), and
the servers' logs into ``--out``/``logs``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # run as a file: benchmarks/ and this tree

import fleet  # noqa: E402
import handoff_report  # noqa: E402
from handoff_clients import ClientProc  # noqa: E402
from handoff_load import CHANNEL, CpuSampler, Publisher, kids, metrics_held  # noqa: E402
from storm import git_state, sources_for  # noqa: E402

from harness import servers, wire  # noqa: E402
from wsgi_hijack.loadclient import default_per_process, plan  # noqa: E402

MODES = ("handoff", "goodbye")
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[handoff {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- the client processes ------------------------------------------------------------------

class Fleet(fleet.Fleet):
    """The client processes (:class:`handoff_clients.ClientProc`), read as they report."""

    poll = 0.02

    def __init__(self, shares: list[dict], port: int, progress: float,
                 show: Callable[[], str]) -> None:
        request = (f"GET /events?channel={CHANNEL} HTTP/1.1\r\nHost: {wire.HOST}:{port}\r\n"
                   "User-Agent: wsgi-hijack-handoff-bench\r\nAccept: text/event-stream\r\n\r\n")
        window = max(1, 1000 // len(shares))
        super().__init__([ClientProc(i, {"n": s["n"], "source": s["source"], "host": wire.HOST,
                                         "port": port, "request": request, "window": window,
                                         "rate": 0, "retries": 60, "head_timeout": 60,
                                         "progress": 0.05})
                          for i, s in enumerate(shares)])
        self.progress = progress
        self.show = show
        self.next_show = time.monotonic() + progress if progress else math.inf

    def pumped(self) -> None:
        now = time.monotonic()
        if now >= self.next_show:
            self.next_show = now + self.progress
            log(self.show())


# -- one run ---------------------------------------------------------------------------------

def one_run(mode: str, index: int, args: argparse.Namespace, workdir: Path,
            redis_url: str | None) -> dict:
    n = args.connections
    processes = args.processes or max(2, math.ceil(n / default_per_process()))
    sources = sources_for(index, processes, args.source_block)
    shares = plan(n, wire.HOST, math.ceil(n / processes), ",".join(sources))
    rundir = workdir / f"run{index + 1}-{mode}"
    rundir.mkdir()
    env = {"WSGI_HIJACK_HANDOFF_DIR": str(rundir / "rendezvous"),
           "WSGI_HIJACK_HANDOFF": "1" if mode == "handoff" else "0"}
    if redis_url:
        env["WSGI_HIJACK_REDIS_URL"] = redis_url
    server = servers.start("gunicorn", rundir, args=("--workers", "1"), env=env,
                           heartbeat=args.heartbeat, ready=servers.workers_ready(1),
                           raise_fd_limit=True, timeout=60, stop_timeout=60)
    master = server.proc.pid
    record: dict = {"mode": mode, "run": index + 1, "n": n, "port": server.port,
                    "sources": sources, "bus": args.bus, "heartbeat": args.heartbeat,
                    "rate": args.rate, "loadavg_before": os.getloadavg()[0]}
    publisher = Publisher(server.port, args.rate)
    sampler = CpuSampler(master)
    phase = "connect"
    t_hup: float | None = None
    fleet: Fleet | None = None

    def show() -> str:
        assert fleet is not None
        since = f" {time.monotonic() - t_hup:6.2f}s after HUP" if t_hup else ""
        return (f"run {index + 1} {mode:7} {phase:9}{since}: held {fleet.total('held')}/{n}, "
                f"closed {fleet.total('closed_clients')}, served by the new worker "
                f"{fleet.total('served')}, reconnecting {fleet.total('waiting')}, "
                f"messages {fleet.total('messages')}, published {len(publisher.records)}")

    try:
        if mode == "handoff":
            where = rundir / "rendezvous"
            ok = _wait(lambda: any(where.glob("worker-*.sock")), 30)
            assert ok, f"the worker never listened for handoffs:\n{server.log()[-2000:]}"
        old = [p for p in kids(master)
               if b"handoff.park" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        log(f"run {index + 1} {mode}: gunicorn {master} (worker {old}) on port "
            f"{server.port}, {n:,} clients from {', '.join(sources)}")
        fleet = Fleet(shares, server.port, args.progress, show)
        # Held and subscribed: every client got its stream's opening (retry: 2000).
        if not fleet.until(lambda: all(p.ready for p in fleet.procs)
                           and fleet.total("opened") >= n, args.connect_timeout):
            raise RuntimeError(f"only {fleet.total('opened')} of {n} subscribed: {show()}")
        phase = "publish"
        sampler.start()
        publisher.start()
        # Just after a heartbeat round: every client got one, then none for 0.3 s.
        pings = fleet.total("pings")
        synced = fleet.until(
            lambda: fleet.total("pings") >= pings + n
            and time.monotonic() - fleet.latest("last_ping") > 0.3
            and time.monotonic() - publisher.started >= args.before, 3 * args.heartbeat + 30)
        if not synced:
            raise RuntimeError(f"no heartbeat round to HUP after: {show()}")
        record["held_before"] = metrics_held(server.port)
        fleet.send("mark")
        fleet.until(lambda: all(p.marked for p in fleet.procs), 10)
        record["hup_after_round_s"] = time.monotonic() - fleet.latest("last_ping")
        before = sampler.sample()
        t_hup = time.monotonic()
        os.kill(master, signal.SIGHUP)
        phase = "reload"
        all_served = fleet.until(lambda: fleet.total("served") >= n, args.reload_timeout)
        t_seen = time.monotonic()
        log(f"run {index + 1} {mode}: " + (f"all {n:,} served by the new worker (seen "
                                           f"{t_seen - t_hup:.2f} s after the HUP)"
                                           if all_served else f"NOT all served: {show()}"))
        phase = "after"
        fleet.until(lambda: False, args.after)
        publisher.stop()
        phase = "drain"
        fleet.until(publisher.done, 90)
        drain(fleet, n * sum(r["status"] == 202 for r in publisher.records.values()), args.drain)
        record["held_after"] = metrics_held(server.port)
        record["workers_after"] = kids(master)
        finals = fleet.stop()
        fleet = None
        sampler.stop()
    finally:
        publisher.stop()
        if fleet is not None:
            fleet.stop()
        if sampler.is_alive():
            sampler.stop()
        server.stop()
        logs = args.out / "logs"
        logs.mkdir(exist_ok=True)
        shutil.copy(server.log_path, logs / f"run{index + 1}-{mode}.log")
    record.update(handoff_report.analyse(
        n, t_hup, finals, list(publisher.records.values()), before, sampler.samples,
        old, args.window_before))
    record["server_log"] = handoff_report.log_lines(server.log())
    record["client_processes"] = [{k: f.get(k) for k in (
        "held", "dropped", "failed", "retries", "closed_without_answer", "timed_out",
        "connect_failed", "errors", "closes_before_mark", "not_connected")} for f in finals]
    return record


def drain(fleet: Fleet, expected: int, quiet: float, most: float = 120.0) -> None:
    """Until the clients have received ``expected`` messages in all, or none
    came for ``quiet`` seconds (some are lost, or still very late), at most ``most``."""
    last = [fleet.total("messages"), time.monotonic()]

    def settled() -> bool:
        now, got = time.monotonic(), fleet.total("messages")
        if got != last[0]:
            last[:] = [got, now]
        return got >= expected or now - last[1] >= quiet

    fleet.until(settled, most)


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", "-n", type=int, default=19900)
    ap.add_argument("--repeat", type=int, default=3, help="pairs of runs (one of each mode)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "handoff")
    ap.add_argument("--modes", default=",".join(MODES), help="which modes, comma-separated")
    ap.add_argument("--bus", choices=("memory", "redis"), default="memory",
                    help="memory: the in-process bus (the default settings); redis: a "
                         "redis-server started for the run (WSGI_HIJACK_REDIS_URL)")
    ap.add_argument("--rate", type=float, default=10.0, help="publishes per second")
    ap.add_argument("--heartbeat", type=float, default=5.0, help="WSGI_HIJACK_HEARTBEAT")
    ap.add_argument("--before", type=float, default=2.0,
                    help="seconds of publishing before the HUP (at least --window-before)")
    ap.add_argument("--window-before", type=float, default=1.0,
                    help="latency counts messages published from this long before the HUP")
    ap.add_argument("--after", type=float, default=3.0,
                    help="seconds of publishing after every client is served")
    ap.add_argument("--drain", type=float, default=3.0,
                    help="after the last publish, wait for every delivery, or until none "
                         "came for this many seconds")
    ap.add_argument("--processes", type=int, default=0,
                    help="client processes (default: 2, or more if the fd limit needs)")
    ap.add_argument("--connect-timeout", type=float, default=300.0)
    ap.add_argument("--reload-timeout", type=float, default=120.0,
                    help="give up waiting for every client to be served after S s")
    ap.add_argument("--source-block", type=int, default=None,
                    help="run k's clients bind to 127.0.(B+k).2, ... (default: random)")
    ap.add_argument("--progress", type=float, default=2.0,
                    help="seconds between progress lines (0: only milestones)")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    args.before = max(args.before, args.window_before + 0.5)
    if args.source_block is None:
        args.source_block = random.randrange(1, 200)
    servers.raise_nofile()
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="handoff-bench-"))
    order = [m for k in range(args.repeat) for m in (modes if k % 2 == 0 else modes[::-1])]
    command = "python benchmarks/handoff.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    log(f"{len(order)} runs of {args.connections:,} clients: {', '.join(order)}; "
        f"bus {args.bus}; out {args.out}")
    redis = servers.RedisServer(workdir) if args.bus == "redis" else None
    runs: list[dict] = []
    jsonl = args.out / "runs.jsonl"
    jsonl.write_text("")
    try:
        for index, mode in enumerate(order):
            record = one_run(mode, index, args, workdir, redis.url if redis else None)
            record["command"] = command
            runs.append(record)
            with jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log(handoff_report.one_line(record))
            time.sleep(1.0)
    finally:
        if redis is not None and redis.server is not None:
            redis.server.stop()
    meta = {"command": command, "git": git_state(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    summary = handoff_report.summarise(runs)
    (args.out / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary},
                                                      indent=1) + "\n")
    handoff_report.write_markdown(args.out / "results.md", runs, summary, meta)
    plotted = handoff_report.plot(args.out / "handoff.png", runs)
    shutil.rmtree(workdir, ignore_errors=True)
    print((args.out / "results.md").read_text())
    log(f"wrote {jsonl}, {args.out / 'results.md'}" + (", handoff.png" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
