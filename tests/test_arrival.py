"""Arrival at the edges, on real gunicorn: a storm at the fd limit, late and
slow request heads, bad heads, and the settings that would lose clients.

The storms run ``benchmarks/arrival.py`` small (every connect in flight at
once, from one epoll loop) and check what every client saw.
"""

from __future__ import annotations

import json
import select
import socket
import time

import pytest

from harness import servers
from harness.servers import run_benchmark
from harness.wire import END_OF_HEAD, read_until, recv_until_closed


def arrival(*args: str) -> dict:
    proc = run_benchmark("arrival.py", *args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_storm_at_the_fd_limit_is_answered_not_dropped(worker):
    # fd limit 2,000 and reserve 100: 1,900 held. 2,500 clients at once, every
    # 50th on /metrics: everyone else gets 503 + Retry-After, nobody is left
    # unanswered or closed without an answer, and the log has no EMFILE.
    r = arrival("fdlimit", "--n", "2500", "--nofile", "2000", "--worker", worker)
    streams, ordinary = r["streams"], r["ordinary"]
    assert r["held"] == 1900, r
    assert streams["statuses"] == {"200": 1900, "503": 550}, r
    assert streams["retry_after_on_503"] == 550, r
    assert streams["closed_without_answer"] == 0 and streams["unanswered"] == 0, r
    assert ordinary["statuses"] == {"200": 50}, r
    assert ordinary["closed_without_answer"] == 0 and ordinary["unanswered"] == 0, r
    # Once 100 held clients leave, 100 new ones are held.
    assert r["held_again"]["statuses"] == {"200": 100}, r
    assert not r["emfile"] and not r["traceback"], r.get("log_excerpt")
    print(f"{worker}: slowest answer {streams['slowest_answer_s']} s after connecting")


@pytest.mark.slow
def test_slow_heads_beside_a_storm_cost_no_greenlet_and_meet_the_deadline():
    r = arrival("slow", "--storm", "1500", "--slow", "1000", "--head-timeout", "12",
                "--byte-every", "2")
    assert r["storm_held"] == 1500, r
    assert r["storm"]["statuses"] == {"200": 1500}, r
    assert r["slow_parked_fds"] >= 995, r  # all accepted and waiting at once
    assert r["slow"]["statuses"] == {"408": 1000}, r
    assert r["slow_still_open"] == 0, r
    assert 12 <= r["slow_closed_after_s"]["min"] and r["slow_closed_after_s"]["max"] <= 22, r
    assert r["rss_per_slow_head"] <= 1024, r
    assert not r["emfile"] and not r["traceback"], r.get("log_excerpt")


def read_head(s: socket.socket) -> bytes:
    """The head and what came with it (all there is, if the server closes first)."""
    return read_until(s, END_OF_HEAD, eof_ok=True)


def test_late_heads_get_their_answer_and_keepalive_keeps_its_meaning(start_server):
    server = start_server("gunicorn", heartbeat=5)  # gunicorn.conf.py: keepalive = 5
    early, late = socket.create_connection(("127.0.0.1", server.port), timeout=40), \
        socket.create_connection(("127.0.0.1", server.port), timeout=40)
    started = time.monotonic()
    for sock, after in ((early, 10), (late, 25)):
        time.sleep(max(0.0, started + after - time.monotonic()))
        sock.sendall(b"GET /events?channel=late HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 200 "), (after, head)
        sock.close()
    # Between two requests on one connection, gunicorn's keepalive still rules:
    # an idle kept-alive connection is closed after 5 s.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_head(s).startswith(b"HTTP/1.1 404 ")
        idle_from = time.monotonic()
        s.settimeout(30)
        while s.recv(65536):
            pass  # the rest of the 404's body, then the server's FIN
        assert time.monotonic() - idle_from < 25  # closed by keepalive, not the head deadline
    assert "Traceback" not in server.log()


def test_bad_heads_get_a_clear_answer(start_server):
    server = start_server("gunicorn", heartbeat=5, env={"WSGI_HIJACK_HEAD_TIMEOUT": "3"})
    port = server.port

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=20)

    silent = connect()  # sends nothing
    trickle = connect()  # a byte a second, never ending the head
    trickle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    for _ in range(5):
        time.sleep(1)
        if select.select([trickle], [], [], 0)[0]:
            break  # the answer is in: a byte now would meet a closed socket (reset)
        trickle.send(b"a")
    for sock in (silent, trickle):
        answer = recv_until_closed(sock, 20)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert b"Connection: close" in answer
        sock.close()

    huge = connect()
    huge.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000)
    answer = recv_until_closed(huge, 20)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    huge.close()

    half = connect()  # a partial head, then the client closes its side
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    half.shutdown(socket.SHUT_WR)
    answer = recv_until_closed(half, 20)
    assert answer.startswith(b"HTTP/1.1 400 ") and b"closed its side" in answer, answer
    half.close()

    empty = connect()  # nothing at all, then half-closed: nobody to answer
    empty.shutdown(socket.SHUT_WR)
    assert recv_until_closed(empty, 20) == b""
    empty.close()

    reset = connect()  # a partial head, then a reset
    reset.sendall(b"GET / HT")
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    reset.close()

    whole = connect()  # a complete head, then half-closed: still served
    whole.sendall(b"GET /nope HTTP/1.0\r\nHost: x\r\n\r\n")
    whole.shutdown(socket.SHUT_WR)
    assert recv_until_closed(whole, 20).startswith(b"HTTP/1.0 404 ")
    whole.close()

    # Meanwhile ordinary clients are served, and the short deadline was warned about.
    status, _, _ = server.get("/nope")
    assert status == 404
    # /metrics counts how the waits ended (synced once a second). The reset
    # client counts as half closed if its partial head and its reset were
    # seen together, else as gone; the fixture's start-up probe (connect,
    # close) and the empty one count as gone.
    def counted(text: str) -> bool:
        return (_metric(text, "timed_out") == 2 and _metric(text, "too_large") == 1
                and _metric(text, "half_closed") >= 1 and _metric(text, "handed_over") >= 2
                and _metric(text, "half_closed") + _metric(text, "gone") >= 4)

    deadline = time.monotonic() + 10
    while True:
        _, _, body = server.get("/metrics")
        text = body.decode()
        if counted(text) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counted(text), text
    log = server.log()
    assert "Traceback" not in log
    assert log.count("WSGI_HIJACK_HEAD_TIMEOUT: a request head must arrive within 3 s") == 1


