"""benchmarks/storm.py at a small N: every kind, the seed on Puma included,
so that it keeps working; the figures come from the full run
(benchmarks/results/storm.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from harness.servers import ROOT, run_benchmark

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _storm_module():
    spec = importlib.util.spec_from_file_location("storm_bench", ROOT / "benchmarks" / "storm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_small_storm_against_the_seed_writes_table_json_and_plot(tmp_path):
    n = 300
    # A source block of its own: the full run uses 1, 2, ...
    proc = run_benchmark("storm.py", "--n", str(n), "--pairs", "1", "--hold", "1", "--warmup",
                         "5", "--progress", "0", "--source-block", "200", "--out", str(tmp_path),
                         timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[storm" in proc.stderr  # progress on stderr
    data = json.loads((tmp_path / "storm.json").read_text())
    runs = data["runs"]
    assert [r["kind"] for r in runs] == ["ours", "puma", "gthread", "reuseport"]
    for r in runs:
        # 300 at once fit every listen backlog: all are hijacked, none lost.
        assert (r["held"], r["closed_without_answer"], r["failed"]) == (n, 0, 0), r["kind"]
        assert r["time_to_all_hijacked_s"] > 0, r["kind"]
        assert r["heads_over_time"][0] == [0.0, 0] and r["heads_over_time"][-1][1] == n
        assert r["rss_per_held"] is not None and r["rss_after"] > 0, r["kind"]
        assert set(r["counters"]) >= {"TcpExtListenOverflows", "TcpExtListenDrops",
                                      "TcpExtTCPSynRetrans"}
        assert all(v >= 0 for v in r["counters"].values()), r["kind"]
        assert r["server_log_errors"] == [], r["kind"]
    # Each run from its own source addresses.
    sources = [tuple(r["sources"]) for r in runs]
    assert len(set(sources)) == len(sources)
    by_kind = {r["kind"]: r for r in runs}
    assert len(by_kind["reuseport"]["server_processes"]) == 2
    assert by_kind["reuseport"]["backlog"] == [by_kind["ours"]["backlog"][0]] * 2
    (puma,) = by_kind["puma"]["server_processes"]  # single mode: one process
    assert "puma" in by_kind["puma"]["argv"][0]
    assert str(ROOT.parent / "shared" / "mission" / "seed_config.ru") in by_kind["puma"]["argv"]
    summary = data["summary"]
    assert set(summary) == {"ours", "puma", "gthread", "reuseport"}
    for kind in ("ours", "gthread", "reuseport"):
        assert summary[kind]["time_ratio_median"] > 0 and summary[kind]["rss_ratio_median"]
    assert data["meta"]["n"] == n
    md = (tmp_path / "storm.md").read_text()
    assert f"# Connect storm: {n} clients at once" in md
    assert "| the seed on Puma | 300 | 0 |" in md and "| ours (gevent, 1 worker) | 300 | 0 |" in md
    assert "![hijacked connections over time](storm.png)" in md
    assert (tmp_path / "storm.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.unit
def test_rounds_alternate_and_runs_get_fresh_sources():
    storm = _storm_module()
    kinds = ["ours", "puma", "gthread", "reuseport"]
    assert storm.order_of_rounds(3, kinds) == [
        ["ours", "puma", "gthread", "reuseport"],
        ["puma", "ours", "reuseport", "gthread"],
        ["ours", "puma", "gthread", "reuseport"]]
    assert storm.sources_for(0, 2, 1) == ["127.0.1.2", "127.0.1.3"]
    assert storm.sources_for(11, 2, 1) == ["127.0.12.2", "127.0.12.3"]
    blocks = {storm.sources_for(k, 1, 200)[0] for k in range(100)}
    assert len(blocks) == 100 and "127.0.0.2" not in blocks  # never 127.0.0.x
