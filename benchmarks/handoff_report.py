"""The figures of ``benchmarks/handoff.py``: one run's, their summary, the table and the plot."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from handoff_clients import bucket_value

#: Server log lines kept in a run's record: the handoff's steps, warnings, errors.
LOG_RE = re.compile(r"handoff|park|took \d+ connections|gave \d+|goodbye|Booting worker|"
                    r"Handling signal|Worker exiting|WARNING|ERROR|CRITICAL|Traceback|"
                    r"timeout|Timeout")


def log_lines(text: str, most: int = 60) -> list[str]:
    found = [line for line in text.splitlines() if LOG_RE.search(line)
             and "Number of clients connected" not in line]
    return found[:most]


def percentile(hist: dict[int, int], p: float) -> float | None:
    """The nearest-rank ``p`` percentile (0..100) of a bucket -> count histogram, in s."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = max(1, -(-total * p // 100)), 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return bucket_value(b)
    return bucket_value(max(hist))


def _merge(latency: list[dict], seqs: set[int]) -> dict[int, int]:
    hist: dict[int, int] = {}
    for per_seq in latency:
        for seq, buckets in per_seq.items():
            if int(seq) in seqs:
                for b, count in buckets.items():
                    hist[int(b)] = hist.get(int(b), 0) + count
    return hist


def _cpu(sample: dict) -> float:
    return (sample["reaped"] or 0.0) + sum(sample["procs"].values())


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def analyse(n: int, t_hup: float, finals: list[dict], publishes: list[dict], before: dict,
            samples: list[dict], old: list[int], window_before: float) -> dict:
    """One run's figures from the clients' final reports, the publisher's
    records and the CPU samples; times relative to the HUP."""
    served = [t for f in finals for t in f.get("served_at", [])]
    served_rel = sorted(t - t_hup for t in served if t is not None)
    clients = len(served)
    all_served = clients == n and len(served_rel) == n
    t_all = served_rel[-1] if all_served and served_rel else None
    closes = sorted(t - t_hup for f in finals for t in f.get("first_close_at", []))

    # CPU of the master's children from the HUP until every client was served
    # (or the end of the samples, if some never were).
    until = t_hup + t_all if t_all is not None else None
    after = [s for s in samples if s["t"] >= before["t"]]
    end = next((s for s in after if until is not None and s["t"] >= until), after[-1] if after
               else before)
    per_process = {}
    for pid in set(before["procs"]) | {p for s in after for p in s["procs"]}:
        seen = [s["procs"][pid] for s in after if pid in s["procs"] and s["t"] <= end["t"]]
        if seen:
            role = "old worker" if pid in old else ("park" if pid in before["procs"]
                                                    else "new worker")
            per_process[f"{role} {pid}"] = round(seen[-1] - before["procs"].get(pid, 0.0), 3)

    accepted = {r["seq"]: r for r in publishes if r["status"] == 202}
    unknown = {r["seq"] for r in publishes if str(r["status"]).startswith("unknown")}
    expected = sum(1 << s for s in accepted)
    allowed = expected | sum(1 << s for s in unknown)
    missing = clients_missing = extra = 0
    missed_by_seq: dict[int, int] = {}
    for key, count in (kv for f in finals for kv in f.get("seq_bitmaps", {}).items()):
        bits = int(key, 16)
        gone = expected & ~bits
        missing += gone.bit_count() * count
        clients_missing += count if gone else 0
        extra += (bits & ~allowed).bit_count() * count
        for seq in accepted:
            if gone >> seq & 1:
                missed_by_seq[seq] = missed_by_seq.get(seq, 0) + count

    latency = [f.get("latency", {}) for f in finals]
    window = {s for s, r in accepted.items() if r["t"] >= t_hup - window_before}
    steady = set(accepted) - window
    hist, base = _merge(latency, window), _merge(latency, steady)
    per_message = []
    for seq in sorted(accepted):
        h = _merge(latency, {seq})
        per_message.append([round(accepted[seq]["t"] - t_hup, 3), _ms(percentile(h, 50)),
                            _ms(percentile(h, 99)), _ms(percentile(h, 100)), sum(h.values())])
    gaps = [f["ping_gap_max"] for f in finals if f.get("ping_gap_max") is not None]
    return {
        "clients": clients,
        "closed_clients": len(closes),
        "closes_before_hup": sum(f.get("closes_before_mark", 0) for f in finals),
        "served_clients": len(served_rel),
        "served_all_s": t_all,
        "served_median_s": statistics.median(served_rel) if served_rel else None,
        "served_first_s": served_rel[0] if served_rel else None,
        "cpu_s": round(_cpu(end) - _cpu(before), 3),
        "cpu_until_s": round(end["t"] - t_hup, 3),
        "cpu_per_process_s": per_process,
        "published": len(publishes),
        "accepted": len(accepted),
        "publish_unknown": len(unknown),
        "publish_failed": sorted({str(r["status"]) for r in publishes
                                  if r["status"] != 202 and r["seq"] not in unknown}),
        "publish_retried": sum(len(r.get("retried", [])) for r in publishes),
        "published_in_window": len(window),
        "deliveries_in_window": sum(hist.values()),
        "latency_p50_ms": _ms(percentile(hist, 50)),
        "latency_p99_ms": _ms(percentile(hist, 99)),
        "latency_max_ms": _ms(percentile(hist, 100)),
        "steady_p50_ms": _ms(percentile(base, 50)),
        "steady_p99_ms": _ms(percentile(base, 99)),
        "missing": missing,
        "clients_missing": clients_missing,
        # message: [its id, seconds after the HUP it was published, clients that missed it]
        "missed_messages": {str(s): [accepted[s]["id"], round(accepted[s]["t"] - t_hup, 3), c]
                            for s, c in sorted(missed_by_seq.items())},
        "unexpected": extra,
        "duplicates": sum(f.get("duplicates", 0) for f in finals),
        "clients_with_duplicates": sum(f.get("clients_with_duplicates", 0) for f in finals),
        "gap_events": sum(f.get("gap_events", 0) for f in finals),
        "ids_not_increasing": sum(f.get("id_not_increasing", 0) for f in finals),
        "ping_gap_max_s": max(gaps) if gaps else None,
        "not_connected": sum(f.get("not_connected", 0) for f in finals),
        "served_curve": _thin(served_rel, 200),
        "close_curve": _thin(closes, 100),
        "per_message": per_message,
    }


