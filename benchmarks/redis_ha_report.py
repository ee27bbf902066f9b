"""The report of ``benchmarks/redis_ha.py``: medians per mode, ratios to ``single``,
``results.json``, ``README.md`` and ``redis_ha.png``.

Kept apart from the measuring so that a report can be rewritten from its
``results.json`` (``python benchmarks/redis_ha_report.py DIR``) without
running Redis again, e.g. after a change of wording, or after adding
``"notes": [...]`` to it (about other invocations, say): each becomes a line
of the README's header.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scale_redis import machine as base_machine
from storm import version

#: (section of a run, key, label, digits). The order is the README's.
FIGURES = (
    ("cost", "publish_p50_us", "publish wall p50 (µs)", 0),
    ("cost", "publish_p99_us", "publish wall p99 (µs)", 0),
    ("cost", "publish_mean_us", "publish wall mean (µs)", 0),
    ("cost", "cpu_us_per_publish", "publisher CPU per publish (µs)", 1),
    ("cost", "publishes_per_s", "publishes per second, one process", 0),
    ("cost", "ab_p50_us", "publish wall p50 in the A/B blocks, as configured (µs)", 0),
    ("cost", "nowait_p50_us", "publish wall p50 in the A/B blocks, without WAIT (µs)", 0),
    ("cost", "wait_p50_us", "WAIT's part of the p50: the two above, difference (µs)", 0),
    ("cost", "redis_primary_cpu_us_per_publish", "Redis primary CPU per publish (µs)", 1),
    ("cost", "redis_replica_cpu_us_per_publish", "Redis replicas' CPU per publish (µs, sum)", 1),
    ("latency", "latency_p50_ms", "publish-to-receive p50 (ms)", 1),
    ("latency", "latency_p99_ms", "publish-to-receive p99 (ms)", 1),
    ("latency", "latency_max_ms", "publish-to-receive max (ms)", 1),
    ("latency", "post_p50_ms", "POST /publish round trip p50 (ms)", 2),
    ("latency", "post_p99_ms", "POST /publish round trip p99 (ms)", 2),
)
#: The main table's columns: (key, header).
MAIN = (("publish_p50_us", "publish µs p50"), ("publish_p99_us", "publish µs p99"),
        ("cpu_us_per_publish", "CPU µs / publish"), ("publishes_per_s", "publishes/s"),
        ("latency_p50_ms", "latency ms p50"), ("latency_p99_ms", "latency ms p99"),
        ("latency_max_ms", "latency ms max"))
#: Figures without a ratio to ``single``: near 0 there (no WAIT), a ratio means nothing.
NO_RATIO = {"wait_p50_us"}
#: The files whose code is measured: a change to them, not yet committed, is named.
MEASURED = ("wsgi_hijack", "harness")
BUS_FILES = ("wsgi_hijack/redis_bus.py", "wsgi_hijack/redis_cluster_bus.py")


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def meta(argv: list[str], args: argparse.Namespace, modes: dict[str, str], repo: Path) -> dict:
    """The command, the machine, and the tree measured: the commit, and when
    the measured code (:data:`MEASURED`) differs from it, the files that do and
    a digest of the buses' source."""
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True,
                              timeout=30).stdout

    changed = [line[3:] for line in git("status", "--porcelain", "--", *MEASURED).splitlines()]
    out = args.out.resolve()
    settings = dict(vars(args), out=str(out.relative_to(repo) if out.is_relative_to(repo)
                                        else out))
    machine = {**base_machine(), "cpu_model": model,
               "commit": git("rev-parse", "--short", "HEAD").strip() or "?",
               "redis": version(["redis-server", "--version"])}
    if changed:
        machine["modified"] = changed
        machine["sources_sha1"] = {f: hashlib.sha1((repo / f).read_bytes()).hexdigest()[:12]
                                   for f in BUS_FILES if (repo / f).exists()}
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(["python", "benchmarks/redis_ha.py", *argv]),
            "machine": machine, "modes": modes, "settings": settings}


