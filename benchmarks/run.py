"""The benchmark: this project against the greenlet baseline and the floor, in one run.

    python benchmarks/run.py                      # N = 1,000 .. 19,900, ~10 minutes
    python benchmarks/run.py --soak 600           # plus a 10-minute soak at the largest N
    python benchmarks/run.py --ns 200,400 --out /tmp/bench   # a quick small run

For every N it starts, one after the other, on a free port:

``hijack``
    this project's demo: ``gunicorn -c gunicorn.conf.py wsgi_hijack:app``;
``greenlet``
    the baseline (``benchmarks/greenlet_baseline.py``): gunicorn's gevent
    worker, one greenlet per streaming response;
``floor``
    ``benchmarks/floor.c``, compiled now into a temp dir: one epoll thread and
    a bare non-blocking ``send()`` loop;
``floor-threads`` (``--threads K``)
    the same floor, each round's sends spread over K OS threads.

and holds N connections with :mod:`wsgi_hijack.loadclient`, measuring the
server worker's RSS, fds and CPU from ``/proc``. The heartbeat-round time is
what each server logs for its write run. Then, at the largest N, a reconnect
storm (every connection at once, no pacing) for ``hijack`` and ``greenlet``.
With ``--repeat R`` (default 3), floor and hijack run R times in all at the
largest N, alternating, and the median of the R paired ratios is reported:
single runs on this shared machine move by up to 20 %. With
``--side-by-side S`` (default 30), floor and hijack then hold the largest N
at the same time and are measured over one S-second window; that ratio
decides the CPU and write-run targets, since the machine's load falls on
both alike.

Writes ``results.json``, ``results.md`` and PNG plots into ``--out``
(default ``benchmarks/results``). Every target is stated as a ratio against
the baseline or floor of the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a file: the harness, and this tree's wsgi_hijack

from harness import servers  # noqa: E402
from wsgi_hijack import loadclient  # noqa: E402

DEFAULT_NS = [1000, 2500, 5000, 10000, 15000, 19900]
# Targets from issue 3.
TARGET_RSS_BYTES = 700
TARGET_CPU_VS_FLOOR = 1.15
TARGET_ROUND_VS_FLOOR = 1.15


def build_floor(workdir: Path) -> Path:
    exe = workdir / "floor"
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("the floor needs a C compiler (gcc)")
    subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / "floor.c"), "-lpthread"], check=True)
    return exe


class Server(servers.Server):
    """One server under test (:mod:`harness.servers`), with ``pid``: the process
    measured (gunicorn's worker, or the floor itself)."""

    def __init__(self, kind: str, heartbeat: float, workdir: Path, floor_exe: Path | None,
                 threads: int = 1) -> None:
        self.kind = kind
        port = servers.free_port()
        extra = {"WSGI_HIJACK_SEND_THREADS": str(threads)} if kind == "hijack-threads" else {}
        ready = servers.workers_ready(1)
        if kind.startswith("hijack"):
            argv = servers.argv_for("gunicorn", port)
        elif kind == "greenlet":
            # Run in the repository, like the figures published: gunicorn then
            # also reads ./gunicorn.conf.py (its hooks; -k gevent still wins).
            argv = servers.argv_for("gunicorn-plain", port, "greenlet_baseline:app",
                                    ("--worker-connections", "25000", "--backlog", "4096",
                                     "--pythonpath", str(HERE)))
        elif kind.startswith("floor"):
            assert floor_exe is not None
            argv = [str(floor_exe), str(port), str(heartbeat), str(threads)]
            ready = servers.port_open
        else:
            raise ValueError(kind)
        super().__init__(argv, port, workdir / f"{kind}-{port}.log",
                         env=servers.server_env(heartbeat, **extra), cwd=REPO, ready=ready,
                         timeout=30, stop_timeout=30, raise_fd_limit=True, name=kind)
        self.pid = self.proc.pid if kind.startswith("floor") else self.workers()[0]


def measure(kind: str, n: int, args, workdir: Path, floor_exe: Path | None,
            storm: bool = False, duration: float | None = None,
            sample_interval: float = 0.0) -> dict:
    threads = args.threads if kind.endswith("-threads") else 1
    server = Server(kind, args.heartbeat, workdir, floor_exe, threads)
    try:
        # Warm up (imports, first-request paths), then let those clients go.
        loadclient.run(server.url, 20, duration=0, progress=0)
        time.sleep(min(1.0, args.heartbeat))
        if duration is None:
            rounds = max(args.min_rounds, min(30, math.ceil(args.messages / n)))
            duration = rounds * args.heartbeat
        window = n if storm else args.window
        print(f"== {kind} N={n}{' storm' if storm else ''}: {server.url} worker {server.pid}, "
              f"hold {duration:g} s", file=sys.stderr, flush=True)
        report = loadclient.run(server.url, n, duration=duration, server_pids=[server.pid],
                                window=window, progress=args.progress,
                                sample_interval=sample_interval)
        rounds_logged = server.write_runs(report["connections"]["held"])
    finally:
        server.stop()
    srv = report["server"][0] if report["server"] else {}
    round_s = statistics.median(rounds_logged) if rounds_logged else None
    msgs = report["hold"]["messages_per_connection"]
    return {
        "server": kind, "n": n, "storm": storm, "threads": threads,
        "heartbeat": args.heartbeat, "hold_s": duration,
        "expected_messages": round(duration / args.heartbeat),
        "held": report["connections"]["held"], "dropped": report["connections"]["dropped"],
        "failed": report["connections"]["failed"], "retries": report["connections"]["retries"],
        "messages_min": msgs["min"], "messages_median": msgs["median"],
        "messages_max": msgs["max"],
        "time_to_all_heads_s": report["time_to_all_heads"],
        "rss_per_connection": srv.get("rss_per_connection"),
        "rss_before": srv.get("rss_before"), "rss_end": srv.get("rss_end"),
        "fds_held": srv.get("fds_held"),
        "cpu_per_message_us": srv.get("cpu_per_message_us"),
        "cpu_per_connection_us": srv.get("cpu_per_connection_us"),
        "round_s": round_s, "rounds_logged": len(rounds_logged),
        "per_send_us": round_s / n * 1e6 if round_s else None,
        "report": report,
    }


def side_by_side(n: int, args, workdir: Path, floor_exe: Path | None,
                 window_s: float = 30.0) -> dict:
    """floor and hijack held at once, N each, measured over the same window.

    Run one after the other, two servers meet different moments of a shared
    machine (other jobs, the load client's placement), and their ratio moves
    by up to 20 %. Side by side, both hold N connections, each with its own
    load client, and their CPU and write runs are read over one window in
    which both are fully held: whatever the machine does then, it does to both.
    """
    servers = {k: Server(k, args.heartbeat, workdir, floor_exe) for k in ("floor", "hijack")}
    reports: dict[str, dict] = {}
    errors: list[BaseException] = []
    # Each client holds from its own last connect: long enough to cover the
    # other's connect phase (about 1,300 a second here; n / 500 to be safe),
    # two rounds to settle, and the window. Checked below: a window with
    # rounds missing means a hold ended early.
    hold = window_s + 3 * args.heartbeat + n / 500 + 5

    def hold_n(kind: str) -> None:
        try:
            reports[kind] = loadclient.run(servers[kind].url, n, duration=hold,
                                           server_pids=[servers[kind].pid],
                                           window=args.window, progress=0)
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=hold_n, args=(k,)) for k in servers]
    try:
        print(f"== floor and hijack side by side, N={n} each, window {window_s:g} s",
              file=sys.stderr, flush=True)
        for t in threads:
            t.start()
        deadline = time.monotonic() + hold
        # Both fully held: each has logged a round over all N, then one more.
        while time.monotonic() < deadline and not errors:
            if all(len(srv.write_runs(n)) >= 2 for srv in servers.values()):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"side by side: not both held N={n}: {errors}")
        before = {k: (loadclient.proc_stats(srv.pid)["cpu"], len(srv.write_runs(n)))
                  for k, srv in servers.items()}
        time.sleep(window_s)
        after = {k: (loadclient.proc_stats(srv.pid)["cpu"], srv.write_runs(n))
                 for k, srv in servers.items()}
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    finally:
        for srv in servers.values():
            srv.stop()
    expected = int(window_s / args.heartbeat) - 1
    for kind, (_, rounds0) in before.items():
        if len(after[kind][1]) - rounds0 < expected:
            raise RuntimeError(f"side by side: {kind} logged {len(after[kind][1]) - rounds0} "
                               f"rounds over all {n} in the window, expected {expected}+")
    out = {"n": n, "window_s": window_s, "heartbeat": args.heartbeat}
    for kind, (cpu0, rounds0) in before.items():
        cpu1, rounds = after[kind]
        runs = rounds[rounds0:]
        conn = reports[kind]["connections"]
        out[kind] = {
            "held": conn["held"], "dropped": conn["dropped"], "rounds": len(runs),
            "cpu_s": cpu1 - cpu0,
            "cpu_per_message_us": (cpu1 - cpu0) / (len(runs) * n) * 1e6 if runs else None,
            "round_s": statistics.median(runs) if runs else None,
        }
    h, f = out["hijack"], out["floor"]
    out["cpu_ratio"] = _ratio(h["cpu_per_message_us"], f["cpu_per_message_us"])
    out["round_ratio"] = _ratio(h["round_s"], f["round_s"])
    return out