def _metric(text: str, result: str) -> float:
    prefix = f'wsgi_hijack_request_heads_total{{result="{result}"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines()
                 if line.startswith(prefix)), 0.0)


def test_package_settings_run_the_demo_and_pick_the_lobby_worker(tmp_path):
    server = servers.start("gunicorn", tmp_path, args=("-k", "gevent"), heartbeat=0.5,
                           config="python:wsgi_hijack.gunicorn_conf")
    port = server.port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = read_head(s)
            while b"BEEP\n" not in data:
                data += s.recv(4096)
        assert data.startswith(b"HTTP/1.1 200 ")
    finally:
        server.stop()
    log = server.log()
    assert "Using worker: wsgi_hijack.workers.ggevent.GeventWorker" in log, log
    assert "WARNING" not in log, log


def test_settings_that_lose_clients_are_warned_about_once(tmp_path):
    # No settings file (and not ./gunicorn.conf.py), a soft fd limit of 1024.
    server = servers.start("gunicorn-plain", tmp_path, heartbeat=0.5, soft_nofile=1024,
                           args=("-k", "wsgi_hijack.workers.ggevent.GeventWorker",
                                 "--backlog", "100000"),
                           env={"WSGI_HIJACK_HEAD_TIMEOUT": "5"})
    try:
        status, _, _ = server.get("/nope")
        assert status == 404
    finally:
        server.stop()
    warnings = [line for line in server.log().splitlines() if "[WARNING]" in line]
    assert len(warnings) == 3, warnings
    nofile, backlog, head = (next(w for w in warnings if key in w) for key in (
        "RLIMIT_NOFILE: soft limit 1024", "backlog = 100000 is above net.core.somaxconn",
        "WSGI_HIJACK_HEAD_TIMEOUT: a request head must arrive within 5 s"))
    assert "ulimit -n" in nofile and "python:wsgi_hijack.gunicorn_conf" in nofile
    assert "sysctl -w net.core.somaxconn=100000" in backlog
    assert "WSGI_HIJACK_HEAD_TIMEOUT=30" in head


