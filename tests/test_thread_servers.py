"""The hijack API on servers whose handlers are OS threads (gunicorn sync and
gthread, Werkzeug, uWSGI): plain sockets, read-ahead bytes kept, keep-alive,
and a worker left clean after many hijacks (tests/thread_apps.py)."""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from .conftest import assert_clean_log
from .test_matrix import servers_for

APP = "tests.thread_apps:app"
THREAD_SERVERS = ["gunicorn-gthread", "gunicorn-sync", "werkzeug", "werkzeug-debug", "uwsgi"]


@pytest.fixture
def serve(tmp_path):
    yield from servers_for(tmp_path)


def connect(srv, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(data)
    return s


def read_head(s: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        assert data, f"closed after {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def recv_exactly(s: socket.socket, n: int, buf: bytes = b"") -> bytes:
    while len(buf) < n:
        data = s.recv(65536)
        assert data, f"closed after {buf!r}"
        buf += data
    return buf


def get_json(srv, path: str) -> dict:
    with connect(srv, f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode()) as s:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], data
    return json.loads(body)


@pytest.mark.parametrize("server", THREAD_SERVERS)
def test_full_hijack_gives_a_plain_socket_and_the_bytes_read_ahead(serve, server):
    srv = serve(None, server, APP)
    info = get_json(srv, "/_probe")
    assert info["hijackable"] is True and info["patched"] is False, info
    if server == "uwsgi":  # read-ahead stays in uWSGI's C buffers: GET only, nothing behind
        request = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
        expected_read, behind = b"", b""
    else:  # the app reads 5 of 10 body bytes; the rest and a pipelined tail come first
        request = (b"POST /echo?read=5 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"
                   b"HELLOworld" + b"PIPELINED")
        expected_read, behind = b"HELLO", b"worldPIPELINED"
    with connect(srv, request) as s:
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
    with connect(srv, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n") as s:
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
        with connect(srv, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n") as s:
            head, rest = read_head(s)
            s.sendall(b"%d" % i)
            assert recv_exactly(s, len(b"%d" % i), rest) == b"%d" % i

    one(-1)  # the first hijack starts the reactor (its epoll and wake-up fds)
    time.sleep(0.2)
    before = get_json(srv, "/_probe")
    for i in range(40):
        one(i)
    deadline = time.monotonic() + 10
    while (after := get_json(srv, "/_probe"))["fds"] > before["fds"]:
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
    from .conftest import ROOT, Server, free_port, server_env

    port = free_port()
    env = server_env(0.5)
    env.update(MATRIX_FRAMEWORK="flask", WSGI_HIJACK_ALLOW_LOCAL_BUS="1")
    srv = Server([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                  "-k", worker, "-w", "2", "-b", f"127.0.0.1:{port}", "--no-control-socket",
                  "tests.matrix_app:application"], port, env, tmp_path)
    try:
        seen = set()
        deadline = time.monotonic() + 10
        while len(seen) < 2:
            assert time.monotonic() < deadline, seen
            info = get_json(srv, "/_matrix")
            assert info["adapter"] == f"gunicorn-{worker}" and not info["patched"], info
            seen.add(info["pid"])
        assert "listens on 127.0.0.1" in srv.log()
        assert_clean_log(srv)
    finally:
        srv.stop()
