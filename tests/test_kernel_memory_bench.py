"""benchmarks/kernel_memory.py at a small N, so that it keeps working; figures come from full runs.

Every server, idle, flowing and stalled, and the clients against the plain
holder: the JSON lines and ``summary.json`` it writes have a row for each,
and the figures add up (total = RSS + kernel, kernel = slab + buffers; the
clients' ends and a bare server end make a pair). The parsers of
``/proc/slabinfo`` and ``/proc/net/sockstat`` are checked on fixed text.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from harness.servers import ROOT, run_benchmark

sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_memory_probe as probe  # noqa: E402

N = 300
RATE = 10.0
KINDS = ("hijack-sse", "hijack-ws", "greenlet-sse", "seed-puma")
SLABINFO = """slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables ...
TCP       91    143   2368   13    8 : tunables    0    0    0 : slabdata     11     11      0
filp     909    924    192   21    1 : tunables    0    0    0 : slabdata     44     44      0
"""
SOCKSTAT = """sockets: used 18
TCP: inuse 7 orphan 0 tw 3323 alloc 7 mem 85
UDP: inuse 0 mem 0
"""


def approx(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


@pytest.mark.unit
def test_probe_reads_slabinfo_and_sockstat_and_subtracts(tmp_path):
    (tmp_path / "slabinfo").write_text(SLABINFO)
    (tmp_path / "sockstat").write_text(SOCKSTAT)
    slab = probe.read_slabinfo(str(tmp_path / "slabinfo"))
    assert slab == {"TCP": [91, 2368], "filp": [909, 192]}
    stat = probe.read_sockstat(str(tmp_path / "sockstat"))
    assert stat == {"sockets_used": 18, "tcp_inuse": 7, "tcp_orphan": 0, "tcp_tw": 3323,
                    "tcp_alloc": 7, "tcp_mem": 85}
    before = {"slab": slab, "sockstat": stat, "meminfo": {"Slab": 100}}
    after = {"slab": {"TCP": [291, 2368], "filp": [909, 192]},
             "sockstat": dict(stat, tcp_inuse=207, tcp_mem=86), "meminfo": {"Slab": 600}}
    d = probe.delta(before, after)
    assert d["slab"] == {"TCP": {"objs": 200, "objsize": 2368, "bytes": 200 * 2368}}
    assert d["sockstat"]["tcp_inuse"] == 200 and d["sockstat"]["tcp_mem"] == 1
    assert d["meminfo"] == {"Slab": 500 * 1024}


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/slabinfo", os.R_OK), reason="/proc/slabinfo needs root")
def test_kernel_memory_small_run(tmp_path):
    out = tmp_path / "capacity"
    proc = run_benchmark("kernel_memory.py", "--connections", str(N), "--flowing", str(RATE),
                         "--flowing-seconds", "4", "--stall-seconds", "8", "--stall-min", "4",
                         "--sample-every", "2", "--heartbeat", "2", "--progress", "5",
                         "--out", str(out), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[kernel_memory" in proc.stderr  # progress lines while it runs

    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert runs[0]["kind"] == "meta" and len(runs[0]["tcp_mem"]) == 3
    assert [(r["kind"], tuple(r.get("states", ()))) for r in runs[1:]] == [
        ("clients", ()),
        ("hijack-sse", ("idle", "flowing", "stalled")),
        ("hijack-ws", ("idle", "flowing", "stalled")),
        ("greenlet-sse", ("idle",)), ("greenlet-sse", ("flowing", "stalled")),
        ("seed-puma", ("idle",)), ("seed-puma", ("flowing", "stalled"))]
    for r in runs[2:]:
        assert r["counts"]["held"] == N and r["counts"]["failed"] == 0, r["kind"]

    summary = json.loads((out / "summary.json").read_text())
    c = summary["clients"]
    assert c["n"] == N and 1.9 <= c["pair_inuse"] <= 2.1  # two sockets per connection
    assert c["client"] > 0 and c["bare_server"] > 0
    assert approx(c["pair"], c["client"] + c["bare_server"])
    assert 1.5 <= c["caches"]["TCP"]["objs"] <= 2.5  # one TCP socket at each end

    rows = {(r["kind"], r["state"]): r for r in summary["rows"]}
    assert set(rows) == {(k, s) for k in KINDS for s in ("idle", "flowing", "stalled")}
    for (kind, state), r in rows.items():
        assert r["held"] == N, (kind, state)
        assert r["slab"] > 0 and r["buffers"] >= 0 and r["kernel"] > 0, (kind, state, r)
        assert approx(r["kernel"], r["slab"] + r["buffers"]), (kind, state)
        assert approx(r["total"], r["rss"] + r["kernel"]), (kind, state)
        seed = rows[("seed-puma", state)]
        assert approx(r["x_seed"], r["total"] / seed["total"]), (kind, state)
    for kind in KINDS:
        cpu = rows[(kind, "flowing")]["cpu"]
        # Messages reached the clients while flowing (the seed's 1/rate sleep
        # comes on top of its write run, so it delivers a little less).
        assert cpu["delivered"] / cpu["seconds"] / N > RATE / 2, (kind, cpu)
        assert cpu["cpu_per_message_us"] > 0, kind
    assert rows[("seed-puma", "idle")]["x_seed"] == 1.0

    md = (out / "results.md").read_text()
    assert "| server | state | held | messages/s per connection received | RSS | kernel slab |" \
        in md
    for kind in KINDS:
        assert f"| {kind} | idle | {N:,} |" in md, kind
    for heading in ("## The clients' ends, and a bare server end", "## Stalled: the worst case",
                    "## Flowing: server CPU per delivered message",
                    "## The slab caches that grew with connections (idle)"):
        assert heading in md, heading