def test_gunicorns_own_gevent_worker_is_warned_about(start_server):
    server = start_server("gunicorn-plain", heartbeat=5)  # gunicorn -k gevent, no config
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /events?channel=plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_head(s).startswith(b"HTTP/1.1 200 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /events?channel=plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_head(s).startswith(b"HTTP/1.1 200 ")
    time.sleep(0.5)
    log = server.log()
    assert log.count("gunicorn's own gevent worker bounds the first request head") == 1, log


@pytest.mark.slow
def test_all_scenarios_write_a_table(tmp_path):
    md = tmp_path / "arrival.md"
    r = arrival("all", "--n", "300", "--nofile", "400", "--storm", "300", "--slow", "100",
                "--head-timeout", "4", "--md", str(md))
    assert [(x["scenario"], x["worker"], x["tree"]) for x in r["runs"]] == [
        ("fdlimit", "gevent", "this"), ("fdlimit", "gthread", "this"), ("slow", "gevent", "this")]
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # the header and one row a run
    assert all(x["held"] == 300 - 6 for x in r["runs"] if x["scenario"] == "fdlimit")
    assert r["runs"][2]["slow"]["statuses"] == {"408": 100}


@pytest.mark.unit
@pytest.mark.parametrize("data, state", [
    (b"", "partial"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", "partial"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "complete"),
    (b"GET / HTTP/1.1\r\n\r\nbody bytes after the head", "complete"),
    (b"\r\n\r\n", "partial"),  # empty lines before a request line end no head
    (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", "complete"),
    (b"GET / HTTP/1.1\n\n", "partial"),  # bare LF: gunicorn wants CRLF, the deadline decides
    (b"X" * 65536, "too_large"),
])
def test_head_state(data, state):
    from wsgi_hijack.lobby import head_state

    assert head_state(data) == state


@pytest.mark.unit
@pytest.mark.parametrize("data, state", [
    (b"", "partial"),
    (b"\x16\x03\x01", "partial"),  # a record header not yet whole
    (b"\x16\x03\x01\x00\x05abcd", "partial"),  # one byte of the hello missing
    (b"\x16\x03\x01\x00\x05abcde", "complete"),
    (b"\x16\x03\x01\x00\x05abcde\x16\x03", "complete"),  # more behind it
    (b"\x16\x03\x01\xff\xff", "not_tls"),  # longer than any TLS record
    (b"GET / HTTP/1.1\r\n", "plain_http"),  # a clear-text request: told to use https
    (b"\x00\x01garbage", "not_tls"),
])
def test_hello_state(data, state):
    """On a TLS listener the lobby hands a connection over once the client's
    first TLS record is in, and tells clear text apart from garbage."""
    from wsgi_hijack.lobby import hello_state

    assert hello_state(data) == state


def test_gthread_waits_for_the_head_past_keepalive_and_answers_408(start_server):
    server = start_server("gunicorn", heartbeat=5, app="wsgi_hijack:app",
                          args=("-k", "gthread", "--threads", "4"),
                          env={"WSGI_HIJACK_HEAD_TIMEOUT": "10"})
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    late = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    time.sleep(7)  # past keepalive (5), within the head deadline (10)
    late.sendall(b"GET /nope HTTP/1.0\r\nHost: x\r\n\r\n")
    assert recv_until_closed(late, 30).startswith(b"HTTP/1.0 404 ")
    assert recv_until_closed(silent, 30).startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    late.close()
    silent.close()
    log = server.log()
    assert "Using worker: wsgi_hijack.workers.gthread.ThreadWorker" in log
    assert "Traceback" not in log