def summarise(runs: list[dict], modes: list[str]) -> dict:
    """Per mode: its status, each figure's median/min/max over its runs, and
    the median's ratio to ``single``'s median."""
    out: dict = {}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        s: dict = {"runs": len(mine), "figures": {}, "ratio": {}}
        if mine and all(r.get("supported") is False for r in mine):
            s.update(status="not supported", reason=mine[0].get("reason", ""))
            out[mode] = s
            continue
        good = [r for r in mine if "latency" in r]
        errors = [r["error"] for r in mine if "error" in r]
        for section, key, _, _ in FIGURES:
            values = [r[section][key] for r in good if r[section].get(key) is not None]
            if values:
                s["figures"][key] = {"median": statistics.median(values), "min": min(values),
                                     "max": max(values)}
        s["deliveries_expected"] = sum(r["latency"]["deliveries_expected"] for r in good)
        s["deliveries_received"] = sum(r["latency"]["deliveries_received"] for r in good)
        s["duplicates"] = sum(r["latency"]["duplicates"] for r in good)
        s["all_received"] = bool(good) and all(r["latency"]["all_received"] for r in good)
        s["min_replicas"] = good[0]["cost"]["min_replicas"] if good else None
        s["status"] = "ok" if s["all_received"] and not errors else "failed"
        s["errors"] = errors
        out[mode] = s
    base = out.get("single", {}).get("figures", {})
    for s in out.values():
        for key, f in s["figures"].items():
            b = base.get(key, {}).get("median")
            s["ratio"][key] = (round(f["median"] / b, 3) if b and key not in NO_RATIO
                               else None)
    return out


def _num(v: float | None, digits: int) -> str:
    if v is None:
        return "-"
    return f"{round(v, digits) + 0.0:,.{digits}f}"  # + 0.0: 0, never -0


def _cell(f: dict | None, digits: int) -> str:
    if not f:
        return "-"
    cell = _num(f["median"], digits)
    if f["min"] != f["max"]:
        cell += f" ({_num(f['min'], digits)} – {_num(f['max'], digits)})"
    return cell


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def _calls(runs: list[dict], mode: str, cmd: str) -> int:
    return sum(r["cost"]["commandstats"].get(cmd, {}).get("calls", 0)
               for r in runs if r["mode"] == mode and "cost" in r)


def _versus(f: dict, sf: dict, r: dict, key: str, digits: int, unit: str) -> str:
    unit = unit if unit.startswith("/") else " " + unit
    return (f"{_num(f[key]['median'], digits)}{unit} against "
            f"{_num(sf[key]['median'], digits)}{unit} ({_ratio(r.get(key))} x)")


def _med(s: dict, key: str) -> float | None:
    return s["figures"].get(key, {}).get("median")


def _shard_traffic(runs: list[dict], mode: str) -> dict | None:
    """Over ``mode``'s runs (medians): cluster-bus messages per publish sent by
    the channel's master, received by its replicas, and the most any other node
    sent or received; and the replication CPU off the shard."""
    rows = []
    for r in runs:
        c = r.get("cost") or {}
        shard, traffic = c.get("shard"), c.get("cluster_bus_per_publish")
        if r["mode"] != mode or not shard or not traffic:
            continue
        mine = {shard["master"], *shard["replicas"]}
        # int keys here, str ones once through JSON
        traffic = {int(p): v for p, v in traffic.items()}
        cpu = {int(p): v for p, v in c["redis_cpu_us_per_publish_by_node"].items()}
        rows.append({
            "master": shard["master"], "replicas": shard["replicas"],
            "sent": traffic[shard["master"]][0],
            "received": sum(traffic[p][1] for p in shard["replicas"]),
            "others": max([max(v) for p, v in traffic.items() if p not in mine], default=0.0),
            "other_nodes": len(traffic) - len(mine),
            "other_cpu": max([v for p, v in cpu.items() if p not in mine], default=0.0)})
    if not rows:
        return None
    med = {k: statistics.median(x[k] for x in rows)
           for k in ("sent", "received", "others", "other_cpu")}
    return {**med, "other_nodes": rows[0]["other_nodes"], "runs": rows}


