"""benchmarks/scale_redis.py and benchmarks/soak.py at a tiny size, so that they keep working.

Only the scripts' own checks are asserted (everyone held, every message
received, nothing lost); no timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.servers import run_benchmark


def _run(script: str, args: list[str], tmp_path: Path, timeout: float) -> dict:
    out = tmp_path / "report.json"
    proc = run_benchmark(script, *args, "--json-out", str(out), timeout=timeout)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert proc.returncode == (0 if report["ok"] else 1)
    return report


@pytest.mark.slow
@pytest.mark.redis
def test_scale_redis_small(tmp_path):
    report = _run("scale_redis.py",
                  ["-n", "300", "--workers", "2", "--messages", "1", "--interval", "0",
                   "--per-process", "150", "--hosts", "2", "--host-workers", "2",
                   "--host-connections", "50"], tmp_path, timeout=240)
    scale = report["scale"]
    assert scale["held_by_clients"] == 300
    assert scale["held_by_workers"] == 300, scale["per_worker"]
    assert len(scale["per_worker"]) == 2
    assert scale["all_held"] and scale["all_received"]
    assert [m["received"] for m in scale["messages"]] == [300]
    multi = report["multihost"]
    assert [h["received"] for h in multi["per_host"]] == [50, 50]
    assert multi["all_held"] and multi["all_received"]
    assert report["ok"]


@pytest.mark.slow
def test_soak_small(tmp_path):
    report = _run("soak.py",
                  ["-n", "200", "--minutes", "2", "--minute-seconds", "30",
                   "--replace-fraction", "0.1", "--publish-interval", "0.5"],
                  tmp_path, timeout=240)
    assert report["replaced"] == 20
    assert report["logical_clients"] == 200
    assert report["messages_lost"] == 0
    assert report["clients_with_loss_or_gap"] == 0
    assert report["published"] > 0
    assert report["no_loss"] and report["all_held"]
    assert [r["minute"] for r in report["per_minute"]] == [0, 1, 2]
    assert report["ok"]