# -- results -------------------------------------------------------------------------------

def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _ratio(a, b):
    return a / b if a is not None and b else None


def find(results, kind, n, storm=False):
    for r in results:
        if (r["server"] == kind and r["n"] == n and r["storm"] == storm
                and r.get("repeat", 0) == 0):
            return r
    return None


def paired_ratio(results, kind, base, n, key, storm: bool = False
                 ) -> tuple[float | None, str]:
    """Median over the repeats of ``kind``'s ``key`` / ``base``'s, each pair
    measured one right after the other (--repeat), and how they ranged.
    ``key`` is a field name or a function of a run.

    Load on this shared machine moves single runs by up to 20 %; pairing each
    run with the base run next to it, and taking the median pair, keeps one
    unlucky run from deciding a target either way."""
    value = key if callable(key) else (lambda r: r[key])
    runs = {}
    for r in results:
        if r["n"] == n and r["storm"] == storm and r["server"] in (kind, base):
            runs.setdefault(r.get("repeat", 0), {})[r["server"]] = r
    ratios = sorted(x for pair in runs.values() if kind in pair and base in pair
                    for x in [_ratio(value(pair[kind]), value(pair[base]))] if x is not None)
    if not ratios:
        return None, ""
    if len(ratios) == 1:
        return ratios[0], ""
    spread = ", ".join(f"{x:.2f}" for x in ratios)
    return statistics.median(ratios), f"; median of {len(ratios)} pairs: {spread}"