def _range(s: dict, key: str, digits: int) -> str:
    f = s["figures"].get(key)
    return "-" if not f else f"{_num(f['min'], digits)}–{_num(f['max'], digits)}"


def _overlap(a: dict, b: dict, key: str) -> bool:
    fa, fb = a["figures"].get(key), b["figures"].get(key)
    return bool(fa and fb) and fa["min"] <= fb["max"] and fb["min"] <= fa["max"]


def in_short(summary: dict, runs: list[dict]) -> list[str]:
    """Three sentences: what WAIT costs, what a Cluster costs or saves per
    publish, and where a Cluster publish goes."""
    ok = {k: s for k, s in summary.items() if s["status"] == "ok"}
    if "single" not in ok:
        return []
    single = ok["single"]
    out = []
    waiting = [k for k, s in ok.items() if s.get("min_replicas")]
    if waiting:
        parts = " and ".join(f"{_num(_med(ok[k], 'wait_p50_us'), 0)} µs on {k} "
                             f"({_range(ok[k], 'wait_p50_us', 0)})" for k in waiting)
        out.append(
            f"`WAIT 1` adds {parts} to a publish at p50 (the same bus in alternating blocks "
            f"with and without it; {_num(_med(single, 'wait_p50_us'), 0)} µs on one server, "
            "where both blocks are the same): a replica's acknowledgement over loopback, "
            "paid by the publishing connection (the POST's answer) and not by delivery, "
            "which the script starts before the `WAIT`.")
    cluster = ok.get("cluster")
    if cluster:
        p50, base = _med(cluster, "publish_p50_us"), _med(single, "publish_p50_us")
        text = (f"Per publish a Cluster costs the publisher {_num(p50, 0)} µs at p50 against "
                f"{_num(base, 0)} µs on one server")
        ranges = [_range(cluster, "publish_p50_us", 0), _range(single, "publish_p50_us", 0)]
        if "sentinel" in ok:
            text += f" and {_num(_med(ok['sentinel'], 'publish_p50_us'), 0)} µs on Sentinel"
            ranges.append(_range(ok["sentinel"], "publish_p50_us", 0))
        text += (f" (runs {', '.join(ranges)} µs"
                 + (": Cluster and one server overlap, no difference this machine resolves"
                    if _overlap(cluster, single, "publish_p50_us")
                    else f": {p50 - base:+,.0f} µs, "
                    f"{_num(_med(cluster, 'wait_p50_us'), 0)} of them the `WAIT`") + ")")
        text += (f", and Redis {_num(_med(cluster, 'redis_primary_cpu_us_per_publish'), 1)}"
                 " µs of CPU on the channel's master plus "
                 f"{_num(_med(cluster, 'redis_replica_cpu_us_per_publish'), 1)} µs on its "
                 "replica, against "
                 f"{_num(_med(single, 'redis_primary_cpu_us_per_publish'), 1)} µs on one server")
        if "sentinel" in ok:
            s = ok["sentinel"]
            n = next(len(r["cost"]["replicas"]) for r in runs
                     if r["mode"] == "sentinel" and "cost" in r)
            text += (f" and {_num(_med(s, 'redis_primary_cpu_us_per_publish'), 1)} + "
                     f"{_num(_med(s, 'redis_replica_cpu_us_per_publish'), 1)} µs on Sentinel's "
                     f"primary and {n} replicas")
        out.append(text + ".")
        traffic = _shard_traffic(runs, "cluster")
        if traffic:
            out.append(
                "A Cluster publish travels only to its shard: the channel's master sent "
                f"{traffic['sent']:.2f} cluster-bus messages per publish (the `SPUBLISH` to "
                f"its replica, which received {traffic['received']:.2f}), the other "
                f"{traffic['other_nodes']} nodes at most {traffic['others']:.2f} (heartbeats) "
                f"and {traffic['other_cpu']:.1f} µs of CPU per publish, where a plain "
                "`PUBLISH` would reach every node of the cluster.")
    return out


