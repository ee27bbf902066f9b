"""The load client's report: the dict :func:`wsgi_hijack.loadclient.run`
returns, its storm section (heads over time), and the human-readable table.
"""

from __future__ import annotations

import math
import statistics

_COUNTS = ("attempts", "opened", "headed", "held", "dropped", "failed", "retries",
           "closed_without_answer", "timed_out", "connect_failed")


def summary(values: list[int]) -> dict:
    """Min, median, max and total of per-connection counts."""
    if not values:
        return {"min": None, "median": None, "max": None, "total": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "total": sum(values)}


def heads_over_time(times: list[float], t0: float, step: float = 0.01) -> list[list[float]]:
    """Response heads received by each moment, as ``[seconds since t0, heads]``
    points: the end of each ``step`` in which heads arrived, the start of each
    stretch without any, and the origin; a line through them is the curve of
    hijacked-over-time, kept small at 20,000 heads."""
    rel = sorted(t - t0 for t in times)
    if rel and rel[-1] > step * 4000:  # a slow storm: at most ~8000 points
        step = rel[-1] / 4000
    points: list[list[float]] = [[0.0, 0]]
    i = 0
    while i < len(rel):
        start = math.floor(rel[i] / step) * step
        if start > points[-1][0] + step / 2:
            # No heads since the last point: a flat stretch (a SYN waiting for
            # its retransmission), so that a line drawn through the points is flat.
            points.append([round(start, 3), i])
        edge = start + step
        while i < len(rel) and rel[i] < edge:
            i += 1
        # Each point is the end of a step with heads in it; the last one is the
        # last head itself, so the curve ends where the storm did.
        points.append([round(edge if i < len(rel) else rel[-1], 3), i])
    return points


