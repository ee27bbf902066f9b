"""Soak: N SSE connections for M minutes, a tenth replaced every minute, messages throughout.

Issue 8 item 6. One command::

    python benchmarks/soak.py -n 19900 --minutes 10 --replace-fraction 0.1 \\
        --publish-interval 0.5

starts the demo under ``gunicorn -c gunicorn.conf.py`` with one worker (its
in-process bus), opens N SSE connections to ``/events?channel=bench`` (the
load client's worker, :class:`scale_redis.SSEWorker`), then for M "minutes"
(``--minute-seconds``, 60) publishes a message every ``--publish-interval``
seconds (``POST /publish``, from a thread) and, at the end of each minute but
the last, closes ``--replace-fraction`` of the connections, chosen at random,
and opens as many new ones, each sending ``Last-Event-ID`` with the last id
its predecessor received. A connection and the ones that replaced it are one
logical client, which must receive every message id from the first published
to the last, each once: gapless, no duplicates, no ``gap`` event.

Each minute the worker's open fds, held connections (established sockets on
the port) and RSS are sampled (the table in ``benchmarks/results/soak.md``);
the report gives first, last and max, and the least-squares slope per minute.
Progress lines go to stderr; the report is JSON (``--json-out``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_redis import (  # noqa: E402
    Clients,
    Gunicorn,
    hist_stats,
    log,
    machine,
    merge_hists,
    write_report,
)


class Publisher(threading.Thread):
    """POST /publish every ``interval`` seconds; data: the publish time."""

    def __init__(self, server: Gunicorn, interval: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.ids: list[int] = []
        self.errors: list[str] = []
        self.post_seconds: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            t0 = time.monotonic()
            try:
                self.ids.append(self.server.publish(repr(t0)))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.post_seconds.append(time.monotonic() - t0)
            next_at += self.interval
            self.halt.wait(max(0.0, next_at - time.monotonic()))


def slope(values: list[float]) -> float:
    """Least-squares slope per step."""
    n = len(values)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(values) / n
    return (sum((i - mx) * (v - my) for i, v in enumerate(values))
            / sum((i - mx) ** 2 for i in range(n)))


def series(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"first": values[0], "last": values[-1], "max": max(values), "min": min(values),
            "slope_per_minute": round(slope(values), 2) + 0.0}


def run(n: int, minutes: int, minute_seconds: float, replace_fraction: float,
        publish_interval: float, processes: int, heartbeat: float, window: int,
        history_size: int | None = None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    extra = {"WSGI_HIJACK_HISTORY_SIZE": str(history_size)} if history_size else {}
    server = Gunicorn(workdir, 1, None, heartbeat=heartbeat, extra_env=extra)
    clients = publisher = None
    try:
        log(f"soak: gunicorn (1 worker, pid {server.pids[0]}) on port {server.port}; "
            f"{n} SSE connections")
        per_process = -(-n // processes)
        clients = Clients(server.port, n, per_process=per_process, window=window,
                          replace=replace_fraction, name="soak", per_message=False)
        connect_s = clients.wait_ready()
        time.sleep(1.0)
        clients.pump(0)
        log(f"connected in {connect_s:.1f} s: {clients.status()}")

        rows: list[dict] = []
        t0 = time.monotonic()

        def sample(minute: int) -> None:
            clients.pump(0)
            w = server.sample()[0]
            row = {"minute": minute, "t": round(time.monotonic() - t0, 1), "held": w["held"],
                   "fds": w["fds"],
                   "rss_mib": round(w["rss"] / 2**20, 2), "cpu_s": round(w["cpu"], 1),
                   "published": len(publisher.ids) if publisher else 0,
                   "clients_held": clients.total("held"),
                   "replaced": clients.total("replaced"),
                   "failed": clients.total("failed")}
            rows.append(row)
            log(f"minute {minute}: worker held {row['held']} fds {row['fds']} RSS "
                f"{row['rss_mib']} MiB cpu {row['cpu_s']} s; published {row['published']}; "
                f"{clients.status()} replaced {row['replaced']}")

        sample(0)
        publisher = Publisher(server, publish_interval)
        start = time.monotonic()
        publisher.start()
        for minute in range(1, minutes + 1):
            end = start + minute * minute_seconds
            while time.monotonic() < end:
                clients.pump(min(0.5, max(0.0, end - time.monotonic())))
            sample(minute)
            if minute < minutes:
                clients.mark()  # replace a fraction (SSEWorker: mark means replace)
        publisher.halt.set()
        publisher.join()
        # Let the last message (and any reconnect's replay) arrive.
        settle = time.monotonic() + 5.0
        while time.monotonic() < settle:
            clients.pump(0.2)
        clients.pump(0)
        end_sample = server.sample()[0]
        finals = clients.stop()
        ids = publisher.ids
        first_id, last_id = ids[0], ids[-1]
        # Every published id, each once. Not last - first + 1: ids are at
        # least the clock in microseconds (bus/memory.py), so consecutive
        # ones are rarely id + 1, and a chain's "gaps" (an id not last + 1)
        # say nothing; its distinct ids from the first to the last do.
        expected = len(ids)
        chains = [c for f in finals for c in f["chains"]]
        # [first, last, received, gaps, dups, gap_events, conns]
        connected = [c for c in chains if c[6] > 0]
        lost = sum(max(0, expected - c[2]) for c in connected if c[0] is not None)
        bad = [c for c in connected
               if c[0] != first_id or c[1] != last_id or c[2] != expected or c[4] or c[5]]
        never = len(chains) - len(connected)
        latency = hist_stats(merge_hists([f["hist"].get("0", {}) for f in finals]))
        report = {
            "connections": n, "minutes": minutes, "minute_seconds": minute_seconds,
            "replace_fraction": replace_fraction, "publish_interval": publish_interval,
            "heartbeat": heartbeat, "history_size": history_size,
            "client_processes": len(clients.procs),
            "connect_seconds": round(connect_s, 1),
            "published": len(ids), "first_id": first_id, "last_id": last_id,
            "ids_increasing": ids == sorted(set(ids)),
            "publish_errors": publisher.errors[:10], "publish_error_count": len(publisher.errors),
            "publish_post_ms_max": round(max(publisher.post_seconds) * 1000, 1),
            "replaced": sum(f.get("replaced", 0) for f in finals),
            "logical_clients": len(chains),
            "never_connected": never,
            "clients_held_at_end": sum(f["held"] for f in finals),
            "worker_held_at_end": end_sample["held"],
            "failed_connects": sum(f["failed"] for f in finals),
            "dropped_by_server": sum(f["dropped"] for f in finals),
            "errors": [f["errors"] for f in finals],
            "clients_with_loss_or_gap": len(bad),
            "bad_examples": bad[:5],
            "messages_lost": lost,
            "duplicates": sum(c[4] for c in connected),
            "gap_events": sum(c[5] for c in connected),
            "deliveries": sum(c[2] for c in connected),
            "latency_including_replays": latency,
            "per_minute": rows,
            "fds": series(rows, "fds"), "rss_mib": series(rows, "rss_mib"),
            "held": series(rows, "held"),
        }
        report["no_loss"] = (not bad and lost == 0 and never == 0
                             and not publisher.errors and report["ids_increasing"])
        report["all_held"] = (report["clients_held_at_end"] == n
                              and report["worker_held_at_end"] == n)
        log(f"published {len(ids)} (ids {first_id}..{last_id}); logical clients "
            f"{len(chains)}, with loss or gap {len(bad)}, messages lost {lost}; "
            f"held at end {report['clients_held_at_end']} (worker {end_sample['held']})")
        return report
    finally:
        if publisher is not None:
            publisher.halt.set()
        if clients is not None:
            clients.kill()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def markdown(r: dict) -> str:
    """The report as ``benchmarks/results/soak.md``."""
    m = r["machine"]
    lat = r["latency_including_replays"]
    out = [f"# Soak: {r['connections']:,} SSE connections, {r['minutes']} minutes, "
           f"{r['replace_fraction']:.0%} replaced every minute", "",
           f"- Date: {r['date']}",
           f"- Command: `{r['command']}`",
           f"- Machine: {m['cpus']} cores, {m['mem_gib']} GiB, Linux {m['kernel']}, Python "
           f"{m['python']}, RLIMIT_NOFILE hard {m['nofile_hard']}; load average "
           f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end",
           f"- Server: one gunicorn worker (`gunicorn.conf.py`, in-process bus), heartbeat "
           f"{r['heartbeat']} s, history {r.get('history_size') or 'default (1000)'} messages; "
           f"{r['client_processes']} client processes",
           f"- Result: **{'no loss, all held' if r['ok'] else 'FAILED'}**", "",
           f"Connected in {r['connect_seconds']} s. Published {r['published']:,} messages "
           f"(ids {r['first_id']}..{r['last_id']}, one every {r['publish_interval']} s "
           f"scheduled, {r['published'] / (r['minutes'] * r['minute_seconds']):.2f}/s "
           "achieved: the POSTs go to the same worker, busy writing the previous messages to "
           f"{r['connections']:,} connections, and the next POST waits for the last answer; "
           f"{r['publish_error_count']} publish errors, slowest POST "
           f"{r['publish_post_ms_max']} ms); {r['replaced']:,} connections replaced (each "
           "new one sending its predecessor's `Last-Event-ID`).", "",
           f"- Logical clients (a connection and its replacements): {r['logical_clients']:,}; "
           f"with a missing, repeated or out-of-order id: **{r['clients_with_loss_or_gap']}**;"
           f" messages lost: **{r['messages_lost']}**; duplicates {r['duplicates']}; `gap` "
           f"events {r['gap_events']}; deliveries {r['deliveries']:,}.",
           f"- Held at the end: {r['clients_held_at_end']:,} by the clients, "
           f"{r['worker_held_at_end']:,} by the worker; failed connects "
           f"{r['failed_connects']}, closed by the server {r['dropped_by_server']}.",
           f"- Publish-to-receive latency over all deliveries (replays after a reconnect "
           f"included): p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max "
           f"{lat['max_ms']} ms.", "",
           "| minute | worker held | worker fds | worker RSS (MiB) | worker CPU (s) | "
           "published | replaced so far |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {x['minute']} | {x['held']:,} | {x['fds']:,} | {x['rss_mib']} | {x['cpu_s']} | "
            f"{x['published']:,} | {x['replaced']:,} |" for x in r["per_minute"]]
    out += ["", "| series | first | last | min | max | slope per minute |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    out += [f"| {name} | {r[key]['first']} | {r[key]['last']} | {r[key]['min']} | "
            f"{r[key]['max']} | {r[key]['slope_per_minute']} |"
            for name, key in (("fds", "fds"), ("RSS (MiB)", "rss_mib"), ("held", "held"))]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=19900)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--minute-seconds", type=float, default=60.0,
                        help="length of a 'minute' (shorter for tests)")
    parser.add_argument("--replace-fraction", type=float, default=0.1)
    parser.add_argument("--publish-interval", type=float, default=0.5)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--heartbeat", type=float, default=10.0,
                        help="WSGI_HIJACK_HEARTBEAT of the server")
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--history-size", type=int,
                        help="WSGI_HIJACK_HISTORY_SIZE of the server (default: its own, 1000)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--md-out", type=Path, help="write the report as Markdown here")
    args = parser.parse_args(argv)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": "python benchmarks/soak.py " + " ".join(argv), "machine": machine()}
    report.update(run(args.connections, args.minutes, args.minute_seconds,
                      args.replace_fraction, args.publish_interval, args.processes,
                      args.heartbeat, args.window, args.history_size))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["ok"] = report["no_loss"] and report["all_held"]
    return write_report(report, args.json_out, args.md_out, markdown)


if __name__ == "__main__":
    sys.exit(main())