def reading(summary: dict, runs: list[dict]) -> list[str]:
    """What the figures say: in short, then mode by mode against ``single``,
    then what follows from how the publish works (by construction, not measured)."""
    single = summary.get("single")
    if not single or single["status"] != "ok":
        return ["No successful `single` run to compare with."]
    sf = single["figures"]
    out = [" ".join(in_short(summary, runs)), ""]
    for mode, s in summary.items():
        if mode == "single":
            continue
        if s["status"] != "ok":
            why = s.get("reason") or "; ".join(s.get("errors") or []) or "deliveries missing"
            out.append(f"- **{mode}**: {s['status']} ({why}).")
            continue
        f, r = s["figures"], s["ratio"]
        waits = _calls(runs, mode, "wait")
        publishes = sum(x["cost"]["publishes"] for x in runs
                        if x["mode"] == mode and "cost" in x)
        shards = sorted({x["cost"]["shard"]["master"] for x in runs
                         if x["mode"] == mode and (x.get("cost") or {}).get("shard")})
        where = (f"the channel's master (port {', '.join(map(str, shards))} in its runs)"
                 if shards else "the primary")
        extra = f["publish_p50_us"]["median"] - sf["publish_p50_us"]["median"]
        text = (f"- **{mode}** (MIN_REPLICAS {s['min_replicas']}: {where} ran `WAIT` "
                f"{waits:,} times for {publishes:,} measured publishes, and took "
                f"{_calls(runs, mode, 'replconf'):,} `REPLCONF` acknowledgements from "
                "replicas): a publish takes "
                f"{_versus(f, sf, r, 'publish_p50_us', 0, 'µs')} at p50 ({extra:+,.0f} µs; "
                f"in the A/B blocks {_num(f['ab_p50_us']['median'], 0)} µs, and "
                f"{_num(f['nowait_p50_us']['median'], 0)} µs without `WAIT`) and "
                f"{_versus(f, sf, r, 'publish_p99_us', 0, 'µs')} at p99; one process publishes "
                f"{_versus(f, sf, r, 'publishes_per_s', 0, '/s')}. The publisher's CPU per "
                f"publish: {_versus(f, sf, r, 'cpu_us_per_publish', 1, 'µs')}. Redis: the "
                "primaries' CPU per publish "
                f"{_versus(f, sf, r, 'redis_primary_cpu_us_per_publish', 1, 'µs')}")
        rep = f.get("redis_replica_cpu_us_per_publish")
        if rep:
            text += f", and the replicas' {_num(rep['median'], 1)} µs between them"
        text += (". Publish-to-receive: p50 "
                 f"{_versus(f, sf, r, 'latency_p50_ms', 1, 'ms')}, p99 "
                 f"{_versus(f, sf, r, 'latency_p99_ms', 1, 'ms')}, max "
                 f"{_versus(f, sf, r, 'latency_max_ms', 1, 'ms')}; the POST round trip p50 "
                 f"{_versus(f, sf, r, 'post_p50_ms', 2, 'ms')}.")
        out.append(text)
    out += ["", "How to read it. The `WAIT` runs after the script, in the same pipeline: the "
            "script's `PUBLISH` (`SPUBLISH` on a Cluster) goes out to the workers' "
            "subscriptions when the primary runs the script, and the `WAIT` then holds only "
            "the publishing connection. So the `WAIT` delays the publisher (the publish call, "
            "the `POST`'s answer, the rate one connection can publish at), not the delivery "
            "to subscribers. A difference in publish-to-receive between the modes is the "
            "rest of the topology (replicas, sentinels or cluster nodes on the same two "
            "cores, the replication stream out of the primary, the cluster's heartbeats) or "
            "noise: compare it with the ranges over the runs. So is any difference between "
            "modes: each run starts its topology afresh, seconds to minutes from the others, "
            "and the machine's other load moves a publish's wall and CPU time by tens of "
            "percent between runs (compare one server's first loop with its A/B blocks); "
            "the `WAIT`'s part, measured within a run in alternating blocks, is the steadier "
            "figure. The difference in publish wall "
            "time against `single` is the `WAIT` (the row \"WAIT's part\": with minus "
            "without, on the same bus, in alternating blocks) plus the primary's work "
            "feeding its replicas (on a Cluster, also the cluster-bus message to its shard), "
            "here on loopback; across hosts every publish also waits "
            "for a network round trip. On "
            "a Cluster every figure is one channel, so one shard: the other masters and "
            "their replicas are idle here. They would carry other channels, which is what a "
            "Cluster adds; this load, the same in every mode, does not measure that."]
    return out