def _thin(times: list[float], most: int) -> list[list[float]]:
    """``[seconds, how many by then]`` points of a sorted list, at most about ``most``."""
    if not times:
        return []
    step = max(1, len(times) // most)
    points = [[round(times[i], 4), i + 1] for i in range(0, len(times), step)]
    if points[-1][1] != len(times):
        points.append([round(times[-1], 4), len(times)])
    return points


def one_line(r: dict) -> str:
    served = f"{r['served_all_s']:.2f} s" if r["served_all_s"] is not None else \
        f"NOT ALL ({r['served_clients']}/{r['n']})"
    return (f"run {r['run']} {r['mode']}: closed {r['closed_clients']}/{r['n']}, all served "
            f"{served}, worker CPU {r['cpu_s']:.2f} s, latency p50/p99 "
            f"{r['latency_p50_ms']}/{r['latency_p99_ms']} ms over {r['deliveries_in_window']:,} "
            f"deliveries, missing {r['missing']}, duplicates {r['duplicates']}")


# (key, label, unit, format)
FIGURES = [
    ("closed_clients", "clients that saw a close", "", "{:,.0f}"),
    ("served_all_s", "HUP until the new worker serves every client", "s", "{:.2f}"),
    ("cpu_s", "CPU of old + new worker + park, HUP until then", "s", "{:.2f}"),
    ("latency_p50_ms", "publish-to-receive p50, published from 1 s before the HUP", "ms",
     "{:,.0f}"),
    ("latency_p99_ms", "publish-to-receive p99, published from 1 s before the HUP", "ms",
     "{:,.0f}"),
    ("latency_max_ms", "publish-to-receive max, same messages", "ms", "{:,.0f}"),
    ("deliveries_in_window", "deliveries of those messages", "", "{:,.0f}"),
    ("missing", "deliveries missed (client x message)", "", "{:,.0f}"),
    ("duplicates", "deliveries received twice", "", "{:,.0f}"),
    ("steady_p99_ms", "p99 of messages published before that (no reload)", "ms", "{:,.0f}"),
    ("ping_gap_max_s", "longest time between two heartbeats of a client", "s", "{:.2f}"),
]


def summarise(runs: list[dict]) -> dict:
    """Per mode and figure: median, min, max; and handoff / goodbye of the medians."""
    out: dict = {}
    for key, *_ in FIGURES:
        row: dict = {}
        for mode in ("handoff", "goodbye"):
            values = [r[key] for r in runs if r["mode"] == mode]
            known = [v for v in values if v is not None]
            row[mode] = {"median": statistics.median(known) if known else None,
                         "min": min(known) if known else None,
                         "max": max(known) if known else None,
                         "runs": len(values), "unknown": len(values) - len(known)}
        h, g = row["handoff"]["median"], row["goodbye"]["median"]
        row["ratio"] = h / g if h is not None and g else None
        out[key] = row
    return out


def _cell(stats: dict, fmt: str) -> str:
    if stats["median"] is None:
        return "-" if not stats["runs"] else f"- ({stats['unknown']} of {stats['runs']} unknown)"
    text = fmt.format(stats["median"])
    if stats["runs"] > 1:
        text += f" ({fmt.format(stats['min'])} – {fmt.format(stats['max'])})"
    if stats["unknown"]:
        text += f", {stats['unknown']} run(s) unknown"
    return text


def write_markdown(path: Path, runs: list[dict], summary: dict, meta: dict) -> None:
    n = runs[0]["n"] if runs else 0
    a = meta["args"]
    lines = [
        f"# Reload with handoff against reload with goodbye, {n:,} SSE clients, one worker",
        "",
        f"Run {meta['date']} on {meta['machine']} (server, park, clients and publisher "
        f"share the 2 cores), tree {meta['git']}:",
        "",
        f"    {meta['command']}",
        "",
        f"Bus: {a['bus']}; heartbeat {a['heartbeat']:g} s; {a['rate']:g} publishes a second; "
        f"modes alternate, {len(runs)} runs. Each cell: median (min – max) over the runs of "
        "that mode.",
        "",
        "| figure | handoff | goodbye + reconnect | handoff / goodbye |",
        "|---|---|---|---|",
    ]
    for key, label, unit, fmt in FIGURES:
        row = summary[key]
        ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
        label = f"{label} ({unit})" if unit else label
        lines.append(f"| {label} | {_cell(row['handoff'], fmt)} | "
                     f"{_cell(row['goodbye'], fmt)} | {ratio} |")
    lines += [
        "",
        "Definitions:",
        "",
        "- **saw a close**: the client's stream ended (EOF or reset) after the HUP.",
        "- **serves every client**: from the SIGHUP to the master until the last client got "
        "its first byte written by the new worker: a heartbeat (a moved connection gets one "
        "at once when the new worker resumes it; the HUP is sent just after a heartbeat "
        "round, so the old worker sends none after it) or, after a reconnect, a response head "
        "(the new worker holds that connection). Clients use EventSource's reconnection: "
        "after the `retry:` the server sent (1000 ms on a goodbye), with `Last-Event-ID`.",
        "- **CPU**: user + system time of the gunicorn master's children (old worker, new "
        "worker, park; reaped ones through the master's cutime/cstime), sampled every 20 ms, "
        "from just before the HUP until the sample after the last client was served. It "
        "includes the new worker's boot and the deliveries of the messages published meanwhile.",
        f"- **latency**: for every delivery of every message published from "
        f"{a['window_before']:g} s before the HUP until the last publish ({a['after']:g} s "
        "after every client was served): receive time minus the time just before its POST "
        "(one monotonic clock). A POST answered 503 or refused is sent again every 0.1 s "
        "and keeps its first time. Percentiles from 1 %-wide buckets.",
        "- **missed / twice**: per client, every message whose POST was accepted (202), by "
        "its sequence number; every client subscribed before the first publish.",
        "- **load**: the machine's 1-minute load average before the run (anything else "
        "running shares the 2 cores).",
        "",
        "## Runs",
        "",
        "| run | mode | closed | served all (s) | median served (s) | CPU (s) | p50 / p99 / max "
        "(ms) | deliveries | missed | twice | gap events | published (retried) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        served = f"{r['served_all_s']:.2f}" if r["served_all_s"] is not None else \
            f"not all ({r['served_clients']:,})"
        median = f"{r['served_median_s']:.2f}" if r["served_median_s"] is not None else "-"
        lines.append(
            f"| {r['run']} | {r['mode']} | {r['closed_clients']:,} | {served} | {median} | "
            f"{r['cpu_s']:.2f} | {r['latency_p50_ms']} / {r['latency_p99_ms']} / "
            f"{r['latency_max_ms']} | {r['deliveries_in_window']:,} | {r['missing']:,} | "
            f"{r['duplicates']:,} | {r['gap_events']:,} | {r['accepted']} "
            f"({r['publish_retried']}) | {r.get('loadavg_before', 0):.2f} |")
    lines += ["", "CPU by process (s, HUP until every client was served):", ""]
    for r in runs:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cpu_per_process_s"].items()))
        lines.append(f"- run {r['run']} {r['mode']}: {parts}")
    lines += ["", "Raw runs: `runs.jsonl` (one JSON object a line); servers' logs: `logs/`.",
              ""]
    path.write_text("\n".join(lines))


def plot(path: Path, runs: list[dict]) -> bool:
    """Clients served over time, and each message's p99, around the HUP; False
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"handoff": "tab:blue", "goodbye": "tab:red"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labelled: set[str] = set()
    for r in runs:
        label = None if r["mode"] in labelled else r["mode"]
        labelled.add(r["mode"])
        curve = [[0.0, 0]] + r["served_curve"]
        left.step([p[0] for p in curve], [p[1] for p in curve], where="post",
                  color=colors[r["mode"]], alpha=0.8, label=label)
        if r["close_curve"]:
            left.step([p[0] for p in r["close_curve"]], [p[1] for p in r["close_curve"]],
                      where="post", color=colors[r["mode"]], linestyle=":", alpha=0.6,
                      label=f"{r['mode']}: closed" if label else None)
        pts = [m for m in r["per_message"] if m[2] is not None]
        right.plot([m[0] for m in pts], [m[2] for m in pts], marker=".", linewidth=0.8,
                   color=colors[r["mode"]], alpha=0.8, label=label)
    n = runs[0]["n"] if runs else 0
    left.set_xlabel("seconds after the HUP")
    left.set_ylabel(f"clients served by the new worker (of {n:,})")
    left.set_title("clients served by the new worker", fontsize=10)
    right.set_xlabel("publish time, seconds after the HUP")
    right.set_ylabel("publish-to-receive p99 over the clients (ms)")
    right.set_yscale("log")
    right.set_title("each message's p99, over the clients that got it", fontsize=10)
    for ax in (left, right):
        ax.axvline(0, color="grey", linewidth=0.8, linestyle="--")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