def targets(results: list[dict], n: int, together: dict | None = None
            ) -> list[tuple[str, str, str, bool | None]]:
    h, g, fl = find(results, "hijack", n), find(results, "greenlet", n), find(results, "floor", n)
    ft, ht = find(results, "floor-threads", n), find(results, "hijack-threads", n)
    hs, gs = find(results, "hijack", n, True), find(results, "greenlet", n, True)
    rows = []
    if h:
        every = (h["held"] == n and h["dropped"] == 0 and h["messages_min"] is not None
                 and h["messages_min"] >= h["expected_messages"] - 1
                 and h["messages_min"] == h["messages_max"])
        rows.append((f"holds {n:,}, every one every heartbeat, none dropped",
                     f"held {h['held']:,}, dropped {h['dropped']}, heartbeats per connection "
                     f"min/median/max {h['messages_min']}/{h['messages_median']}/"
                     f"{h['messages_max']} (window of {h['expected_messages']} rounds)",
                     "-", every))
        rss = h["rss_per_connection"]
        rows.append(("server RSS per held connection <= 700 B", f"{_f(rss, '{:.0f}')} B",
                     f"{_f(_ratio(rss, g and g['rss_per_connection']), '{:.3f}')} x greenlet",
                     None if rss is None else rss <= TARGET_RSS_BYTES))
    if h and fl:
        cr, spread = paired_ratio(results, "hijack", "floor", n, "cpu_per_message_us")
        rr, rspread = paired_ratio(results, "hijack", "floor", n, "round_s")
        cpu_measured = (f"{_f(h['cpu_per_message_us'])} us (floor "
                        f"{_f(fl['cpu_per_message_us'])} us, greenlet "
                        f"{_f(g and g['cpu_per_message_us'])} us)")
        round_measured = (f"{_f(h['round_s'] and h['round_s'] * 1e3)} ms (floor "
                          f"{_f(fl['round_s'] and fl['round_s'] * 1e3)} ms, greenlet "
                          f"{_f(g and g['round_s'] and g['round_s'] * 1e3)} ms)")
        cpu_ratio = f"{_f(cr, '{:.2f}')} x floor one after the other{spread}"
        round_ratio = f"{_f(rr, '{:.2f}')} x floor one after the other{rspread}"
        if together is not None and together.get("n") == n:
            # Side by side decides: the same window, the same machine for both.
            cr, rr = together["cpu_ratio"], together["round_ratio"]
            cpu_ratio = f"**{_f(cr, '{:.2f}')} x floor side by side**; " + cpu_ratio
            round_ratio = f"**{_f(rr, '{:.2f}')} x floor side by side**; " + round_ratio
        rows.append(("CPU per delivered heartbeat <= 1.15 x floor", cpu_measured, cpu_ratio,
                     None if cr is None else cr <= TARGET_CPU_VS_FLOOR))
        rows.append(("heartbeat write run <= 1.15 x floor", round_measured, round_ratio,
                     None if rr is None else rr <= TARGET_ROUND_VS_FLOOR))
        for t, name in ((ht, "hijack"), (ft, "floor")):
            if t:
                base = h if name == "hijack" else fl
                tr = _ratio(t["round_s"], base["round_s"])
                rows.append((f"{name} with each round spread over {t['threads']} OS threads",
                             f"{_f(t['round_s'] and t['round_s'] * 1e3)} ms, CPU "
                             f"{_f(t['cpu_per_message_us'])} us per heartbeat",
                             f"{_f(tr, '{:.2f}')} x single-thread {name}, "
                             f"{_f(_ratio(t['round_s'], fl['round_s']))} x floor", None))
    if hs and gs:
        storms = {kind: sorted((r for r in results if r["storm"] and r["n"] == n
                                and r["server"] == kind), key=lambda r: r.get("repeat", 0))
                  for kind in ("hijack", "greenlet")}

        def took(r) -> str:
            if r["time_to_all_heads_s"] is not None:
                return f"{r['time_to_all_heads_s']:.1f}"
            return f"not all after {r['report']['connect_phase_s']:.0f}"

        def storm_time(r) -> float:
            # A baseline that never got all its heads counts at the time it
            # was given up: a lower bound on its time, so the ratio is an upper one.
            t = r["time_to_all_heads_s"]
            return t if t is not None else r["report"]["connect_phase_s"]

        sr, spread = paired_ratio(results, "hijack", "greenlet", n, storm_time, storm=True)
        cr, _ = paired_ratio(results, "hijack", "greenlet", n, "cpu_per_connection_us",
                             storm=True)
        all_done = all(r["time_to_all_heads_s"] is not None for r in storms["hijack"])
        cpu = {k: statistics.median(r["cpu_per_connection_us"] for r in v)
               for k, v in storms.items()}
        rows.append((f"reconnect storm, {n:,} at once: all hijacked no slower than greenlet",
                     f"hijack {', '.join(took(r) for r in storms['hijack'])} s; greenlet "
                     f"{', '.join(took(r) for r in storms['greenlet'])} s (in run order); "
                     f"server CPU per connection (median) {cpu['hijack']:.0f} vs "
                     f"{cpu['greenlet']:.0f} us",
                     f"{_f(sr)} x greenlet{spread} (CPU {_f(cr)} x)",
                     None if sr is None else (all_done and sr <= 1.0)))
    return rows