def storm_section(finals: list[dict], n: int, storm: bool, t_go: float | None) -> dict:
    """Heads over time from the first connect, and when the last of N got its head.

    ``finals``: each client process's last report; ``t_go``: when the storm
    was let go, the origin if no process reported its first connect."""
    times = [t for f in finals for t in f.get("head_times", [])]
    firsts = [f["t_first"] for f in finals if f.get("t_first") is not None]
    t0 = min(firsts) if firsts else t_go
    if t0 is None:
        return {"storm": storm, "heads_over_time": [], "time_to_last_head": None,
                "time_to_all_hijacked": None, "time_to_half": None, "connect_spread": None}
    rel = sorted(t - t0 for t in times)
    return {
        "storm": storm,
        # How long the client processes took to issue their first connects
        # after one another: how close to "at once" this storm was.
        "connect_spread": (max(firsts) - min(firsts)) if firsts else None,
        "heads_over_time": heads_over_time(times, t0),
        "time_to_half": rel[(n + 1) // 2 - 1] if len(rel) >= (n + 1) // 2 and rel else None,
        "time_to_last_head": rel[-1] if rel else None,
        # Every one of the N got its head (was hijacked): when the last did.
        "time_to_all_hijacked": rel[-1] if rel and len(rel) >= n else None,
    }


def build_report(url: str, n: int, duration: float, shares: list[dict], finals: list[dict],
                 server: list[dict], t_start: float, held_at: float | None) -> dict:
    """The report of one run, but for its ``storm`` section (:func:`storm_section`).

    ``shares``: the plan (:func:`wsgi_hijack.loadclient_machine.plan`);
    ``finals``: each client process's last report; ``server``:
    :func:`server_section`; ``held_at``: when the connect phase ended."""
    total = connection_totals(finals)
    firsts = [f["t_first"] for f in finals if f.get("t_first") is not None]
    heads = [f["t_last_head"] for f in finals if f.get("t_last_head") is not None]
    all_headed = total["headed"] == n
    t_heads = (max(heads) - min(firsts)) if firsts and heads and all_headed else None
    window_counts = [c for f in finals for c in f.get("messages_window", [])]
    total_counts = [c for f in finals for c in f.get("messages_total", [])]
    return {
        "url": url,
        "n": n,
        "processes": len(shares),
        "source_addresses": [s["source"] for s in shares],
        "connections": total,
        "time_to_all_heads": t_heads,
        "connect_phase_s": (held_at - t_start) if held_at else None,
        "hold": {
            "seconds": duration,
            "messages_per_connection": summary(window_counts),
            "messages_per_connection_total": summary(total_counts),
        },
        "server": server,
        # This client does not time messages: publish-to-receive latency is
        # measured by benchmarks/ws_memory.py (benchmarks/results/sse_latency.md).
        "latency": None,
    }


def connection_totals(finals: list[dict]) -> dict:
    """The client processes' counts summed, and their errors by name."""
    total: dict = {k: sum(f.get(k, 0) for f in finals) for k in _COUNTS}
    errors: dict[str, int] = {}
    for f in finals:
        for k, v in f.get("errors", {}).items():
            errors[k] = errors.get(k, 0) + v
    total["errors"] = errors
    return total


def server_section(pids: list[int], finals: list[dict], before: list[dict],
                   mark_sample: list[dict], end_sample: list[dict],
                   samples: list[list[dict]]) -> list[dict]:
    """Per server process: RSS, fds and CPU before the connect phase
    (``before``), at the start (``mark_sample``) and end (``end_sample``) of
    the hold window, and the soak timeline from ``samples``; per held
    connection and per message delivered in the window (``finals``: each
    client process's last report)."""
    held = max(sum(f.get("held", 0) for f in finals), 1)
    messages = sum(c for f in finals for c in f.get("messages_window", []))
    server = []
    for i, pid in enumerate(pids):
        b, m, e = (before[i] if i < len(before) else {}), (
            mark_sample[i] if i < len(mark_sample) else {}), (
            end_sample[i] if i < len(end_sample) else {})
        entry: dict = {"pid": pid}
        if b.get("gone") or m.get("gone") or e.get("gone") or not (b and m and e):
            entry["gone"] = True
            server.append(entry)
            continue
        cpu_window = e["cpu"] - m["cpu"]
        entry.update(
            rss_before=b["rss"], rss_held=m["rss"], rss_end=e["rss"],
            rss_per_connection=(e["rss"] - b["rss"]) / held,
            fds_before=b["fds"], fds_held=m["fds"], fds_end=e["fds"],
            cpu_connect_s=m["cpu"] - b["cpu"],
            cpu_per_connection_us=(m["cpu"] - b["cpu"]) / held * 1e6,
            cpu_window_s=cpu_window,
            cpu_window_user_s=e["cpu_user"] - m["cpu_user"],
            cpu_per_message_us=(cpu_window / messages * 1e6) if messages else None,
        )
        timeline = [s[i] for s in samples if i < len(s) and not s[i].get("gone")]
        if timeline:
            timeline = [m] + timeline + [e]
            t0 = timeline[0]["t"]
            entry["timeline"] = [{"t": round(s["t"] - t0, 3), "rss": s["rss"], "fds": s["fds"],
                                  "cpu": s["cpu"]} for s in timeline]
            rss = [s["rss"] for s in timeline]
            fds = [s["fds"] for s in timeline]
            entry["soak"] = {"rss_min": min(rss), "rss_max": max(rss),
                             "rss_growth": rss[-1] - rss[0], "fds_min": min(fds),
                             "fds_max": max(fds)}
        server.append(entry)
    return server


# -- the human-readable table ------------------------------------------------------------------

def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1024
    return str(b)


def format_report(r: dict) -> str:
    c = r["connections"]
    rows = [
        ("URL", r["url"]),
        ("connections asked", f"{r['n']} from {r['processes']} process(es)"
         + (f", sources {', '.join(s for s in r['source_addresses'] if s)}"
            if any(r["source_addresses"]) else "")),
        ("opened (TCP connects)", f"{c['opened']} in {c['attempts']} attempts, "
         f"{c['retries']} retries"),
        ("got a response head", str(c["headed"])),
        ("held at the end", str(c["held"])),
        ("dropped after the head", str(c["dropped"])),
        ("failed (gave up)", str(c["failed"])),
        ("closed without an answer", str(c.get("closed_without_answer", 0))
         + ("" if r.get("storm", {}).get("storm") else " (each retried)")),
        ("no head in time / connect failed",
         f"{c.get('timed_out', 0)} / {c.get('connect_failed', 0)}"),
        ("time until all got their head",
         f"{r['time_to_all_heads']:.3f} s" if r["time_to_all_heads"] is not None else "-"),
    ]
    st = r.get("storm") or {}
    if st.get("storm"):
        rows.append(("storm: time until all were hijacked",
                     f"{st['time_to_all_hijacked']:.3f} s from the first connect"
                     if st.get("time_to_all_hijacked") is not None else "- (not all)"))
        rows.append(("storm: half had their head after",
                     f"{st['time_to_half']:.3f} s" if st.get("time_to_half") is not None
                     else "-"))
    if c["errors"]:
        rows.append(("errors seen", ", ".join(f"{k} x{v}" for k, v in c["errors"].items())))
    for label, key in (("messages per connection in the hold window", "messages_per_connection"),
                       ("messages per connection in total", "messages_per_connection_total")):
        s = r["hold"][key]
        rows.append((label, f"min {s['min']}, median {s['median']}, max {s['max']} "
                            f"(total {s['total']})"))
    rows.append(("hold window", f"{r['hold']['seconds']:g} s"))
    for s in r["server"]:
        p = f"server pid {s['pid']}"
        if s.get("gone"):
            rows.append((p, "gone (exited during the run)"))
            continue
        rows += [
            (f"{p} RSS", f"{_fmt_bytes(s['rss_before'])} before, {_fmt_bytes(s['rss_end'])} "
                         f"held: {s['rss_per_connection']:.0f} B per connection"),
            (f"{p} fds", f"{s['fds_before']} before, {s['fds_held']} held, {s['fds_end']} end"),
            (f"{p} CPU", f"{s['cpu_connect_s']:.2f} s connecting "
                         f"({s['cpu_per_connection_us']:.1f} us/connection), "
                         f"{s['cpu_window_s']:.2f} s holding"
             + (f" ({s['cpu_per_message_us']:.2f} us per delivered message)"
                if s["cpu_per_message_us"] is not None else "")),
        ]
        if "soak" in s:
            k = s["soak"]
            rows.append((f"{p} soak", f"RSS {_fmt_bytes(k['rss_min'])}..{_fmt_bytes(k['rss_max'])}"
                                      f" (growth {_fmt_bytes(k['rss_growth'])}), fds "
                                      f"{k['fds_min']}..{k['fds_max']}"))
    rows.append(("latency", "not measured by this client" if r["latency"] is None
                 else str(r["latency"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
