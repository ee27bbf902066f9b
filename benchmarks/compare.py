"""Two runs of ``benchmarks/run.py`` side by side: did a change move the figures?

    python benchmarks/compare.py BEFORE_DIR[,DIR...] AFTER_DIR[,DIR...] [--out FILE]

Each directory holds the ``results.json`` of one run (``run.py --out DIR``),
made back to back on the same machine, on the tree before the change and on
the tree after it. Single runs of the same tree differ by more than their
repeats do (how a worker's heap lays out in one invocation), so several runs
per side, interleaved (before, after, before, after...), give the fairer
figure: each side's medians are taken over all its runs' repeats.

For each server kind both sides measured (the project's ``hijack``, and the
``floor`` as a check on the machine's own drift), the table gives RSS per
held connection (the worker's growth while they connect, over N), the
worker's whole RSS once it holds them all, CPU per delivered heartbeat, and
the ratio after / before. The hijack's CPU is also given against the floor of its own run
(one after the other, and side by side when the runs measured that), which
cancels most of the machine's drift. Exit status 1 when a hijack figure
moved by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

FIGURES = (("rss_per_connection", "RSS per held connection (B)"),
           ("rss_end", "worker RSS holding all N (B)"),
           ("cpu_per_message_us", "CPU per delivered heartbeat (us)"))


def load(directories: str) -> dict:
    """One or several runs (comma-separated directories) as one: their
    results together, the first run's meta with every command."""
    runs = [json.loads((Path(d) / "results.json").read_text())
            for d in str(directories).split(",") if d]
    meta = dict(runs[0]["meta"])
    meta["date"] = ", ".join(r["meta"]["date"] for r in runs)
    meta["command"] = "`; `".join(r["meta"]["command"] for r in runs)
    meta["runs"] = len(runs)
    sides = [r["side_by_side"] for r in runs if r.get("side_by_side")]
    side = None
    if sides:
        ratios = [s["cpu_ratio"] for s in sides if s.get("cpu_ratio")]
        side = {"cpu_ratio": statistics.median(ratios) if ratios else None}
    return {"meta": meta, "results": [x for r in runs for x in r["results"]],
            "side_by_side": side}


def medians(data: dict, server: str) -> dict[str, float | None]:
    """Median of each figure over the server's plain runs (not the storm ones)."""
    runs = [r for r in data["results"] if r["server"] == server and not r.get("storm")]
    out: dict[str, float | None] = {}
    for key, _ in FIGURES:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(before: dict, after: dict) -> dict:
    servers = [s for s in ("hijack", "floor")
               if any(r["server"] == s for r in before["results"])
               and any(r["server"] == s for r in after["results"])]
    rows = []
    for server in servers:
        b, a = medians(before, server), medians(after, server)
        for key, label in FIGURES:
            rows.append({"server": server, "figure": label, "key": key, "before": b[key],
                         "after": a[key], "ratio": _ratio(a[key], b[key])})
    if "floor" in servers and "hijack" in servers:
        key = "cpu_per_message_us"
        b = _ratio(medians(before, "hijack")[key], medians(before, "floor")[key])
        a = _ratio(medians(after, "hijack")[key], medians(after, "floor")[key])
        rows.append({"server": "hijack", "figure": "CPU per heartbeat / floor of the same run",
                     "key": "cpu_over_floor", "before": b, "after": a, "ratio": _ratio(a, b)})
    sb, sa = before.get("side_by_side") or {}, after.get("side_by_side") or {}
    if sb.get("cpu_ratio") and sa.get("cpu_ratio"):
        rows.append({"server": "hijack", "figure": "CPU per heartbeat / floor, side by side",
                     "key": "cpu_side_by_side", "before": sb["cpu_ratio"],
                     "after": sa["cpu_ratio"], "ratio": _ratio(sa["cpu_ratio"], sb["cpu_ratio"])})
    return {"before": before["meta"], "after": after["meta"], "rows": rows}


def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(result: dict, tolerance: float) -> str:
    lines = ["# Before and after, back to back", "",
             f"- before ({result['before']['runs']} runs): {result['before']['date']}; "
             f"`{result['before']['command']}`",
             f"- after ({result['after']['runs']} runs): {result['after']['date']}; "
             f"`{result['after']['command']}`",
             f"- machine: {result['after']['machine']}", "",
             f"Medians over all repeats of each side's runs (side by side: the median "
             f"of the runs' ratios); ratio = after / before; within "
             f"{tolerance:.0%} counts as unchanged.", "",
             "| server | figure | before | after | after / before | unchanged |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        ratio = row["ratio"]
        unchanged = "-" if ratio is None else ("yes" if abs(ratio - 1) <= tolerance else "no")
        fmt = "{:,.0f}" if row["key"] == "rss_end" else "{:.2f}"
        lines.append(f"| {row['server']} | {row['figure']} | {_f(row['before'], fmt)} | "
                     f"{_f(row['after'], fmt)} | {_f(ratio)} | {unchanged} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("before", help="results directory of run.py, or several, comma-separated")
    ap.add_argument("after", help="the same, for the tree after the change")
    ap.add_argument("--out", type=Path, help="write the table here (markdown) as well")
    ap.add_argument("--tolerance", type=float, default=0.10)
    args = ap.parse_args(argv)
    result = compare(load(args.before), load(args.after))
    md = render(result, args.tolerance)
    print(md, end="")
    if args.out:
        args.out.write_text(md)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    moved = [r for r in result["rows"] if r["server"] == "hijack" and r["ratio"] is not None
             and abs(r["ratio"] - 1) > args.tolerance]
    return 1 if moved else 0


if __name__ == "__main__":
    sys.exit(main())
