"""benchmarks/handoff.py at a small N, so that it keeps working; figures come from full runs.

A reload with handoff against a reload with goodbye and reconnect, on real
gunicorn: the JSON lines it writes say who saw a close, that every client
was served by the new worker, and that nobody missed a message or got one
twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.servers import run_benchmark

N = 300
HEARTBEAT = 2.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(out: Path, *args: str) -> list[dict]:
    proc = run_benchmark("handoff.py", "--connections", str(N), "--repeat", "1",
                         "--heartbeat", str(HEARTBEAT), "--after", "1", "--progress", "0",
                         "--out", str(out), *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def assert_every_message_once(r: dict) -> None:
    assert r["clients"] == N and r["served_clients"] == N, r["mode"]
    assert (r["missing"], r["duplicates"], r["unexpected"]) == (0, 0, 0), r["missed_messages"]
    assert r["accepted"] == r["published"] and r["published_in_window"] > 0
    assert r["deliveries_in_window"] == N * r["published_in_window"]


@pytest.mark.redis
def test_handoff_closes_nobody_goodbye_closes_everybody_nothing_lost(tmp_path):
    # The Redis bus: a reconnect replays from its Last-Event-ID, so neither
    # mode may lose a message; only the handoff keeps every connection.
    out = tmp_path / "handoff"
    runs = bench(out, "--bus", "redis")
    by_mode = {r["mode"]: r for r in runs}
    assert [r["mode"] for r in runs] == ["handoff", "goodbye"]
    handoff, goodbye = by_mode["handoff"], by_mode["goodbye"]
    assert handoff["closed_clients"] == 0 and handoff["closes_before_hup"] == 0
    assert goodbye["closed_clients"] == N
    for r in runs:
        assert_every_message_once(r)
        assert r["served_all_s"] > 0 and r["served_all_s"] >= r["served_median_s"]
        assert r["cpu_s"] >= 0 and r["cpu_per_process_s"]
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]
        assert r["steady_p99_ms"] is not None and r["held_before"] == N
    # The moved connections kept their heartbeats: none waited two intervals.
    assert handoff["ping_gap_max_s"] < 2 * HEARTBEAT
    # The old worker, the park and the new worker each spent some CPU.
    assert {k.rsplit(" ", 1)[0] for k in handoff["cpu_per_process_s"]} == \
        {"old worker", "park", "new worker"}

    md = (out / "results.md").read_text()
    assert f"| clients that saw a close | 0 | {N} | 0.000 |" in md
    for row in ("HUP until the new worker serves every client", "CPU of old + new worker",
                "publish-to-receive p99", "deliveries missed"):
        assert row in md, row
    assert (out / "handoff.png").read_bytes().startswith(PNG_MAGIC)
    assert {p.name for p in (out / "logs").iterdir()} == {"run1-handoff.log",
                                                         "run2-goodbye.log"}


def test_handoff_moves_the_in_process_bus(tmp_path):
    # The default bus: its history and ids move with the connections, so the
    # resumed clients replay what was published during the reload, and ids
    # go on increasing.
    (r,) = bench(tmp_path / "handoff", "--bus", "memory", "--modes", "handoff")
    assert r["mode"] == "handoff" and r["closed_clients"] == 0
    assert_every_message_once(r)
    assert r["ids_not_increasing"] == 0 and r["gap_events"] == 0