def write_markdown(path: Path, results: list[dict], meta: dict, soak: dict | None,
                   together: dict | None = None) -> None:
    ns = sorted({r["n"] for r in results if not r["storm"]})
    top = max(ns)
    lines = [
        "# Benchmark results",
        "",
        f"Run {meta['date']} on {meta['machine']}; heartbeat {meta['heartbeat']:g} s; "
        f"`{meta['command']}`.",
        "Every figure comes from this one run; ratios are against the baseline or floor "
        "measured in it. The load client runs on the same 2 cores as the server, so wall "
        "times (write run, time to all heads) include preemption by it; between repeated "
        "runs the CPU and write-run figures varied by about 20 %.",
        "",
        f"## Targets at N = {top:,}",
        "",
        "| target | measured | ratio | met |",
        "|---|---|---|---|",
    ]
    for name, measured, ratio, ok in targets(results, top, together):
        lines.append(f"| {name} | {measured} | {ratio} | "
                     f"{'-' if ok is None else ('yes' if ok else '**no**')} |")
    if together:
        tf, th = together["floor"], together["hijack"]
        lines += [
            "", f"## Side by side: floor and hijack at once, {together['n']:,} each", "",
            f"Both servers held {together['n']:,} connections at the same time, each with its "
            f"own load client, and were measured over the same {together['window_s']:g} s "
            "window: one after the other, the machine's other load moves single runs by up "
            "to 20 %; side by side it falls on both.", "",
            "| server | held | dropped | rounds in the window | CPU (s) | CPU/heartbeat (us) "
            "| write run (ms) |", "|---|---|---|---|---|---|---|"]
        for kind, r in (("floor", tf), ("hijack", th)):
            lines.append(f"| {kind} | {r['held']:,} | {r['dropped']} | {r['rounds']} | "
                         f"{r['cpu_s']:.2f} | {_f(r['cpu_per_message_us'])} | "
                         f"{_f(r['round_s'] and r['round_s'] * 1e3)} |")
        lines += ["", f"hijack / floor: CPU per heartbeat {_f(together['cpu_ratio'])} x, "
                      f"write run {_f(together['round_ratio'])} x."]
    if soak:
        lines += ["", f"## Soak: hijack, {soak['n']:,} connections for {soak['hold_s']:g} s", "",
                  soak["summary"]]
    lines += [
        "",
        "## All runs",
        "",
        "| server | N | held | dropped | heartbeats/conn min/med/max | all heads (s) | "
        "RSS/conn (B) | fds | CPU/heartbeat (us) | CPU/connect (us) | write run (ms) | "
        "per send (us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["storm"], r["n"], r.get("repeat", 0),
                                            r["server"])):
        name = r["server"] + (" (storm)" if r["storm"] else "")
        if r.get("repeat"):
            name += f" (repeat {r['repeat'] + 1})"
        lines.append(
            f"| {name} | {r['n']:,} | {r['held']:,} | {r['dropped']} | "
            f"{r['messages_min']}/{r['messages_median']}/{r['messages_max']} | "
            f"{_f(r['time_to_all_heads_s'])} | {_f(r['rss_per_connection'], '{:.0f}')} | "
            f"{r['fds_held']} | {_f(r['cpu_per_message_us'])} | "
            f"{_f(r['cpu_per_connection_us'], '{:.0f}')} | "
            f"{_f(r['round_s'] and r['round_s'] * 1e3)} | {_f(r['per_send_us'])} |")
    lines += ["", "![server RSS per connection](rss_per_connection.png)",
              "![heartbeat write run](heartbeat_round.png)", ""]
    path.write_text("\n".join(lines))


