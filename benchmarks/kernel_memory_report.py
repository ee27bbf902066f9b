"""The figures of ``benchmarks/kernel_memory.py`` and its ``results.md``.

Per connection, for the server's end (every figure divided by the
connections the server held at that moment, counted with ``ss`` by the
clients' addresses):

- **RSS**: the server process's RSS growth since before the connections;
- **kernel, slab**: the slab caches that grew in proportion to connections
  (the same growth per connection, within 20 % or 0.02 objects, at N/2 and
  at N), less the clients' share of each (measured in the ``clients`` run);
  taken idle, since these objects (socket, inode, file, dentry, epoll
  item...) do not change as data flows. Caches that hold socket buffers
  (``skbuff_*``, merged or not) and ``tw_sock_TCP`` are left out: buffers
  are the next figure;
- **kernel, buffers**: the charges of the server's ends (``ss`` skmem
  ``r + w + f``: receive queue, send queue, forward allocation), what
  ``/proc/net/sockstat``'s TCP ``mem`` counts, socket by socket;
- **kernel** = slab + buffers; **total** = RSS + kernel; **x seed**: total
  over the seed's in the same state.

Flowing: the mean over the samples; stalled: the sample where the server's
RSS and buffers were largest.

Left out of every slab figure: what lookups of ``/proc/PID/fd/N`` make (a
proc inode, its dentry and its LSM blob per socket fd, both ends, kept as
reclaimable cache). On this host an agent outside the project (the
machine's own init, which maps sockets to processes) looks up every socket
fd of every process within seconds -- a process that held 1,000 socket
pairs and read nothing from /proc had 1,906 more proc inodes and as many
more dentries 5 s later -- so that is the host's cost, not the servers'
(:func:`without_proc_lookups`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ORDER = ("seed-puma", "hijack-sse", "hijack-ws", "greenlet-sse")
STATES = ("idle", "flowing", "stalled")
LEFT_OUT = ("tw_sock_TCP",)
# Made by looking up /proc/PID/fd/N, not by holding a connection (see the module).
PROC_LOOKUP = "proc_inode_cache"
PROC_LOOKUP_PAIRED = ("dentry", "lsm_inode_cache")


def without_proc_lookups(slab: dict[str, dict]) -> dict[str, dict]:
    """A delta's caches less what lookups of ``/proc/PID/fd/N`` made: every
    ``proc_inode_cache`` object, and as many ``dentry`` and ``lsm_inode_cache``
    objects (each such inode comes with its dentry and its LSM blob)."""
    out = {k: dict(v) for k, v in slab.items() if k != PROC_LOOKUP}
    lookups = slab.get(PROC_LOOKUP, {}).get("objs", 0)
    for name in PROC_LOOKUP_PAIRED:
        if lookups and name in out:
            c = out[name]
            c["objs"] -= lookups
            c["bytes"] = c["objs"] * c["objsize"]
    return out


def _corrected(runs: list[dict]) -> list[dict]:
    """``runs`` with :func:`without_proc_lookups` applied to every delta."""
    runs = json.loads(json.dumps(runs))
    for rec in runs:
        for key in ("half", "pair", "alone"):
            if key in rec:
                rec[key]["slab"] = without_proc_lookups(rec[key]["slab"])
        for samples in rec.get("samples", {}).values():
            for d in samples:
                d["slab"] = without_proc_lookups(d["slab"])
    return runs


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def held(d: dict, sources: list[list[str]]) -> int:
    """Connections the server held in a delta: its ends whose peer is a client address."""
    addrs = [a for group in sources for a in group]
    now = d["sockets"]["server_peers"]
    before = (d.get("sockets_before") or {}).get("server_peers", {})
    return sum(now.get(a, 0) - before.get(a, 0) for a in addrs)


def skb_caches(meta: dict) -> set[str]:
    aliases = meta.get("slab_aliases", {})
    return {name for name, group in aliases.items()
            if any(m.startswith("skbuff_") for m in group)} | {
        "skbuff_head_cache", "skbuff_small_head", "skbuff_fclone_cache"}


def proportional(half: dict, full: dict, n_half: int, n_full: int) -> dict[str, dict]:
    """Caches that grew by 0.02 objects per connection or more, the same (within
    20 %, or 0.02 objects) at N/2 and at N: {name: per connection}."""
    out = {}
    for name, c in full["slab"].items():
        if name in LEFT_OUT:
            continue
        per = c["objs"] / n_full
        per_half = half["slab"].get(name, {"objs": 0})["objs"] / max(1, n_half)
        if abs(c["bytes"]) / n_full >= 1 and abs(per) >= 0.02 and \
                abs(per - per_half) <= max(0.02, 0.2 * abs(per)):
            out[name] = {"objs": per, "objs_half": per_half, "objsize": c["objsize"],
                         "bytes": c["bytes"] / n_full}
    return out


def clients_figures(rec: dict, skb: set[str]) -> dict:
    n = held(rec["pair"], rec["sources"])
    n_half = held(rec["half"], rec["sources"][:1])
    prop = proportional(rec["half"], rec["pair"], n_half, n)
    alone = {name: {"objs": c["objs"] / n, "bytes": c["bytes"] / n, "objsize": c["objsize"]}
             for name, c in rec["alone"]["slab"].items() if name in prop}
    bare = {name: prop[name]["bytes"] - alone.get(name, {"bytes": 0})["bytes"] for name in prop}
    return {"n": n, "caches": prop, "alone": alone,
            "pair": sum(c["bytes"] for k, c in prop.items() if k not in skb),
            "client": sum(c["bytes"] for k, c in alone.items() if k not in skb),
            "bare_server": sum(v for k, v in bare.items() if k not in skb),
            "pair_sockstat": rec["pair"]["sockstat"].get("tcp_mem", 0),
            "pair_inuse": rec["pair"]["sockstat"].get("tcp_inuse", 0) / n}


def _point(d: dict, rec: dict, page: int) -> dict:
    """Per-connection figures of one sample (both ends and the server's buffers)."""
    n = held(d, rec["sources"])
    if n <= 0:
        return {"held": n}
    side = d["sockets"]["server"]
    return {
        "held": n, "rss": d["proc"]["rss"] / n,
        "buffers": side["charged"] / n,
        "client_buffers": d["sockets"]["client"]["charged"] / n,
        "sndbuf": side["tb"] / max(1, side["sockets"]),
        "slab_all": sum(c["bytes"] for k, c in d["slab"].items() if k not in LEFT_OUT) / n,
        "sockstat_mem": d["sockstat"].get("tcp_mem", 0) * page / n,
        "sockstat_pages": d["sockstat"].get("tcp_mem", 0),
        "meminfo_slab": d["meminfo"].get("Slab", 0) / n,
        "meminfo_sunreclaim": d["meminfo"].get("SUnreclaim", 0) / n,
        "clients": d.get("clients"), "t": d.get("t"), "stop": d.get("stop"),
        "tcp_mem_pages": d.get("tcp_mem_pages"), "orphans": d["sockstat"].get("tcp_orphan", 0),
    }


def _mean(points: list[dict]) -> dict:
    out = dict(points[-1])
    for key in ("held", "rss", "buffers", "client_buffers", "sndbuf", "slab_all",
                "sockstat_mem", "meminfo_slab", "meminfo_sunreclaim"):
        out[key] = statistics.fmean(p[key] for p in points)
    return out


def figures(runs: list[dict]) -> dict:
    """{"clients": ..., "rows": [{kind, state, held, rss, slab, buffers, kernel, total, ...}]}"""
    runs = _corrected(runs)
    meta = runs[0]
    page = meta.get("page", 4096)
    skb = skb_caches(meta)
    clients = next((clients_figures(r, skb) for r in runs if r.get("kind") == "clients"), None)
    client_share = {k: c["bytes"] for k, c in (clients or {"alone": {}})["alone"].items()}
    rows, structural, caches = [], {}, {}
    for rec in runs:
        if rec.get("kind") in ("meta", "clients") or "samples" not in rec:
            continue
        kind = rec["kind"]
        first = rec["samples"].get("idle") or rec["samples"].get("connected")
        n, n_half = held(first[0], rec["sources"]), held(rec["half"], rec["sources"][:1])
        prop = proportional(rec["half"], first[0], n_half, n)
        if "idle" in rec["samples"] or kind not in structural:
            structural[kind] = sum(c["bytes"] - client_share.get(k, 0)
                                   for k, c in prop.items() if k not in skb)
            caches[kind] = prop
        for state in STATES:
            samples = rec["samples"].get(state)
            if not samples:
                continue
            points = [p for p in (_point(d, rec, page) for d in samples) if p["held"] > 0]
            if not points:
                continue
            if state == "stalled":
                point = max(points, key=lambda p: (p["rss"] + p["buffers"] + p["client_buffers"])
                            * p["held"])
                point["stop"] = samples[-1].get("stop")
                point["sndbuf_first"] = points[0]["sndbuf"]
                point["orphans_end"] = samples[-1]["sockstat"].get("tcp_orphan", 0)
                point["tcp_mem_pages_end"] = samples[-1].get("tcp_mem_pages")
            elif state == "flowing":
                point = _mean(points)
                point["cpu"] = rec.get("flowing_cpu")
            else:
                point = points[0]
            point.update(kind=kind, state=state, run=rec["run"],
                         published=rec.get("published"), counts=rec.get("counts"))
            rows.append(point)
    for row in rows:
        row["slab"] = structural.get(row["kind"])
        row["kernel"] = (row["slab"] or 0) + row["buffers"]
        row["total"] = row["rss"] + row["kernel"]
    for row in rows:
        seed = next((r for r in rows if r["kind"] == "seed-puma" and r["state"] == row["state"]),
                    None)
        row["x_seed"] = row["total"] / seed["total"] if seed and seed["total"] else None
    rows.sort(key=lambda r: (ORDER.index(r["kind"]) if r["kind"] in ORDER else 9,
                             STATES.index(r["state"])))
    return {"clients": clients, "rows": rows, "caches": caches, "skb": sorted(skb)}


def one_line(rec: dict, runs: list[dict]) -> str:
    """A summary of the run just done, for the progress output."""
    try:
        fig = figures(runs)
    except Exception as exc:  # a summary line never stops a run
        return f"{rec.get('kind')}: done ({type(exc).__name__}: {exc})"
    if rec.get("kind") == "clients":
        c = fig["clients"]
        return (f"clients: {c['n']:,} held; kernel slab per connection: both ends "
                f"{c['pair']:.0f} B, the client's end {c['client']:.0f} B, a bare server end "
                f"{c['bare_server']:.0f} B")
    parts = [f"{r['state']}: RSS {r['rss']:.0f} + kernel {r['kernel']:.0f} "
             f"(slab {r['slab'] or 0:.0f}, buffers {r['buffers']:.0f}) = {r['total']:.0f} B"
             for r in fig["rows"] if r["kind"] == rec["kind"] and r["run"] == rec["run"]]
    return f"{rec['kind']}: " + "; ".join(parts) + " per connection"


def markdown(runs: list[dict], fig: dict) -> str:
    meta = runs[0]
    a = meta["args"]
    c = fig["clients"]
    n = a["connections"]
    lines = [
        f"# Memory per connection at {n:,} connections: server RSS and kernel",
        "",
        f"Run {meta['date']} on {meta['machine']}; commit {meta['commit']}; "
        f"`{meta['command']}`. One worker per server; every figure from this run. Idle: "
        f"heartbeats every {a['heartbeat']:g} s (the seed's fixed 3 s). Flowing: "
        f"{a['flowing']:g} messages/s of {a['size']} bytes to every connection, clients "
        f"reading (mean of {a['flowing_seconds']:g} s of samples). Stalled: the same "
        "messages, the clients no longer reading (the worst sample).",
        "",
        "Definitions: `benchmarks/kernel_memory_report.py`'s docstring. In short: RSS is the "
        "server process's growth; kernel slab is the slab caches that grew in proportion to "
        "connections, less the clients' share measured against a plain holder; kernel "
        "buffers are the server ends' socket-buffer charges (`ss -tm`, what sockstat's TCP "
        "`mem` counts). All per held connection, in bytes. Left out of every slab figure: "
        "the proc inodes, dentries and LSM blobs that an agent of this host (not the "
        "project) makes by looking up every socket fd in `/proc/PID/fd` (696 + 192 + 32 = "
        "920 bytes per socket; the meminfo columns still hold them).",
        "",
        "## Per connection, the server's end",
        "",
        "| server | state | held | messages/s per connection received | RSS | kernel slab | "
        "kernel buffers | kernel | total | x seed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fig["rows"]:
        rate = None
        cpu = r.get("cpu")
        if cpu and cpu.get("seconds"):
            rate = cpu["delivered"] / cpu["seconds"] / r["held"]
        lines.append(
            f"| {r['kind']} | {r['state']} | {r['held']:,.0f} | {_fmt(rate, '.2f')} | "
            f"{r['rss']:,.0f} | {_fmt(r['slab'])} | {r['buffers']:,.0f} | {r['kernel']:,.0f} | "
            f"**{r['total']:,.0f}** | {_fmt(r['x_seed'], '.2f')} |")
    if c:
        lines += [
            "", "## The clients' ends, and a bare server end", "",
            f"Against the plain holder ({c['n']:,} connections; accepts, answers, holds each "
            "in one epoll set). The clients' ends alone: measured after the holder closed its "
            "ends while the clients kept theirs; a bare server end: the pair less that.", "",
            "| slab per connection | bytes |", "|---|---|",
            f"| both ends (client + bare server end) | {c['pair']:,.0f} |",
            f"| the client's end alone | {c['client']:,.0f} |",
            f"| a bare server end, held in epoll (the kernel floor of any server) | "
            f"{c['bare_server']:,.0f} |",
            f"| TCP sockets in use per connection (sockstat) | {c['pair_inuse']:.2f} |",
        ]
    lines += ["", "## Both ends, as the host's counters saw them (per connection)", "",
              "| server | state | slab, every cache | sockstat TCP mem | meminfo Slab | "
              "meminfo SUnreclaim | client ends' buffers |", "|---|---|---|---|---|---|---|"]
    for r in fig["rows"]:
        lines.append(f"| {r['kind']} | {r['state']} | {r['slab_all']:,.0f} | "
                     f"{r['sockstat_mem']:,.0f} | {r['meminfo_slab']:,.0f} | "
                     f"{r['meminfo_sunreclaim']:,.0f} | {r['client_buffers']:,.0f} |")
    lines += _cpu_section(fig) + _stall_section(fig, meta) + _cache_section(fig, meta)
    lines += ["", "Raw figures: `runs.jsonl` (one JSON line per run, every sample's deltas); "
              "computed: `summary.json`.", ""]
    return "\n".join(lines)


def _cpu_section(fig: dict) -> list[str]:
    rows = [r for r in fig["rows"] if r["state"] == "flowing" and r.get("cpu")]
    if not rows:
        return []
    out = ["", "## Flowing: server CPU per delivered message", "",
           "Server process CPU over the flowing window over the messages the clients "
           "received in it (heartbeats, and for ours the POSTs, included in the CPU). The "
           "clients share the 2 cores and read with 4 KiB receive buffers, so writes that "
           "find a full window only queue, and a server that falls behind (the seed sleeps "
           "after each write run, the greenlet baseline runs out of CPU) delivers less than "
           "the rate asked. CPU per write with clients reading every write at once: "
           "`benchmarks/results/results.md`, CPU per delivered heartbeat.", "",
           "| server | window (s) | messages received | per connection per s | "
           "CPU per message (us) | server CPU (cores) |", "|---|---|---|---|---|---|"]
    for r in rows:
        cpu = r["cpu"]
        rate = cpu["delivered"] / cpu["seconds"] / r["held"] if cpu["seconds"] else None
        out.append(f"| {r['kind']} | {cpu['seconds']:.1f} | {cpu['delivered']:,} | "
                   f"{_fmt(rate, '.2f')} | {_fmt(cpu['cpu_per_message_us'], '.2f')} | "
                   f"{_fmt(cpu['cpu_share'], '.2f')} |")
    return out


def _stall_section(fig: dict, meta: dict) -> list[str]:
    rows = [r for r in fig["rows"] if r["state"] == "stalled"]
    if not rows:
        return []
    _, pressure, high = meta["tcp_mem"]
    wmax = meta.get("tcp_wmem", [0, 0, 0])[2]
    a = meta["args"]
    out = ["", "## Stalled: the worst case", "",
           "The clients stopped reading while messages kept coming; the sample with the most "
           "memory (server RSS, both ends' buffers), and why the stall ended. A stalled "
           "client's bytes fill its receive buffer, then the server's send buffer, then the "
           "server process: ours keeps at most `WSGI_HIJACK_MAX_BUFFER` (64 KiB) there and "
           "then drops the client; the greenlet baseline keeps one beat per client, the seed "
           "none (its reactor blocks on the first full socket, and every client stalls). "
           f"Every client socket announced an MSS of {a.get('client_mss') or 'loopback'} "
           f"and had a {a.get('client_rcvbuf') or 'default'}-byte `SO_RCVBUF`: the server "
           "sizes its send buffers as over Ethernet (for loopback's 64 KiB MSS it starts them "
           "at about 4 MiB), and the host's TCP memory goes to the server's ends, not to the "
           "clients' receive buffers (on the clients' machines in a real deployment).", "",
           "The kernel's send buffer is not a fixed size (`tb`: at the stall's first sample / "
           "at its worst): while the host has TCP memory to spare the kernel grows it as the "
           f"server keeps offering data, up to `tcp_wmem`'s maximum ({wmax:,} bytes here; "
           f"congestion control {meta.get('congestion_control', '?')}), and under memory "
           "pressure it shrinks it. So one stalled connection may cost the user-space bound "
           f"plus {wmax:,} bytes, but the host caps every TCP buffer together "
           f"(`net.ipv4.tcp_mem`: pressure at {pressure:,} pages, hard limit {high:,}): "
           "many stalled connections share that. The stall ends at 90 % of the hard limit, at "
           "a plateau, when half the clients are dropped, or after `--stall-seconds`. A "
           "dropped client's server end is closed with its send queue still full: it "
           "lingers as an orphan with that memory until the kernel gives up on it "
           "(`orphans at the end`).", "",
           "| server | after (s) | ended by | held | RSS | server buffers | client buffers | "
           "sockstat TCP mem (pages, host) | `tb` first / worst | orphans at the end "
           "(TCP mem, pages) | bound for one connection: user space + `tcp_wmem` max |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        user = 65536 if r["kind"].startswith("hijack") else a["size"]
        out.append(f"| {r['kind']} | {_fmt(r['t'], '.0f')} | {r.get('stop') or '-'} | "
                   f"{r['held']:,.0f} | {r['rss']:,.0f} | "
                   f"{r['buffers']:,.0f} | {r['client_buffers']:,.0f} | "
                   f"{_fmt(r.get('tcp_mem_pages'))} | {_fmt(r.get('sndbuf_first'))} / "
                   f"{r['sndbuf']:,.0f} | {r.get('orphans_end', 0):,} "
                   f"({_fmt(r.get('tcp_mem_pages_end'))}) | {user + wmax:,.0f} |")
    return out


def _cache_section(fig: dict, meta: dict) -> list[str]:
    aliases = meta.get("slab_aliases", {})
    c = fig["clients"]
    share = c["alone"] if c else {}
    out = ["", "## The slab caches that grew with connections (idle)", "",
           "Objects per connection at N/2 and at N (a cache is listed when both agree); "
           "merged caches are listed under one name (SLUB), with the others beside it. "
           f"Socket-buffer caches, left out of the slab figures: {', '.join(fig['skb'])}.", ""]
    for kind, caches in [("clients (both ends, plain holder)", c["caches"] if c else {}),
                         *fig["caches"].items()]:
        if not caches:
            continue
        out += [f"### {kind}", "", "| cache | merged with | object size | objects/conn at N/2 "
                "| at N | bytes/conn | clients' share (objects/conn) | server's bytes/conn |",
                "|---|---|---|---|---|---|---|---|"]
        for name, cc in sorted(caches.items(), key=lambda kv: -kv[1]["bytes"]):
            mine = share.get(name, {"objs": 0, "bytes": 0})
            others = ", ".join(x for x in aliases.get(name, []) if x != name) or "-"
            server = "-" if kind.startswith("clients") else f"{cc['bytes'] - mine['bytes']:,.0f}"
            if name in fig["skb"]:
                server += " (buffers: left out)"
            out.append(f"| {name} | {others} | {cc['objsize']} | {cc['objs_half']:.2f} | "
                       f"{cc['objs']:.2f} | {cc['bytes']:,.0f} | {mine['objs']:.2f} | {server} |")
        out.append("")
    return out


def write(out: Path, runs: list[dict]) -> str:
    """``results.md`` and ``summary.json`` into ``out``; returns the markdown."""
    fig = figures(runs)
    text = markdown(runs, fig)
    (out / "results.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(fig, indent=1) + "\n")
    return text
