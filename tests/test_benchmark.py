"""The benchmark, at a small N, so that it keeps working; figures come from full runs."""

from __future__ import annotations

import json

import pytest

from harness.servers import run_benchmark

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_small_run_writes_table_plots_and_json(tmp_path):
    out = tmp_path / "results"
    proc = run_benchmark(
        "run.py", "--ns", "150,300", "--heartbeat", "0.3", "--min-rounds", "3", "--messages",
        "300", "--threads", "2", "--soak", "1.5", "--repeat", "2", "--side-by-side", "2",
        "--progress", "0", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    runs = data["results"]
    kinds = {"hijack", "hijack-threads", "greenlet", "floor", "floor-threads"}
    for n in (150, 300):
        for kind in kinds:
            (r,) = [r for r in runs if r["server"] == kind and r["n"] == n and not r["storm"]
                    and not r.get("repeat")]
            assert (r["held"], r["dropped"], r["failed"]) == (n, 0, 0), (kind, n)
            assert r["messages_min"] >= 1, (kind, n)
            assert r["rounds_logged"] >= 1 and r["round_s"] > 0, (kind, n)
            assert r["rss_per_connection"] is not None and r["fds_held"] >= n
    repeats = sorted(r["server"] for r in runs if r.get("repeat") == 1 and not r["storm"])
    assert repeats == ["floor", "hijack"] and all(r["n"] == 300 for r in runs
                                                  if r.get("repeat"))
    # Storms run as pairs, the order alternating, every client hijacked each time.
    storms = [(r.get("repeat", 0), r["server"]) for r in runs if r["storm"]]
    assert storms == [(0, "hijack"), (0, "greenlet"), (1, "greenlet"), (1, "hijack")]
    assert all(r["held"] == 300 and r["time_to_all_heads_s"] for r in runs if r["storm"])
    assert data["soak"]["held"] == 300 and data["soak"]["report"]["server"][0]["timeline"]

    md = (out / "results.md").read_text()
    assert "## Targets at N = 300" in md
    for row in ("server RSS per held connection", "CPU per delivered heartbeat",
                "heartbeat write run", "reconnect storm", "OS threads"):
        assert row in md, row
    cpu_row = next(line for line in md.splitlines() if "CPU per delivered heartbeat" in line)
    assert "x floor side by side" in cpu_row
    # The pairing is checked on the write run: at this N a server's CPU over a
    # window can be under one clock tick (0), and a ratio to 0 is left out.
    round_row = next(line for line in md.splitlines() if "heartbeat write run" in line)
    assert "median of 2 pairs" in round_row and "x floor side by side" in round_row
    storm_row = next(line for line in md.splitlines() if "reconnect storm" in line)
    assert "median of 2 pairs" in storm_row and "(in run order)" in storm_row
    together = data["side_by_side"]
    for kind in ("floor", "hijack"):
        r = together[kind]
        assert (r["held"], r["dropped"]) == (300, 0), kind
        # CPU is read in clock ticks: at this N a window's CPU may be under one (0).
        assert r["rounds"] >= 1 and r["cpu_per_message_us"] >= 0 and r["round_s"] > 0, kind
    assert together["round_ratio"] > 0
    assert together["cpu_ratio"] is None or together["cpu_ratio"] >= 0
    assert "## Side by side: floor and hijack at once, 300 each" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    for kind in kinds:
        assert any(line.startswith(f"| {kind} | 300 |") for line in table), kind
    for png in ("rss_per_connection.png", "heartbeat_round.png", "soak.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
        assert f"]({png})" in md
    # compare.py on a run against itself: every figure unchanged, ratio 1.
    compared = run_benchmark("compare.py", str(out), str(out), "--out",
                             str(tmp_path / "compare.md"), timeout=60)
    assert compared.returncode == 0, compared.stderr
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert {r["key"] for r in rows} >= {"rss_per_connection", "cpu_per_message_us"}
    assert all(r["ratio"] in (None, 1.0) for r in rows), rows
    assert "| hijack | RSS per held connection (B) |" in (tmp_path / "compare.md").read_text()


@pytest.mark.unit
def test_send_threads_deliver_every_beat_and_drop_the_closed(monkeypatch):
    """WSGI_HIJACK_SEND_THREADS (measured as hijack-threads): same results as one thread."""
    import socket

    import gevent

    from wsgi_hijack import reactor as reactor_module
    from wsgi_hijack.protocols.plain import PlainStream

    monkeypatch.setenv("WSGI_HIJACK_SEND_THREADS", "3")
    monkeypatch.setattr(reactor_module.fanout, "THREADED_MIN", 1)
    reactor = reactor_module.Reactor(heartbeat=3600).start()
    assert len(reactor._senders) == 2
    peers = []
    try:
        for _ in range(60):
            ours, theirs = socket.socketpair()
            reactor.hold(ours, PlainStream(b"BEEP\n"))
            peers.append(theirs)
        gevent.sleep(0.05)  # let the reactor adopt them
        assert len(reactor) == 60
        peers[7].close()
        gevent.sleep(0.05)
        for _ in range(3):
            reactor.heartbeat_round()
        assert len(reactor) == 59
        for i, peer in enumerate(peers):
            if i == 7:
                continue
            peer.settimeout(5)
            data = b""
            while len(data) < 15:
                data += peer.recv(100)
            assert data == b"BEEP\n" * 3, i
    finally:
        reactor.close(goodbye=False)
        for peer in peers:
            peer.close()


@pytest.mark.slow
def test_storm_profile_small_run_names_our_functions():
    proc = run_benchmark("profile_storm.py", "-n", "200", "--top", "5", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "storm of 200: all heads in" in out
    assert "own time by where it lives:" in out and "wsgi_hijack" in out
    ours = out.split("wsgi_hijack's own time, per connection (N = 200):")[1]
    assert "hijack.py" in ours and "(200 calls)" in ours


@pytest.mark.slow
def test_fanout_loop_benchmark_runs_small():
    proc = run_benchmark("fanout_loop.py", "-n", "300", "--rounds", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(line.split(None, 1) for line in proc.stdout.splitlines()
                if line.startswith(("bare ", "write_each_py ", "write_each_c ")))
    assert set(rows) == {"bare", "write_each_py", "write_each_c"}
    assert "x bare" in rows["write_each_c"]
    assert "bytecode_loop, shuffled" in proc.stdout


@pytest.mark.slow
def test_heap_per_connection_small_run():
    """benchmarks/heap_per_connection.py: the exact Python heap per held connection."""
    proc = run_benchmark("heap_per_connection.py", "-n", "200", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["n"] == result["held"] == 200
    assert 0 < result["heap_per_connection"] <= result["peak_per_connection"]
