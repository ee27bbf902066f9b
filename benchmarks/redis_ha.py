"""What a highly-available Redis costs the bus: one server, Sentinel, Cluster.

    python benchmarks/redis_ha.py --repeat 2   # single,sentinel,cluster; --publishes 200 ...

With Sentinel and Cluster a publish is the publish script then ``WAIT 1`` on
the same connection (``WSGI_HIJACK_REDIS_MIN_REPLICAS``, default 1 there): it
returns once a replica has the message, so a failover keeps what was
acknowledged, and every publish pays for it. On a Cluster the script runs on
the channel's shard (the master owning the slot of ``{channel}``) and
publishes with ``SPUBLISH``: the message travels to that shard only. Per mode
(a fresh topology per run; ``--repeat`` alternates the order):

1. **publish cost**: this process builds its bus as a worker does
   (``bus.process.make_bus``: :class:`~wsgi_hijack.redis_bus.RedisBus` on one
   server or Sentinel, :class:`~wsgi_hijack.redis_cluster_bus.RedisClusterBus`
   on a Cluster; no gevent patching) and publishes ``--publishes`` messages
   of ``--size`` bytes back to back on one channel: wall µs per publish (p50,
   p99, mean), its CPU µs per publish (``process_time``), publishes/s, the
   primaries' and replicas' CPU (``INFO cpu``, commandstats), and on a
   Cluster which shard holds the channel and the cluster-bus messages each
   node sent and received meanwhile. Then ``WAIT`` or not on the same bus
   and topology: ``--publishes`` as configured and as many with
   ``min_replicas`` 0, in alternating blocks (ABBA), wall µs of each (on one
   server, which has no ``WAIT``, both are the same: their difference is the
   noise of this comparison).
2. **publish-to-receive**: the demo under gunicorn (2 workers) on the mode's
   URL, ``--clients`` SSE clients (``scale_redis.Clients``: histograms of
   receive - publish time per message id), ``--messages`` ``POST /publish``
   at ``--rate``/s on one channel (on a Cluster: one shard), each body
   ``time.monotonic()`` before the POST padded to ``--size``: p50/p99/max
   over every (client, message), deliveries received against expected, the
   POST's round trip. The same load in every mode.

Figures are also given as ratios to ``single`` of the same invocation. Every
data node gets one ``--appendfsync`` (default ``everysec``): the harness
starts a lone server with ``always``, the topologies with ``everysec``, and an
fsync per write must not pass for the price (or the saving) of HA.

A mode is an entry of :data:`MODES`: a name and a function that starts the
topology in a directory and returns ``(url, stop)``; one whose URL the bus
refuses (``ValueError``) is reported "not supported".
Writes ``results.json``, ``README.md``, ``redis_ha.png`` and ``logs/`` into
``--out``; progress to stderr (``--progress 0``: none). Exit 0 when every
supported mode delivered every message.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO)]  # run as a file: benchmarks/ and this tree

import redis_ha_report as report  # noqa: E402
from scale_redis import CHANNEL, Clients, hist_stats, merge_hists  # noqa: E402
from storm import sources_for  # noqa: E402

from harness import servers, wire  # noqa: E402
from harness.redis_topology import ClusterSet, SentinelSet, command, info, parse_nodes  # noqa: E402
from wsgi_hijack import redis_connect  # noqa: E402
from wsgi_hijack.bus.base import Bus  # noqa: E402
from wsgi_hijack.bus.process import make_bus  # noqa: E402

COST_CHANNEL = "redis-ha-cost"
WARMUP = 100  # unmeasured publishes first: the script loaded, the connection made
AB_BLOCK = 100  # publishes per block, with and without WAIT in turn
_T0 = time.monotonic()
_progress = True
Stop = Callable[[], None]


def log(msg: str) -> None:
    if _progress:
        print(f"[redis_ha {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- the modes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    name: str
    start: Callable[[Path], tuple[str, Stop]]  # topology in this dir -> (url, stop)
    what: str  # for the README
    env: dict[str, str] = field(default_factory=dict)  # for the bus, here and in gunicorn


def _up(topology: servers.RedisServer | SentinelSet | ClusterSet) -> tuple[str, Stop]:
    """A started topology's (url, stop)."""
    if isinstance(topology, servers.RedisServer):
        return topology.url, topology.kill
    return topology.url(), topology.stop


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("single", lambda d: _up(servers.RedisServer(d)), "one redis-server"),
    Mode("sentinel", lambda d: _up(SentinelSet(d)),
         "primary + 2 replicas + 3 sentinels; publish, then WAIT 1"),
    Mode("sentinel-nowait", lambda d: _up(SentinelSet(d)),
         "the same Sentinel set with MIN_REPLICAS=0 (no WAIT)",
         {"WSGI_HIJACK_REDIS_MIN_REPLICAS": "0"}),
    Mode("cluster", lambda d: _up(ClusterSet(d, masters=3, replicas_per_master=1)),
         "3 masters + 3 replicas (redis+cluster://); publish (SPUBLISH) on the channel's "
         "shard, then WAIT 1"),
)}


