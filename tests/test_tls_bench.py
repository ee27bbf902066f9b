"""benchmarks/tls.py at a small N, so that it keeps working; the figures come
from the full run (benchmarks/results/tls.md).

Every case (plain streams, TLS at our gevent worker, nginx terminating TLS in
front) holds all its streams over real TLS clients, every stream gets
heartbeats in the hold window, the published message reaches every stream,
and the report has a row and sane figures for each. No timing or ratio is
asserted: at this size they are noise.
"""

from __future__ import annotations

import json

import pytest

from harness.servers import run_benchmark

N = 50
ROUNDS = 3
CASES = ("plain", "tls-gunicorn", "tls-nginx")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_tls_benchmark_small_run(tmp_path):
    # A source block of its own (the storm test takes 200).
    proc = run_benchmark("tls.py", "--connections", str(N), "--rounds", str(ROUNDS),
                         "--messages", "1", "--processes", "2", "--progress", "5",
                         "--source-block", "210", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[tls " in proc.stderr  # progress lines while it runs

    data = json.loads((tmp_path / "tls.json").read_text())
    runs = {r["case"]: r for r in data["runs"]}
    assert list(runs) == list(CASES)
    for case, r in runs.items():
        assert r["n"] == N, case  # 50 fit nginx's fds too
        assert r["held"] == N and r["held_at_end"] == N and r["dropped"] == 0, (case, r)
        assert r["failed"] == 0, (case, r)
        w = r["window"]
        # Every stream got heartbeats in the window (a loaded host gets fewer rounds: at
        # least one in three heartbeat intervals).
        assert w["streams"] == N and w["without_heartbeat"] == 0 and w["min"] >= 1, (case, w)
        assert w["heartbeats"] >= N, (case, w)
        assert w["cpu_per_heartbeat_us"] is not None and w["cpu_per_heartbeat_us"] >= 0
        assert r["published"]["statuses"] == [202], case
        assert r["published"]["delivered"] == N, (case, r["published"])
        assert r["published"]["p99_ms"] > 0, case
        assert r["rss_start"]["gunicorn worker"] > 0, case
        assert r["fds"]["gunicorn worker"] >= N, case
        # The clients spoke TLS where the case has it, and verified the certificate.
        assert (r["tls_version"] is not None) == (case != "plain"), case
        assert r["tls"] == (case != "plain"), case
    # nginx: two fds a stream (the client's, the upstream's), besides the worker's one.
    nginx = runs["tls-nginx"]
    assert nginx["fds"]["nginx worker"] - nginx["fds_idle"]["nginx worker"] >= 2 * N
    assert nginx["fds_per_stream"] >= 2.9
    assert 0.9 <= runs["plain"]["fds_per_stream"] <= 1.1
    if runs["plain"].get("kernel"):  # /proc/slabinfo readable (root)
        assert 1.9 <= runs["plain"]["kernel"]["sockets_per_stream"] <= 2.1
        assert 3.9 <= nginx["kernel"]["sockets_per_stream"] <= 4.1

    ratios = {x["case"]: x for x in data["ratios"]}
    assert set(ratios) == set(CASES)
    md = (tmp_path / "tls.md").read_text()
    for case in CASES:
        assert f"| {case} | 1 | {N:,} of {N:,} |" in md, case
    assert "## Against plain streams in the same run" in md
    assert (tmp_path / "tls.png").read_bytes().startswith(PNG_MAGIC)
