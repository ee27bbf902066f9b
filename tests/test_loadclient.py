"""The load client, against the real demo under gunicorn, at a small N."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from harness import servers
from harness.clients import wait_for
from harness.servers import free_port
from wsgi_hijack import loadclient


@pytest.fixture
def demo(tmp_path):
    """The demo under gunicorn with a 0.2 s heartbeat, its worker up: (url, master pid)."""
    server = servers.start("gunicorn", tmp_path, heartbeat=0.2, ready=servers.workers_ready(1))
    yield server.url, server.proc.pid
    server.stop(timeout=15)


def test_holds_all_and_reports_server(demo):
    url, master = demo
    n = 300
    report = loadclient.run(url, n, duration=1.0, gunicorn_master=master, progress=0,
                            per_process=200)  # two client processes, as at full scale
    c = report["connections"]
    assert report["processes"] == 2
    assert (c["headed"], c["held"], c["dropped"], c["failed"]) == (n, n, 0, 0)
    assert report["time_to_all_heads"] is not None and report["time_to_all_heads"] > 0
    window = report["hold"]["messages_per_connection"]
    assert window["min"] >= 1  # every connection got heartbeats in the hold window
    total = report["hold"]["messages_per_connection_total"]
    assert total["min"] >= window["min"] and total["total"] >= window["total"]
    (server,) = report["server"]
    assert server["pid"] in loadclient.children(master)
    assert server["fds_held"] >= server["fds_before"] + n
    assert server["rss_end"] > 0 and server["rss_per_connection"] is not None
    assert server["cpu_per_message_us"] is None or server["cpu_per_message_us"] >= 0
    assert report["latency"] is None  # room for the publish-to-receive latency issue
    table = loadclient.format_report(report)
    assert "held at the end" in table and "RSS" in table


def test_cli_json_and_exit_status(demo):
    url, master = demo
    out = subprocess.run(
        [sys.executable, "-m", "wsgi_hijack.loadclient", url, "-n", "50", "--duration", "0.5",
         "--gunicorn-master", str(master), "--json", "--progress", "0.2"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["connections"]["held"] == 50
    assert report["hold"]["messages_per_connection"]["min"] >= 1
    assert "[loadclient" in out.stderr  # live progress goes to stderr


def test_counts_drops_when_the_server_goes_away(demo):
    url, master = demo
    # The worker of a master that just started may not be listed yet.
    worker = wait_for(lambda: loadclient.children(master), "the demo's worker", 30)[0]
    import threading

    def kill_later():
        time.sleep(1.5)
        os.kill(worker, signal.SIGKILL)

    threading.Thread(target=kill_later, daemon=True).start()
    report = loadclient.run(url, 100, duration=3.0, progress=0, retries=0)
    c = report["connections"]
    assert c["headed"] == 100
    assert c["dropped"] == 100 and c["held"] == 0


def test_refused_connections_fail_after_retries():
    port = free_port()  # nothing listens here
    report = loadclient.run(f"http://127.0.0.1:{port}/", 5, duration=0, progress=0, retries=2)
    c = report["connections"]
    assert (c["failed"], c["held"], c["attempts"]) == (5, 0, 15)
    assert c["errors"].get("ECONNREFUSED") == 15


@pytest.mark.unit
def test_plan_spreads_processes_and_source_addresses():
    ports = loadclient.ephemeral_ports()
    big = loadclient.plan(ports + 1000, "127.0.0.1", 19000, "auto")
    assert sum(p["n"] for p in big) == ports + 1000
    assert all(p["n"] <= 19000 for p in big)
    assert [p["source"] for p in big] == [f"127.0.0.{2 + i}" for i in range(len(big))]
    small = loadclient.plan(19900, "127.0.0.1", 19000, "auto")
    assert [p["n"] for p in small] == [9950, 9950] and small[0]["source"] is None
    assert loadclient.plan(100, "10.0.0.1", 19000, "auto")[0]["source"] is None
    given = loadclient.plan(30, "127.0.0.1", 10, "127.0.0.7,127.0.0.8")
    assert [p["source"] for p in given] == ["127.0.0.7", "127.0.0.8", "127.0.0.7"]


def test_storm_holds_every_client_at_once(start_server):
    """``--storm``: all connects at once, none retried; every client hijacked."""
    server = start_server("gunicorn", app="wsgi_hijack:app", heartbeat=0.3)
    n = 400
    out = subprocess.run(
        [sys.executable, "-m", "wsgi_hijack.loadclient", f"http://127.0.0.1:{server.port}/",
         "-n", str(n), "--storm", "--per-process", "200", "--duration", "0.5", "--json",
         "--progress", "0.2"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    c = report["connections"]
    assert report["processes"] == 2
    assert (c["attempts"], c["headed"], c["held"]) == (n, n, n)
    assert (c["closed_without_answer"], c["failed"], c["retries"], c["dropped"]) == (0, 0, 0, 0)
    storm = report["storm"]
    assert storm["storm"] is True
    assert storm["time_to_all_hijacked"] is not None
    assert storm["time_to_all_hijacked"] == storm["time_to_last_head"]
    curve = storm["heads_over_time"]
    assert curve[0] == [0.0, 0] and curve[-1][1] == n
    assert [p[1] for p in curve] == sorted(p[1] for p in curve)  # heads only accumulate
    assert [p[0] for p in curve] == sorted(p[0] for p in curve)
    assert "closed-without-answer 0" in out.stderr


class _AnswerlessServer:
    """Accepts each connection and closes it at once, never answering."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(5)


def test_storm_counts_clients_closed_without_an_answer():
    server = _AnswerlessServer()
    try:
        url = f"http://127.0.0.1:{server.port}/"
        report = loadclient.run(url, 30, duration=0, progress=0, storm=True, retries=5)
        c = report["connections"]
        # Every connect succeeded, none got a head, and a storm retries none.
        assert (c["attempts"], c["opened"], c["retries"]) == (30, 30, 0)
        assert (c["closed_without_answer"], c["failed"], c["headed"], c["held"]) == (30, 30, 0, 0)
        assert (c["timed_out"], c["connect_failed"]) == (0, 0)
        assert report["storm"]["time_to_all_hijacked"] is None
        assert report["storm"]["heads_over_time"] == [[0.0, 0]]
        # Paced, the same clients are retried, and each attempt is counted.
        paced = loadclient.run(url, 10, duration=0, progress=0, retries=1)["connections"]
        assert (paced["attempts"], paced["retries"], paced["failed"]) == (20, 10, 10)
        assert paced["closed_without_answer"] == 20
        assert "closed without an answer" in loadclient.format_report(report)
    finally:
        server.close()


@pytest.mark.unit
def test_heads_over_time_points():
    curve = loadclient.heads_over_time([10.004, 10.006, 10.3, 10.31, 12.0], 10.0)
    # Ends of 10 ms steps with heads, and the start of each stretch without.
    assert curve == [[0.0, 0], [0.01, 2], [0.3, 2], [0.31, 3], [0.32, 4], [2.0, 4], [2.0, 5]]
    assert loadclient.heads_over_time([], 5.0) == [[0.0, 0]]
    many = loadclient.heads_over_time([i * 0.1 for i in range(2000)], 0.0)
    assert len(many) <= 8002 and many[-1] == [199.9, 2000]