def markdown(meta: dict, runs: list[dict], summary: dict) -> str:
    m, st = meta["machine"], meta["settings"]
    lines = ["# The Redis bus on one server, on Sentinel, on Cluster", "",
             f"- Command: `{meta['command']}`",
             f"- Date: {meta['date']}; commit {m['commit']}"
             + (f" with uncommitted changes to the measured code ({', '.join(m['modified'])};"
                " sha1 " + ", ".join(f"`{f}` {h}" for f, h in m["sources_sha1"].items()) + ")"
                if m.get("modified") else f" (`{'`, `'.join(MEASURED)}` as committed)"),
             f"- Machine: {m['cpus']} cores ({m['cpu_model']}), {m['mem_gib']} GiB, Linux "
             f"{m['kernel']}, Python {m['python']}, {m['redis']}. Everything (Redis nodes, "
             "sentinels, gunicorn, clients, publisher) on the same cores and on loopback; "
             f"load average {m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end']:.2f} "
             "at the end.",
             f"- Load: publish cost {st['publishes']:,} publishes of {st['size']} B back to back "
             f"from one process; latency {st['clients']:,} SSE clients ({st['client_processes']}"
             f" client processes), gunicorn 2 workers, {st['messages']} messages at "
             f"{st['rate']:g}/s. `appendfsync {st['appendfsync']}` on every data node. "
             f"{st['repeat']} run(s) per mode, alternating; a cell is the median "
             "(and the range)."]
    lines += [f"- Note: {note}" for note in meta.get("notes", [])]
    lines += ["", "Modes:", ""]
    lines += [f"- `{k}`: {v}" for k, v in meta["modes"].items()]
    head = "| mode | " + " | ".join(f"{h} | x single" for _, h in MAIN) + \
        " | received / expected |"
    lines += ["", head, "|---" * (2 * len(MAIN) + 2) + "|"]
    digits = {key: d for _, key, _, d in FIGURES}
    for mode, s in summary.items():
        if s["status"] == "not supported":
            lines.append(f"| {mode} | not supported: {s['reason']} |")
            continue
        cells = [f"{_num(s['figures'].get(k, {}).get('median'), digits[k])} | "
                 f"{_ratio(s['ratio'].get(k))}" for k, _ in MAIN]
        got = f"{s['deliveries_received']:,} / {s['deliveries_expected']:,}"
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {got} |")
    ok_modes = [k for k, s in summary.items() if s["status"] != "not supported"]
    lines += ["", "Every figure (median, range over the runs; ratio = median / single's median):",
              "", "| figure | " + " | ".join(f"{k} | x single" for k in ok_modes) + " |",
              "|---" * (1 + 2 * len(ok_modes)) + "|"]
    for _, key, label, d in FIGURES:
        lines.append(f"| {label} | " + " | ".join(
            f"{_cell(summary[k]['figures'].get(key), d)} | {_ratio(summary[k]['ratio'].get(key))}"
            for k in ok_modes) + " |")
    lines += ["", "## Reading", ""] + reading(summary, runs)
    lines += ["", "## Definitions", "",
              "- *publish wall*: the bus's `publish()` timed with `perf_counter` around each "
              "call (the script, and with Sentinel and Cluster the `WAIT` in the same "
              "pipeline), after 100 unmeasured ones; *A/B blocks*: then as many publishes "
              "again as configured and as many with `min_replicas` 0, in alternating blocks "
              "of 100 (ABBA ABBA ...), on the same bus; *publisher CPU*: "
              "`time.process_time()` of the publishing process over the first loop / "
              "publishes; *Redis CPU*: `used_cpu_sys + used_cpu_user` "
              "(`INFO cpu`) of the primaries, and of the replicas summed, over the first loop; "
              "*cluster-bus messages*: `cluster_stats_messages_sent`/`_received` "
              "(`CLUSTER INFO`) of each node over the first loop, per publish.",
              "- *publish-to-receive*: the client's read time minus `time.monotonic()` just "
              "before the `POST /publish` (one clock for every process here), over every "
              "(client, message) pair; 0.1 ms buckets. *POST round trip*: from before the "
              "request to the end of the 202 answer, a new connection each time.",
              "", "Runs (`results.json` has everything; `logs/` the gunicorn logs):", "",
              "| run | mode | publish p50 µs | CPU µs | latency p50 / p99 ms | received | "
              "load before |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        if "latency" in r:
            c, x = r["cost"], r["latency"]
            lines.append(f"| {r['run']} | {r['mode']} | {c['publish_p50_us']} | "
                         f"{c['cpu_us_per_publish']} | {x['latency_p50_ms']} / "
                         f"{x['latency_p99_ms']} | {x['deliveries_received']:,} / "
                         f"{x['deliveries_expected']:,} | {r['loadavg_before']:.2f} |")
        else:
            why = r.get("error") or ("not supported" if r.get("supported") is False else "?")
            lines.append(f"| {r['run']} | {r['mode']} | {why} | | | | |")
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: dict) -> None:
    """Two panels: publish cost (µs) and publish-to-receive latency (ms), bars per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [k for k, s in summary.items() if s["figures"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    panels = ((axes[0], "publish cost (µs)", ("publish_p50_us", "publish_p99_us",
                                              "cpu_us_per_publish"),
               ("wall p50", "wall p99", "publisher CPU")),
              (axes[1], "publish-to-receive (ms)", ("latency_p50_ms", "latency_p99_ms",
                                                    "latency_max_ms"), ("p50", "p99", "max")))
    width = 0.8 / 3
    for ax, title, keys, names in panels:
        for j, (key, name) in enumerate(zip(keys, names, strict=True)):
            med = [summary[m]["figures"].get(key, {}).get("median", 0) for m in modes]
            lo = [med[i] - summary[m]["figures"].get(key, {}).get("min", med[i])
                  for i, m in enumerate(modes)]
            hi = [summary[m]["figures"].get(key, {}).get("max", med[i]) - med[i]
                  for i, m in enumerate(modes)]
            xs = [i + (j - 1) * width for i in range(len(modes))]
            bars = ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=name)
            ax.bar_label(bars, fmt="%.0f" if "us" in key else "%.1f", fontsize=7)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(title)
        ax.legend(fontsize=8)
    skipped = [k for k in summary if k not in modes]
    fig.suptitle("Redis bus: one server against HA topologies"
                 + (f" (not supported: {', '.join(skipped)})" if skipped else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, meta: dict, runs: list[dict], summary: dict) -> bool:
    """Write the three files; True when every supported mode passed."""
    ok = all(s["status"] != "failed" for s in summary.values())
    doc = {"ok": ok, **meta, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "README.md").write_text(markdown(meta, runs, summary))
    plot(out / "redis_ha.png", summary)
    return ok


if __name__ == "__main__":  # rewrite README.md and the plot from results.json
    where = Path(sys.argv[1])
    doc = json.loads((where / "results.json").read_text())
    sys.exit(0 if write(where, {k: doc[k] for k in ("date", "command", "machine", "modes",
                                                     "settings", "notes") if k in doc},
                        doc["runs"], doc["summary"]) else 1)
