"""The Redis bus against a real redis-server: many workers, shared replay, outages."""

from __future__ import annotations

import time

import httpx

from harness import servers, wire
from harness.clients import open_sse, published_id, wait_total_held
from harness.servers import assert_clean_log
from harness.wire import read_until


def redis_gunicorn(start_server, redis_server, workers: int = 2, heartbeat: float = 0.5, **kw):
    server = start_server("gunicorn", heartbeat=heartbeat, args=("--workers", str(workers)),
                          env={"WSGI_HIJACK_REDIS_URL": redis_server.url, **kw})
    # Each worker listens on its own SO_REUSEPORT socket once it has booted:
    # wait until every one of them answers.
    wait_total_held(server, workers, 0, timeout=20)
    return server


def test_one_publish_reaches_every_worker(start_server, redis_server):
    server = redis_gunicorn(start_server, redis_server)
    socks = open_sse(server, "all", 40)
    seen = wait_total_held(server, 2, 40)
    assert all(v > 0 for v in seen.values()), seen  # both workers hold some
    ids = [published_id(server, "all", f"m{i}") for i in range(3)]
    for s in socks:
        with s:
            data = read_until(s, b"data: m2\n\n")
        got = [int(x.split(b"\n")[0]) for x in data.split(b"id: ")[1:]]
        assert got == ids
    assert_clean_log(server)


def test_replay_is_shared_across_workers_and_hosts(start_server, redis_server):
    # Two separate gunicorn instances (two "hosts") on one Redis.
    host_a = redis_gunicorn(start_server, redis_server, workers=1)
    host_b = redis_gunicorn(start_server, redis_server, workers=1)
    ids = [published_id(host_a, "shared", f"m{i}") for i in range(4)]
    with wire.request(host_b.port, "/events?channel=shared", f"Last-Event-ID: {ids[0]}\r\n") as s:
        data = read_until(s, b"data: m3\n\n")
        body = data.partition(b"\r\n\r\n")[2].decode()
        assert body == "retry: 2000\n\n" + "".join(
            f"id: {ids[i]}\ndata: m{i}\n\n" for i in (1, 2, 3))
        live = published_id(host_a, "shared", "live")
        assert f"id: {live}\ndata: live\n\n".encode() in read_until(s, b"data: live\n\n")
    # ids are ordered across hosts: a publish on B comes after A's.
    assert published_id(host_b, "shared", "from b") > live


def test_history_trim_in_redis_reports_gap(start_server, redis_server):
    server = redis_gunicorn(start_server, redis_server, workers=1,
                            WSGI_HIJACK_HISTORY_SIZE="2")
    ids = [published_id(server, "trim", f"m{i}") for i in range(5)]
    with wire.request(server.port, "/events?channel=trim", f"Last-Event-ID: {ids[0]}\r\n") as s:
        data = read_until(s, b"data: m4\n\n")
    body = data.partition(b"\r\n\r\n")[2].decode()
    assert body.startswith("retry: 2000\n\nevent: gap\n"), body
    assert body.endswith(f"id: {ids[3]}\ndata: m3\n\nid: {ids[4]}\ndata: m4\n\n")


def test_two_workers_without_a_cross_worker_bus_refuse_to_start(tmp_path):
    import subprocess

    env = servers.server_env(1)
    env.pop("WSGI_HIJACK_REDIS_URL", None)
    env.pop("WSGI_HIJACK_ALLOW_LOCAL_BUS", None)
    argv = servers.argv_for("gunicorn", servers.free_port(), args=("-w", "2"))
    proc = subprocess.run(argv, cwd=servers.ROOT, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert "need a cross-worker bus" in proc.stderr + proc.stdout


def test_redis_outage(start_server, redis_server):
    server = redis_gunicorn(start_server, redis_server, workers=2, heartbeat=0.3)
    socks = open_sse(server, "out", 20)
    wait_total_held(server, 2, 20)
    before = published_id(server, "out", "before")
    for s in socks:
        read_until(s, b"data: before\n\n")

    redis_server.kill()
    # Publishing fails loudly and publishes nothing.
    resp = httpx.post(f"http://127.0.0.1:{server.port}/publish", params={"channel": "out"},
                      content=b"during", timeout=10)
    assert resp.status_code == 503 and "unavailable" in resp.text, resp.text
    assert resp.headers["retry-after"] == "1"
    # Held connections stay open and keep their heartbeats.
    for s in socks:
        s.settimeout(5)
        read_until(s, b": ping\n\n", s.recv(65536))

    redis_server.start()
    # Workers reconnect with backoff; delivery resumes.
    deadline = time.monotonic() + 20
    while True:
        resp = httpx.post(f"http://127.0.0.1:{server.port}/publish",
                          params={"channel": "out"}, content=b"after", timeout=10)
        if resp.status_code == 202:
            break
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.2)
    after = resp.json()["id"]
    assert after > before  # the counter survived the restart
    for s in socks:
        data = read_until(s, b"data: after\n\n")
        assert b"during" not in data
    # Replay still covers what was published before the outage.
    with wire.request(server.port, "/events?channel=out", f"Last-Event-ID: {before - 1}\r\n") as s:
        data = read_until(s, b"data: after\n\n")
    assert f"id: {before}\ndata: before\n\n".encode() in data
    log = server.log()
    assert "lost its subscription" in log and "reconnected" in log
    for s in socks:
        s.close()