def plot(out: Path, results: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("hijack", "hijack-threads", "greenlet", "floor", "floor-threads")
             if any(r["server"] == k for r in results)]
    paths = []
    for key, fname, ylabel, scale in (
        ("rss_per_connection", "rss_per_connection.png", "server RSS per connection (bytes)", 1),
        ("round_s", "heartbeat_round.png", "heartbeat write run (ms)", 1e3),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for kind in kinds:
            pts = sorted((r["n"], r[key] * scale) for r in results
                         if r["server"] == kind and not r["storm"] and not r.get("repeat")
                         and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
        if key == "rss_per_connection":
            ax.axhline(TARGET_RSS_BYTES, color="grey", linestyle="--", linewidth=1,
                       label="target 700 B")
        ax.set_xlabel("held connections (N)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_soak(out: Path, soak: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = soak["report"]["server"][0].get("timeline", [])
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([p["t"] for p in tl], [p["rss"] / 2**20 for p in tl], label="RSS (MiB)")
    ax.set_xlabel("seconds holding")
    ax.set_ylabel("server RSS (MiB)")
    ax2 = ax.twinx()
    ax2.plot([p["t"] for p in tl], [p["fds"] for p in tl], color="tab:orange", label="fds")
    ax2.set_ylabel("server fds")
    # Different heights, so two flat lines do not hide each other.
    ax.set_ylim(0, max([p["rss"] / 2**20 for p in tl] + [1]) * 1.6)
    ax2.set_ylim(0, max([p["fds"] for p in tl] + [1]) * 1.15)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="lower right")
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)),
                    help="comma-separated connection counts")
    ap.add_argument("--servers", default="hijack,greenlet,floor")
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--min-rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=60000,
                    help="hold long enough for about this many heartbeats in all (max 30 rounds)")
    ap.add_argument("--window", type=int, default=1000,
                    help="paced connects: at most this many awaiting their head at once")
    ap.add_argument("--threads", type=int, default=0,
                    help="also run the floor with each round spread over K OS threads")
    ap.add_argument("--repeat", type=int, default=3,
                    help="at the largest N, run floor and hijack this many times in "
                         "alternation; the CPU and write-run targets use the median pair")
    ap.add_argument("--side-by-side", type=float, default=30.0, metavar="SECONDS",
                    help="at the largest N, also hold floor and hijack at once and measure "
                         "both over one window this long (0: skip); it decides the CPU and "
                         "write-run targets")
    ap.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    ap.add_argument("--soak", type=float, default=0.0,
                    help="hold the largest N on hijack this many seconds (600 = 10 minutes)")
    ap.add_argument("--progress", type=float, default=5.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--render", action="store_true",
                    help="only rewrite results.md and the plots from --out's results.json")
    args = ap.parse_args(argv)
    if args.render:
        out = Path(args.out)
        data = json.loads((out / "results.json").read_text())
        write_markdown(out / "results.md", data["results"], data["meta"], data["soak"],
                       data.get("side_by_side"))
        plot(out, data["results"])
        if data["soak"]:
            plot_soak(out, data["soak"])
        return 0
    ns = [int(x) for x in args.ns.split(",") if x]
    kinds = [k for k in args.servers.split(",") if k]
    if args.threads > 1:
        kinds += [k for k in ("hijack-threads", "floor-threads") if k not in kinds]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    soak = None
    together = None
    with tempfile.TemporaryDirectory(prefix="wsgi-hijack-bench-") as tmp:
        workdir = Path(tmp)
        floor_exe = build_floor(workdir) if any(k.startswith("floor") for k in kinds) else None
        for n in ns:
            for kind in kinds:
                results.append(measure(kind, n, args, workdir, floor_exe))
        top = max(ns)
        for repeat in range(1, args.repeat):
            for kind in ("floor", "hijack"):
                if kind in kinds:
                    r = measure(kind, top, args, workdir, floor_exe)
                    r["repeat"] = repeat
                    results.append(r)
        if args.side_by_side > 0 and "hijack" in kinds and "floor" in kinds:
            together = side_by_side(top, args, workdir, floor_exe, args.side_by_side)
        if not args.no_storm:
            # A storm's time is a step function of TCP's SYN retransmission
            # timers (1, 3, 7, 15, 31, 63 s): one backlog overflow more or less
            # moves a single run by 2 x either way, for either server. So the
            # storm is run as --repeat pairs, the order alternating, and the
            # target takes the median pair.
            for repeat in range(max(1, args.repeat)):
                order = ("hijack", "greenlet") if repeat % 2 == 0 else ("greenlet", "hijack")
                for kind in order:
                    if kind in kinds:
                        r = measure(kind, top, args, workdir, floor_exe, storm=True,
                                    duration=args.heartbeat * 2)
                        r["repeat"] = repeat
                        results.append(r)
        if args.soak:
            soak = measure("hijack", top, args, workdir, floor_exe, duration=args.soak,
                           sample_interval=max(1.0, args.soak / 60))
            s = soak["report"]["server"][0].get("soak", {})
            soak["summary"] = (
                f"held {soak['held']:,}, dropped {soak['dropped']}, heartbeats per connection "
                f"min/median/max {soak['messages_min']}/{soak['messages_median']}/"
                f"{soak['messages_max']} of {soak['expected_messages']}; RSS "
                f"{s.get('rss_min', 0) / 2**20:.1f}..{s.get('rss_max', 0) / 2**20:.1f} MiB "
                f"(growth {s.get('rss_growth', 0) / 1024:.0f} KiB over the soak), fds "
                f"{s.get('fds_min')}..{s.get('fds_max')}.\n\n![soak](soak.png)")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}, RLIMIT_NOFILE "
                       f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}",
            "heartbeat": args.heartbeat,
            "command": "python benchmarks/run.py " + " ".join(argv if argv is not None
                                                              else sys.argv[1:])}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "results": results, "soak": soak, "side_by_side": together},
        indent=1))
    write_markdown(out / "results.md", results, meta, soak, together)
    plot(out, results)
    if soak:
        plot_soak(out, soak)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
