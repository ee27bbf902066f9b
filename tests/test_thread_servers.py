"""The hijack API on servers whose handlers are OS threads (gunicorn sync and
gthread, Werkzeug, uWSGI): plain sockets, read-ahead bytes kept, keep-alive,
and a worker left clean after many hijacks (tests/thread_apps.py)."""

from __future__ import annotations

import time

import pytest

from harness import servers, wire
from harness.servers import assert_clean_log
from harness.wire import read_head, recv_exactly

APP = "tests.thread_apps:app"
THREAD_SERVERS = ["gunicorn-gthread", "gunicorn-sync", "werkzeug", "werkzeug-debug",
                  pytest.param("uwsgi", marks=pytest.mark.uwsgi)]


@pytest.mark.parametrize("server", THREAD_SERVERS)
def test_full_hijack_gives_a_plain_socket_and_the_bytes_read_ahead(serve, server):
    srv = serve(None, server, APP)
    info = wire.get_json(srv.port, "/_probe")
    assert info["hijackable"] is True and info["patched"] is False, info
    if server == "uwsgi":  # read-ahead stays in uWSGI's C buffers: GET only, nothing behind
        request = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
        expected_read, behind = b"", b""
    else:  # the app reads 5 of 10 body bytes; the rest and a pipelined tail come first
        request = (b"POST /echo?read=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
                   b"HELLOworld" + b"PIPELINED")
        expected_read, behind = b"HELLO", b"worldPIPELINED"
    with wire.connect(srv.port, request) as s:
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert b"X-Socket: socket.socket\r\n" in head, head  # stdlib, not gevent
        assert b"X-Read: " + expected_read + b"\r\n" in head + b"\r\n", head
        assert recv_exactly(s, len(behind), rest) == behind
        s.sendall(b"and more")
        assert recv_exactly(s, 8) == b"and more"
    time.sleep(0.2)
    assert_clean_log(srv)


def test_hijack_on_a_kept_alive_connection(serve):
    # gthread hands a kept-alive connection back to its poller between
    # requests; the hijack comes on the second request of the connection.
    # (The sync worker, Werkzeug and uWSGI's --http-socket close after each.)
    srv = serve(None, "gunicorn-gthread", APP)
    with wire.connect(srv.port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        head, rest = read_head(s)
        assert b" 200 " in head.split(b"\r\n")[0], head
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length")))
        assert recv_exactly(s, length, rest) == b'{"hello": "world"}'
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        head, rest = read_head(s)
        assert b"X-Socket: socket.socket" in head, head
        s.sendall(b"ping")
        assert recv_exactly(s, 4, rest) == b"ping"
    assert_clean_log(srv)


@pytest.mark.parametrize("server", THREAD_SERVERS)
def test_many_hijacks_leave_the_worker_clean(serve, server):
    srv = serve(None, server, APP)

    def one(i: int) -> None:
        with wire.connect(srv.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n") as s:
            head, rest = read_head(s)
            s.sendall(b"%d" % i)
            assert recv_exactly(s, len(b"%d" % i), rest) == b"%d" % i

    one(-1)  # the first hijack starts the reactor (its epoll and wake-up fds)
    time.sleep(0.2)
    before = wire.get_json(srv.port, "/_probe")
    for i in range(40):
        one(i)
    deadline = time.monotonic() + 10
    while (after := wire.get_json(srv.port, "/_probe"))["fds"] > before["fds"]:
        assert time.monotonic() < deadline, (before, after)  # every fd closed again
        time.sleep(0.05)
    if server == "gunicorn-gthread":
        # Each hijacked connection was counted closed exactly once: only the
        # probe's own connection is open (a detached socket would make it -39).
        assert after["nr_conns"] == 1, after
    assert_clean_log(srv)


@pytest.mark.parametrize("worker", ["gthread", "sync"])
def test_two_thread_workers_each_listen_with_reuseport(tmp_path, worker):
    # gunicorn.conf.py gives each worker its own SO_REUSEPORT listener: plain
    # sockets for the thread workers (a gevent socket would make gthread's
    # connections gevent sockets, and the sync worker must select on it).
    srv = servers.start("gunicorn", tmp_path, app="tests.matrix_app:application",
                        args=("-k", worker, "-w", "2"), heartbeat=0.5,
                        env={"MATRIX_FRAMEWORK": "flask", "WSGI_HIJACK_ALLOW_LOCAL_BUS": "1"})
    try:
        seen = set()
        deadline = time.monotonic() + 10
        while len(seen) < 2:
            assert time.monotonic() < deadline, seen
            info = wire.get_json(srv.port, "/_matrix")
            assert info["adapter"] == f"gunicorn-{worker}" and not info["patched"], info
            seen.add(info["pid"])
        assert "listens on 127.0.0.1" in srv.log()
        assert_clean_log(srv)
    finally:
        srv.stop()