def test_connections_spread_evenly_over_workers(start_server, redis_server):
    server = redis_gunicorn(start_server, redis_server, workers=2, heartbeat=5)
    socks = open_sse(server, "spread", 300)
    seen = wait_total_held(server, 2, 300)
    # SO_REUSEPORT hashing: about 150 each (a shared socket can give one worker most).
    assert min(seen.values()) >= 100, seen
    for s in socks:
        s.close()
    assert "with SO_REUSEPORT" in server.log()


def test_one_publish_reaches_every_host(start_server, redis_server):
    hosts = [redis_gunicorn(start_server, redis_server, workers=1) for _ in range(3)]
    socks = [open_sse(host, "everyone", 5) for host in hosts]
    for host in hosts:
        wait_total_held(host, 1, 5)
    msg = published_id(hosts[1], "everyone", "hello all")
    for group in socks:
        for s in group:
            with s:
                assert f"id: {msg}\ndata: hello all\n\n".encode() in read_until(
                    s, b"data: hello all\n\n")


def test_a_replay_cut_by_redis_sends_the_client_back_to_reconnect(start_server, redis_server):
    """Redis stops answering in the middle of a client's replay (held by
    ``CLIENT PAUSE`` past the bus's timeouts): the client is not told to skip
    ahead. It gets its goodbye with no event, reconnects from its own
    Last-Event-ID once Redis is back, and gets exactly what it missed."""
    server = redis_gunicorn(start_server, redis_server, workers=1)
    keeper = open_sse(server, "cut", 1)  # the channel stays live at the bus
    ids = [published_id(server, "cut", f"m{i}") for i in range(3)]
    with wire.connect(redis_server.port, b"CLIENT PAUSE 12000 ALL\r\n") as admin:
        assert admin.recv(100).startswith(b"+OK")
    with wire.request(server.port, "/events?channel=cut", f"Last-Event-ID: {ids[0]}\r\n",
                      timeout=30) as s:
        cut = read_until(s, b"retry: 1000\n\n")  # heartbeats meanwhile: no timeout
        assert s.recv(100) == b""  # then closed
    assert cut.endswith(b"retry: 1000\n\n"), cut  # its goodbye: reconnect soon
    assert b"id: " not in cut and b"retry: 2000" not in cut  # no event, no opening
    back = wait_for_reconnect(server, ids[0])
    assert back == [f"id: {ids[i]}\ndata: m{i}" for i in (1, 2)]
    for s in keeper:
        s.close()


def wait_for_reconnect(server, last_id: int) -> list[str]:
    """Reconnect as EventSource does until the replay is served; its events."""
    deadline = time.monotonic() + 30
    while True:
        with wire.request(server.port, "/events?channel=cut", f"Last-Event-ID: {last_id}\r\n",
                          timeout=30) as s:
            data = read_until(s, b"\n\n", read_until(s, b"\r\n\r\n"))
            if b"retry: 2000" in data:
                data = read_until(s, b"data: m2\n\n", data)
                body = data.partition(b"\r\n\r\n")[2].decode()
                return [block for block in body.split("\n\n")[1:]
                        if block and not block.startswith(":")]  # no heartbeats
        assert time.monotonic() < deadline, "Redis did not come back"
        time.sleep(0.5)
