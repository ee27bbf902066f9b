"""benchmarks/redis_ha.py at a small size, so that it keeps working; figures come from full runs.

One Redis, a Sentinel set and a Cluster (each publish then ``WAIT 1`` on the
last two), on real redis-server processes and gunicorn: the report must hold
the three modes with their costs measured, every client must have received
every message, a Cluster publish must have gone to its shard only, and the
README and the plot must be written. No timing is asserted: the figures move
with the machine's load.
"""

from __future__ import annotations

import json

import pytest

from harness.servers import run_benchmark

MODES = ["single", "sentinel", "cluster"]
PUBLISHES = 200
CLIENTS = 50
MESSAGES = 20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: Per mode: (bus, primaries, replicas, min_replicas).
EXPECTED = {"single": ("RedisBus", 1, 0, 0), "sentinel": ("RedisBus", 1, 2, 1),
            "cluster": ("RedisClusterBus", 3, 3, 1)}


@pytest.mark.slow
@pytest.mark.redis
def test_every_mode_measured_and_every_message_delivered(tmp_path):
    out = tmp_path / "redis_ha"
    proc = run_benchmark("redis_ha.py", "--publishes", str(PUBLISHES), "--clients", str(CLIENTS),
                         "--messages", str(MESSAGES), "--rate", "20", "--progress", "0",
                         "--out", str(out), timeout=900)  # the default modes: all three
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["ok"] is True
    assert list(doc["summary"]) == MODES
    assert [r["mode"] for r in doc["runs"]] == MODES
    for run in doc["runs"]:
        mode, cost, lat = run["mode"], run["cost"], run["latency"]
        assert run["supported"] is True and "error" not in run, mode
        for key in ("publish_p50_us", "publish_p99_us", "publish_mean_us",
                    "cpu_us_per_publish", "publishes_per_s", "redis_primary_cpu_us_per_publish",
                    "ab_p50_us", "nowait_p50_us"):
            assert cost[key] > 0, (mode, key)
        bus, primaries, replicas, min_replicas = EXPECTED[mode]
        assert cost["publishes"] == PUBLISHES and cost["bus"] == bus, mode
        assert (len(cost["primaries"]), len(cost["replicas"])) == (primaries, replicas), mode
        # Each measured publish WAITed for a replica where MIN_REPLICAS is 1, and none did
        # on one server.
        waits = cost["commandstats"].get("wait", {}).get("calls", 0)
        assert (cost["min_replicas"], waits) == (min_replicas, PUBLISHES * min_replicas), mode
        assert set(run["appendfsync"].values()) == {"everysec"}
        assert lat["accepted"] == MESSAGES and lat["refused"] == []
        assert lat["deliveries_expected"] == CLIENTS * MESSAGES
        assert lat["deliveries_received"] == CLIENTS * MESSAGES, mode
        assert lat["duplicates"] == 0 and lat["all_received"] is True
        assert 0 < lat["latency_p50_ms"] <= lat["latency_p99_ms"] <= lat["latency_max_ms"]

    # On the Cluster the channel's master carried the publishes and sent them on the
    # cluster bus (SPUBLISH: to its shard), the nodes outside the shard next to nothing.
    cost = doc["runs"][2]["cost"]
    shard = cost["shard"]
    assert shard["master"] in cost["primaries"] and len(shard["replicas"]) == 1
    traffic = {int(p): v for p, v in cost["cluster_bus_per_publish"].items()}
    assert traffic[shard["master"]][0] >= 0.9
    outside = [max(v) for p, v in traffic.items() if p not in {shard["master"], *shard["replicas"]}]
    assert len(outside) == 4 and max(outside) < 0.5
    assert doc["runs"][2]["latency"]["shard"]["master"] in cost["primaries"]

    summary = doc["summary"]
    assert summary["single"]["ratio"]["publish_p50_us"] == 1.0
    assert all(summary[m]["ratio"]["publish_p50_us"] > 0 for m in MODES)
    readme = (out / "README.md").read_text()
    assert all(f"| {m} | " in readme for m in MODES)
    assert "x single" in readme and "## Reading" in readme
    assert "travels only to its shard" in readme
    assert (out / "redis_ha.png").read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in (out / "logs").iterdir()) == [
        "run1-single-gunicorn.log", "run2-sentinel-gunicorn.log", "run3-cluster-gunicorn.log"]


@pytest.mark.slow
@pytest.mark.redis
def test_the_id_floor_is_measured_against_the_counter_alone(tmp_path):
    proc = run_benchmark("id_floor.py", "--publishes", "400", "--out", str(tmp_path),
                         timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "id_floor.json").read_text())
    assert set(doc["rows"]) == {"clock floor", "counter alone"}
    assert all(r["publishes"] == 400 and r["p50_us"] > 0 for r in doc["rows"].values())
    assert "x the counter alone" in (tmp_path / "id_floor.md").read_text()