def data_nodes(url: str) -> tuple[list[int], list[int]]:
    """(primary ports, replica ports) behind ``url``, asked of the topology now
    (on loopback): a new mode needs no code of its own here."""
    target = redis_connect.parse(url)
    if target.kind == "single":
        return [urlsplit(url).port or 6379], []
    seed = target.nodes[0][1]
    if target.kind == "sentinel":
        primary = int(command(seed, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", target.service)[1])
        replicas = command(seed, "SENTINEL", "REPLICAS", target.service)
        return [primary], sorted(int(dict(zip(r[::2], r[1::2], strict=True))["port"])
                                 for r in replicas)
    nodes = parse_nodes(command(seed, "CLUSTER", "NODES"))
    return (sorted(n["port"] for n in nodes if "master" in n["flags"] and n["slots"]),
            sorted(n["port"] for n in nodes if "slave" in n["flags"]))


def cluster_shard(url: str, channel: str) -> dict | None:
    """On a Cluster, the shard that holds ``channel`` (the slot of its hash
    tag ``{channel}``, as the bus's keys): {slot, master, replicas}; else None."""
    target = redis_connect.parse(url)
    if target.kind != "cluster":
        return None
    seed = target.nodes[0][1]
    slot = int(command(seed, "CLUSTER", "KEYSLOT", "{" + channel + "}"))
    master = next(int(m[1]) for start, end, m, *_ in command(seed, "CLUSTER", "SLOTS")
                  if int(start) <= slot <= int(end))
    nodes = parse_nodes(command(seed, "CLUSTER", "NODES"))
    master_id = next(n["id"] for n in nodes if n["port"] == master)
    return {"slot": slot, "master": master,
            "replicas": sorted(n["port"] for n in nodes if n["master"] == master_id)}


def cluster_messages(port: int) -> tuple[int, int]:
    """Cluster-bus messages (sent, received) by this node so far."""
    stats = dict(line.split(":", 1) for line in command(port, "CLUSTER", "INFO").splitlines()
                 if ":" in line)
    return (int(stats["cluster_stats_messages_sent"]),
            int(stats["cluster_stats_messages_received"]))


def redis_cpu(port: int) -> float:
    cpu = info(port, "cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def commandstats(ports: list[int]) -> dict[str, dict[str, int]]:
    """``INFO commandstats`` summed over ``ports``: {command: {calls, usec}}."""
    out: dict[str, dict[str, int]] = {}
    for port in ports:
        for name, value in info(port, "commandstats").items():
            fields = dict(kv.split("=", 1) for kv in value.split(","))
            mine = out.setdefault(name.removeprefix("cmdstat_"), {"calls": 0, "usec": 0})
            mine["calls"] += int(fields["calls"])
            mine["usec"] += int(fields["usec"])
    return out


# -- 1. publish cost, from this process ------------------------------------------------------

def timed_publishes(bus: Bus, n: int, payload: str) -> list[float]:
    """Wall µs of each of ``n`` publishes back to back."""
    walls = [0.0] * n
    clock = time.perf_counter
    for i in range(n):
        start = clock()
        bus.publish(COST_CHANNEL, payload)
        walls[i] = (clock() - start) * 1e6
    return walls


def wait_ab(bus: Bus, n: int, payload: str, block: int = AB_BLOCK) -> tuple[list, list]:
    """Wall µs of ``n`` publishes as configured (with ``WAIT`` where
    ``min_replicas`` > 0) and ``n`` with ``min_replicas`` 0, in alternating
    blocks ABBA ABBA ... On one server both are the same: their difference is
    the noise of the comparison."""
    configured = bus.min_replicas  # type: ignore[attr-defined]
    out: tuple[list, list] = ([], [])
    try:
        for i in range(2 * math.ceil(n / block)):
            nowait = i % 4 in (1, 2)
            bus.min_replicas = 0 if nowait else configured  # type: ignore[attr-defined]
            out[nowait].extend(timed_publishes(bus, min(block, n - len(out[nowait])), payload))
    finally:
        bus.min_replicas = configured  # type: ignore[attr-defined]
    return out


def publish_cost(bus: Bus, url: str, n: int, size: int) -> dict:
    """``n`` publishes back to back through ``bus``, built as a worker builds it;
    then ``n`` more on the same bus without ``WAIT``."""
    payload = "x" * size
    for _ in range(WARMUP):
        bus.publish(COST_CHANNEL, payload)
    primaries, replicas = data_nodes(url)
    nodes = primaries + replicas
    shard = cluster_shard(url, COST_CHANNEL)
    for port in primaries:
        command(port, "CONFIG", "RESETSTAT")
    cpu_before = {p: redis_cpu(p) for p in nodes}
    bus_before = {p: cluster_messages(p) for p in nodes} if shard else {}
    cpu0, t0 = time.process_time(), time.perf_counter()
    walls = timed_publishes(bus, n, payload)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    used = {p: (redis_cpu(p) - cpu_before[p]) * 1e6 / n for p in nodes}
    stats = commandstats(primaries)
    record = {"publishes": n, "size": size, "min_replicas": getattr(bus, "min_replicas", None),
              "bus": type(bus).__name__,
              "publish_p50_us": round(report.pct(walls, 0.50), 1),
              "publish_p99_us": round(report.pct(walls, 0.99), 1),
              "publish_mean_us": round(statistics.fmean(walls), 1),
              "publish_max_us": round(max(walls), 1),
              "cpu_us_per_publish": round(cpu * 1e6 / n, 1),
              "publishes_per_s": round(n / elapsed, 1),
              "redis_primary_cpu_us_per_publish": round(sum(used[p] for p in primaries), 1),
              "redis_replica_cpu_us_per_publish":
                  round(sum(used[p] for p in replicas), 1) if replicas else None,
              "redis_cpu_us_per_publish_by_node": {p: round(used[p], 1) for p in nodes},
              "primaries": primaries, "replicas": replicas, "shard": shard,
              "commandstats": stats}
    if shard:  # per node: cluster-bus messages sent, received per publish
        record["cluster_bus_per_publish"] = {
            p: [round((after - before) / n, 2) for before, after in
                zip(bus_before[p], cluster_messages(p), strict=True)] for p in nodes}
    # WAIT or not, on the same connection and topology: n publishes each, in
    # blocks in the order ABBA (a drift over time weighs on both alike).
    waited, plain = wait_ab(bus, n, payload)
    bus.close()
    record.update(ab_p50_us=round(report.pct(waited, 0.50), 1),
                  nowait_p50_us=round(report.pct(plain, 0.50), 1),
                  nowait_p99_us=round(report.pct(plain, 0.99), 1),
                  nowait_mean_us=round(statistics.fmean(plain), 1))
    record["wait_p50_us"] = round(record["ab_p50_us"] - record["nowait_p50_us"], 1)
    return record


# -- 2. publish-to-receive latency through gunicorn -----------------------------------------

def post(port: int, body: bytes) -> tuple[int | str, int | None]:
    """``POST /publish`` on a new connection: (status or error, message id)."""
    conn = http.client.HTTPConnection(wire.HOST, port, timeout=30)
    try:
        conn.request("POST", f"/publish?channel={CHANNEL}", body=body)
        resp = conn.getresponse()
        answer = resp.read()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}", None
    finally:
        conn.close()
    return resp.status, (json.loads(answer)["id"] if resp.status == 202 else None)


def publish_paced(port: int, clients: Clients, messages: int, rate: float,
                  size: int) -> list[dict]:
    """One POST every 1/rate s on a fixed schedule (a late one goes at once),
    reading the clients' reports in between."""
    records = []
    start = time.monotonic()
    for i in range(messages):
        while (left := start + i / rate - time.monotonic()) > 0:
            clients.pump(left)
        sent = time.monotonic()
        status, mid = post(port, repr(sent).ljust(size).encode())
        records.append({"late_ms": (sent - start - i / rate) * 1000, "status": status,
                        "rtt_ms": (time.monotonic() - sent) * 1000, "id": mid})
    return records


def publish_latency(mode: Mode, url: str, args: argparse.Namespace, run: int,
                    workdir: Path) -> dict:
    env = {"WSGI_HIJACK_REDIS_URL": url, "WSGI_HIJACK_LOG_LEVEL": "WARNING", **mode.env}
    server = servers.start("gunicorn", workdir, app="wsgi_hijack:app", args=("--workers", "2"),
                           env=env, heartbeat=30, ready=servers.workers_ready(2),
                           raise_fd_limit=True, timeout=60, stop_timeout=30)
    clients: Clients | None = None
    n, procs = args.clients, max(1, min(args.client_processes, args.clients))
    try:
        sources = sources_for(run, procs, args.source_block)
        log(f"{mode.name}: gunicorn :{server.port}, {n} SSE clients from {', '.join(sources)}")
        clients = Clients(server.port, n, per_process=math.ceil(n / procs),
                          source_addresses=",".join(sources), name=f"{mode.name} clients")
        clients.wait_ready(args.connect_timeout, progress=args.progress or math.inf)
        if clients.total("held") != n:
            raise RuntimeError(f"only {clients.total('held')} of {n} held: {clients.status()}")
        settle = time.monotonic() + 1.0  # every worker's subscription confirmed by Redis
        while time.monotonic() < settle:
            clients.pump(0.1)
        log(f"{mode.name}: {n} held; {args.messages} publishes at {args.rate:g}/s")
        records = publish_paced(server.port, clients, args.messages, args.rate, args.size)
        ids = [r["id"] for r in records if r["id"] is not None]
        deadline = time.monotonic() + args.drain
        while clients.total("messages") < n * len(ids) and time.monotonic() < deadline:
            clients.pump(0.2)
        finals = clients.stop()
    finally:
        if clients is not None:
            clients.kill()
        server.stop()
        (args.out / "logs").mkdir(parents=True, exist_ok=True)
        shutil.copy(server.log_path, args.out / "logs" / f"run{run}-{mode.name}-gunicorn.log")
    lat = hist_stats(merge_hists([f["hist"].get(str(i), {}) for f in finals for i in ids]))
    rtts = [r["rtt_ms"] for r in records]
    # Per connection: [first, last, received, gaps, dups, ...]. Not its gaps: ids
    # come from a clock-floored counter, so consecutive ones are rarely id + 1.
    dups = sum(c[4] for f in finals for c in f["chains"])
    return {"clients": n, "client_processes": len(finals), "messages": args.messages,
            "shard": cluster_shard(url, CHANNEL),
            "rate": args.rate, "accepted": len(ids),
            "refused": [r["status"] for r in records if r["id"] is None],
            "deliveries_expected": n * len(ids), "deliveries_received": lat["received"],
            "duplicates": dups,
            "all_received": (lat["received"] == n * len(ids) and not dups
                             and len(ids) == args.messages),
            "latency_p50_ms": lat["p50_ms"], "latency_p99_ms": lat["p99_ms"],
            "latency_max_ms": lat["max_ms"], "post_p50_ms": round(report.pct(rtts, 0.5), 2),
            "post_p99_ms": round(report.pct(rtts, 0.99), 2),
            "publish_late_max_ms": round(max(r["late_ms"] for r in records), 1)}


# -- one run of one mode, and the whole invocation -------------------------------------------

def one_run(mode: Mode, args: argparse.Namespace, run: int, workdir: Path) -> dict:
    record: dict = {"mode": mode.name, "run": run, "loadavg_before": os.getloadavg()[0]}
    rundir = workdir / f"run{run}-{mode.name}"
    rundir.mkdir()
    log(f"run {run} {mode.name}: starting {mode.what}")
    t = time.monotonic()
    url, stop = mode.start(rundir)
    try:
        record.update(url=url, topology_start_s=round(time.monotonic() - t, 1))
        nodes = [p for ports in data_nodes(url) for p in ports]
        if args.appendfsync != "as-started":
            for port in nodes:
                command(port, "CONFIG", "SET", "appendfsync", args.appendfsync)
        record["appendfsync"] = {p: command(p, "CONFIG", "GET", "appendfsync")[1] for p in nodes}
        try:  # as a worker makes its bus: from the environment
            with mock.patch.dict(os.environ, {"WSGI_HIJACK_REDIS_URL": url, **mode.env}):
                bus = make_bus()
        except ValueError as exc:  # the bus refuses this URL
            log(f"run {run} {mode.name}: not supported by the bus: {exc}")
            return {**record, "supported": False, "reason": str(exc)}
        record["supported"] = True
        record["cost"] = c = publish_cost(bus, url, args.publishes, args.size)
        log(f"run {run} {mode.name}: publish p50 {c['publish_p50_us']} p99 {c['publish_p99_us']}"
            f" µs, CPU {c['cpu_us_per_publish']} µs, {c['publishes_per_s']:.0f}/s "
            f"(min_replicas {c['min_replicas']}); without WAIT p50 {c['nowait_p50_us']} µs")
        record["latency"] = x = publish_latency(mode, url, args, run, rundir)
        log(f"run {run} {mode.name}: latency p50 {x['latency_p50_ms']} p99 {x['latency_p99_ms']}"
            f" max {x['latency_max_ms']} ms, received {x['deliveries_received']}/"
            f"{x['deliveries_expected']}, POST p50 {x['post_p50_ms']} ms")
    finally:
        stop()
        record["loadavg_after"] = os.getloadavg()[0]
    return record


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="single,sentinel,cluster", help=f"of {', '.join(MODES)}")
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode, alternating")
    ap.add_argument("--publishes", type=int, default=5000, help="publish cost: messages")
    ap.add_argument("--size", type=int, default=100, help="bytes of data per message")
    ap.add_argument("--clients", type=int, default=1000, help="latency: SSE clients")
    ap.add_argument("--client-processes", type=int, default=2)
    ap.add_argument("--messages", type=int, default=200, help="latency: publishes")
    ap.add_argument("--rate", type=float, default=20.0, help="latency: publishes per second")
    ap.add_argument("--appendfsync", default="everysec",
                    choices=("everysec", "always", "no", "as-started"),
                    help="set on every data node before measuring")
    ap.add_argument("--connect-timeout", type=float, default=120.0)
    ap.add_argument("--drain", type=float, default=30.0, help="s to wait for the last receipts")
    ap.add_argument("--source-block", type=int, default=random.randrange(1, 200),
                    help="clients bind to 127.0.B.x, B from here on (default random)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "redis_ha")
    ap.add_argument("--progress", type=float, default=5.0,
                    help="s between client progress lines; 0: no progress lines at all")
    args = ap.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        ap.error(f"--modes: {args.modes}; known: {', '.join(MODES)}")
    if min(args.publishes, args.clients, args.messages, args.repeat, args.size,
           args.rate) <= 0:
        ap.error("--publishes, --clients, --messages, --repeat, --size, --rate must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    global _progress
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    _progress = args.progress > 0
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / "logs", ignore_errors=True)
    meta = report.meta(argv, args, {m: MODES[m].what for m in args.modes}, REPO)
    runs: list[dict] = []
    workdir = Path(tempfile.mkdtemp(prefix="redis_ha-"))
    try:
        for r in range(args.repeat):  # AB AB ..., then BA BA: neither always goes first
            for name in args.modes if r % 2 == 0 else args.modes[::-1]:
                run = len(runs) + 1
                try:
                    runs.append(one_run(MODES[name], args, run, workdir))
                except Exception as exc:  # a failed run leaves the others' figures
                    log(f"run {run} {name}: FAILED: {type(exc).__name__}: {exc}")
                    runs.append({"mode": name, "run": run, "supported": True,
                                 "error": f"{type(exc).__name__}: {exc}"})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["machine"]["loadavg_end"] = os.getloadavg()[0]
    ok = report.write(args.out, meta, runs, report.summarise(runs, args.modes))
    log(f"wrote {args.out}: results.json, README.md, redis_ha.png; "
        f"{'ok' if ok else 'FAILED (see results.json)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
