"""One gunicorn gthread worker, never monkeypatched, holds N connections.

    python benchmarks/gthread_hold.py               # N = 19,000: results/gthread.md
    python benchmarks/gthread_hold.py -n 300 --hold 3 --heartbeat 0.5 --out /tmp/g

Starts ``gunicorn -c gunicorn.conf.py -k gthread --threads 4 -w 1`` with the
demo (``GET /``: ``BEEP`` every heartbeat), opens N connections with
:mod:`wsgi_hijack.loadclient` (in several client processes: one process holds
at most ~19,990 fds), holds them ``--hold`` seconds, and checks that

- every connection got its head and at least ``floor(hold / heartbeat) - 1``
  heartbeats in the hold window;
- the worker holds all N at once in its reactor (asked over HTTP, ``/_check``,
  while they are held), with ``gevent.monkey`` having patched nothing: the
  request handlers are gthread's OS threads, the reactor is a gevent hub in a
  thread of its own.

It records the worker's RSS per connection (RSS held minus RSS before, over
N), the connect phase, and the heartbeat write-run times the reactor logs at
N connections, and writes ``gthread.md`` and ``gthread.json`` into ``--out``
(the server's log goes to a temporary directory, named in the JSON).
Exits 1 when a check fails.

This file is also the app gunicorn serves (``gthread_hold:app``): the demo
plus ``/_check``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a file (and imported by gunicorn): the harness

from harness import servers, wire  # noqa: E402

# -- the app gunicorn runs ---------------------------------------------------------------

def _check(environ, start_response):
    from gevent import monkey

    from wsgi_hijack.reactor import current_reactor

    reactor = current_reactor()
    body = json.dumps({
        "pid": os.getpid(),
        "hijackable": environ["wsgi_hijack.hijackable"],
        "held": len(reactor) if reactor is not None else 0,
        "patched": {m: monkey.is_module_patched(m) for m in ("socket", "threading", "select",
                                                             "ssl", "time")},
        "threads": sorted(t.name for t in threading.enumerate()),
        "multithread": environ.get("wsgi.multithread"),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _router(environ, start_response):
    from wsgi_hijack.demo import demo_app

    if environ.get("PATH_INFO") == "/_check":
        return _check(environ, start_response)
    return demo_app(environ, start_response)


def _make_app():
    from wsgi_hijack import HijackMiddleware

    return HijackMiddleware(_router)


if os.environ.get("WSGI_HIJACK_GTHREAD_APP") == "1":  # only inside the server
    app = _make_app()


# -- the run ---------------------------------------------------------------------------

class GthreadServer(servers.Server):
    """The app above under one gthread worker (:mod:`harness.servers`); ready
    once it answers ``/_check``, whose first answer is kept (``check``)."""

    def __init__(self, heartbeat: float, threads: int, workdir: Path) -> None:
        self.check: dict = {}
        port = servers.free_port()
        argv = servers.argv_for("gunicorn", port, "gthread_hold:app",
                                ("-k", "gthread", "--threads", str(threads), "-w", "1",
                                 "--pythonpath", str(HERE)))
        super().__init__(argv, port, workdir / f"gthread-{port}.log",
                         env=servers.server_env(heartbeat, WSGI_HIJACK_GTHREAD_APP="1"),
                         ready=self._checked, timeout=30, stop_timeout=30, raise_fd_limit=True,
                         name="gunicorn")
        self.worker_pid = self.check["pid"]

    def _checked(self, server: servers.Server) -> bool:
        try:
            self.check = wire.get_json(self.port, "/_check", timeout=2)
        except (RuntimeError, ValueError):
            return False
        return True

    def rounds(self, at_least: int) -> list[float]:
        return [float(t) for c, t in servers.WRITE_RUN_RE.findall(self.log_path.read_bytes())
                if int(c) >= at_least]


def run(n: int, hold: float, heartbeat: float, threads: int, out: Path,
        per_process: int | None = None, progress: float = 5.0) -> dict:
    from wsgi_hijack import loadclient

    out.mkdir(parents=True, exist_ok=True)
    servers.raise_nofile()
    # Several client processes, each well under its fd limit.
    per_process = per_process or max(1, min(9500, math.ceil(n / 2)))
    load_before = os.getloadavg()[0]  # a shared machine makes the timings noisy
    server = GthreadServer(heartbeat, threads, Path(tempfile.mkdtemp(prefix="gthread-hold-")))
    during: list[dict] = []
    report: dict = {}
    try:
        box: list = []

        def load() -> None:
            try:
                box.append(loadclient.run(
                    f"http://127.0.0.1:{server.port}/", n, duration=hold,
                    server_pids=[server.worker_pid], per_process=per_process,
                    window=1000, progress=progress))
            except BaseException as exc:  # reported below
                box.append(exc)

        client = threading.Thread(target=load, name="loadclient")
        client.start()
        # While the connections are held: ask the worker how many it holds and
        # whether anything was monkeypatched.
        while client.is_alive():
            try:
                check = wire.get_json(server.port, "/_check", timeout=5)
            except (OSError, RuntimeError, ValueError):
                check = None
            if check is not None and (not during or check["held"] >= during[-1]["held"]):
                during.append(check)
            client.join(max(0.5, heartbeat / 2))
        if isinstance(box[0], BaseException):
            raise box[0]
        load_report = box[0]
        rounds = server.rounds(n)
        peak = max(during, key=lambda c: c["held"]) if during else {}
        report = _summarise(n, hold, heartbeat, threads, per_process, load_report, rounds,
                            server.check, peak, server.argv)
        report["machine"] += (f"; load average {load_before:.1f} before the run, "
                              f"{os.getloadavg()[0]:.1f} after")
    finally:
        server.stop()
    errors = [ln for ln in server.log().splitlines()
              if "Traceback" in ln or "[ERROR]" in ln or "Error handling request" in ln]
    report["server_log_errors"] = errors[:20]
    report["server_log"] = str(server.log_path)
    report["ok"] = report.get("ok", False) and not errors
    (out / "gthread.json").write_text(json.dumps({**report, "load": load_report}, indent=2))
    (out / "gthread.md").write_text(markdown(report))
    return report


def _summarise(n, hold, heartbeat, threads, per_process, load, rounds, start_check, peak,
               argv) -> dict:
    conns = load["connections"]
    msgs = load["hold"]["messages_per_connection"]
    server = load["server"][0] if load["server"] else {}
    expected = max(1, math.floor(hold / heartbeat) - 1)
    checks = {
        "all_held": conns["held"] == n and conns["failed"] == 0 and conns["dropped"] == 0,
        "worker_held_all": peak.get("held", 0) >= n,
        "heartbeats_to_every_connection": (msgs["min"] or 0) >= expected,
        "no_monkeypatching": bool(peak) and not any(peak["patched"].values())
        and not any(start_check["patched"].values()),
        "hijackable": bool(start_check.get("hijackable")),
    }
    return {
        "n": n, "hold_s": hold, "heartbeat_s": heartbeat, "threads": threads,
        "client_processes": load["processes"], "per_process": per_process,
        "command": " ".join(a if "/" not in a else Path(a).name for a in argv[1:]),
        "connections": conns,
        "time_to_all_heads_s": load["time_to_all_heads"],
        "connect_phase_s": load["connect_phase_s"],
        "heartbeats_expected_min": expected,
        "heartbeats_per_connection": msgs,
        "rss_before": server.get("rss_before"), "rss_held": server.get("rss_held"),
        "rss_end": server.get("rss_end"),
        "rss_per_connection": server.get("rss_per_connection"),
        "fds_held": server.get("fds_held"),
        "cpu_per_connection_us": server.get("cpu_per_connection_us"),
        "cpu_window_s": server.get("cpu_window_s"),
        "write_runs_at_n": len(rounds),
        "write_run_median_s": statistics.median(rounds) if rounds else None,
        "write_run_max_s": max(rounds) if rounds else None,
        "worker_at_peak": peak,
        "checks": checks,
        "ok": all(checks.values()),
        "machine": f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
                   f"Python {platform.python_version()}, "
                   f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}",
    }


def _mb(b) -> str:
    return "-" if b is None else f"{b / 1e6:.1f} MB"


def _s(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f} s"


def markdown(r: dict) -> str:
    c, m, peak = r["connections"], r["heartbeats_per_connection"], r["worker_at_peak"]
    lines = [
        f"# One gthread worker holds {r['n']:,} connections (no monkeypatching)",
        "",
        "Produced by `python benchmarks/gthread_hold.py"
        + (f" -n {r['n']}" if r["n"] != 19000 else "") + "`; "
        f"{'all checks passed' if r['ok'] else 'SOME CHECKS FAILED'}.",
        "",
        f"- Server: `{r['command']}` (the demo, `GET /`), heartbeat every "
        f"{r['heartbeat_s']:g} s. Handlers are gthread's OS threads; the reactor runs a "
        "gevent hub in a thread of its own.",
        f"- Client: `wsgi_hijack.loadclient`, {r['client_processes']} processes "
        f"(at most {r['per_process']:,} connections each), holding {r['hold_s']:g} s.",
        f"- Machine: {r['machine']}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| connections held (client) | {c['held']:,} of {r['n']:,} "
        f"(failed {c['failed']}, dropped {c['dropped']}, retries {c['retries']}) |",
        f"| connections held (worker's reactor, asked while held) | {peak.get('held', 0):,} |",
        f"| time until every connection had its head | {_s(r['time_to_all_heads_s'], 1)} |",
        f"| heartbeats per connection in the hold window (min / median / max) | "
        f"{m['min']} / {m['median']} / {m['max']} (expected at least "
        f"{r['heartbeats_expected_min']}) |",
        f"| worker RSS before / held / end | {_mb(r['rss_before'])} / {_mb(r['rss_held'])}"
        f" / {_mb(r['rss_end'])} |",
        "| worker RSS per connection | "
        + ("-" if r["rss_per_connection"] is None else f"{r['rss_per_connection']:.0f} bytes")
        + " |",
        f"| worker fds while held | {r['fds_held']} |",
        f"| heartbeat write run at {r['n']:,} connections (median / max, "
        f"{r['write_runs_at_n']} rounds) | {_s(r['write_run_median_s'])} / "
        f"{_s(r['write_run_max_s'])} |",
        "| worker CPU per connection accepted and hijacked | "
        + ("-" if r["cpu_per_connection_us"] is None else f"{r['cpu_per_connection_us']:.0f} µs")
        + " |",
        f"| modules monkeypatched in the worker while held | "
        f"{', '.join(k for k, v in peak.get('patched', {}).items() if v) or 'none'} |",
        f"| worker threads while held | {', '.join(peak.get('threads', []))} |",
        "",
        "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in r["checks"].items())
        + ".",
        "",
    ]
    if r.get("server_log_errors"):
        lines += ["Errors in the server log:", "", "```", *r["server_log_errors"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=19000, help="connections (default 19,000)")
    ap.add_argument("--hold", type=float, default=30.0, help="seconds to hold them")
    ap.add_argument("--heartbeat", type=float, default=2.0, help="seconds between heartbeats")
    ap.add_argument("--threads", type=int, default=4, help="gthread's --threads")
    ap.add_argument("--per-process", type=int, default=None,
                    help="connections per client process (default: N/2, at most 9,500)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    report = run(args.n, args.hold, args.heartbeat, args.threads, args.out,
                 per_process=args.per_process)
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
