"""A small run of benchmarks/gthread_hold.py: one gunicorn gthread worker, never
monkeypatched, holds every connection and sends each its heartbeats (the
19,000-connection run is in benchmarks/results/gthread.md)."""

from __future__ import annotations

import json

import pytest

from harness.servers import run_benchmark


@pytest.mark.slow
def test_gthread_worker_holds_connections_without_monkeypatching(tmp_path):
    proc = run_benchmark("gthread_hold.py", "-n", "400", "--hold", "2", "--heartbeat", "0.4",
                         "--out", str(tmp_path), timeout=120)
    report = json.loads((tmp_path / "gthread.json").read_text())
    assert proc.returncode == 0, (report["checks"], proc.stdout, proc.stderr[-3000:])
    assert report["connections"]["held"] == 400
    assert report["worker_at_peak"]["held"] == 400
    assert not any(report["worker_at_peak"]["patched"].values())
    assert "wsgi_hijack-reactor" in report["worker_at_peak"]["threads"]
    assert report["heartbeats_per_connection"]["min"] >= report["heartbeats_expected_min"]
    assert report["server_log_errors"] == []
    assert "400 connections" in (tmp_path / "gthread.md").read_text()
