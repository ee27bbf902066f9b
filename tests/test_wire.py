"""What goes over the wire after a hijack, under real gunicorn and gevent.pywsgi."""

from __future__ import annotations

import socket
import time

from harness import wire
from harness.servers import assert_clean_log
from harness.wire import recv_exactly

DEMO_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nCache-Control: no-cache\r\n"
             b"Connection: close\r\n\r\n")


def recv_beeps(s: socket.socket, count: int = 1, timeout: float = 10) -> bytes:
    """Read until ``count`` heartbeats arrived (a loaded machine may delay rounds)."""
    s.settimeout(timeout)
    buf = b""
    while buf.count(b"BEEP\n") < count:
        data = s.recv(65536)
        assert data, f"closed after {buf!r}"
        buf += data
    return buf


def test_demo_bytes_are_exactly_head_then_beeps(server):
    s = wire.connect(server.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    with s:
        data = recv_beeps(s, 3)
    assert data.startswith(DEMO_HEAD), data
    beeps = data[len(DEMO_HEAD):]
    assert beeps == b"BEEP\n" * (len(beeps) // 5), beeps
    assert len(beeps) // 5 >= 2
    assert b"HTTP/1.1" not in beeps  # no second response
    time.sleep(0.3)
    assert_clean_log(server)


def test_plain_gunicorn_command_line_works(start_server):
    # `gunicorn -k gevent wsgi_hijack:app`, no config file at all.
    server = start_server("gunicorn-plain", app="wsgi_hijack:app", heartbeat=0.3)
    with wire.connect(server.port, b"GET / HTTP/1.0\r\n\r\n") as s:
        data = recv_beeps(s)
    assert data.startswith(DEMO_HEAD) and data.endswith(b"BEEP\n"), data
    assert_clean_log(server)


def test_demo_routes(server):
    assert server.get("/nope")[0] == 404
    with wire.connect(server.port, b"POST / HTTP/1.0\r\nContent-Length: 0\r\n\r\n") as s:
        s.settimeout(5)
        reply = s.recv(4096)
    assert reply.split(b" ", 2)[1] == b"405", reply
    assert b"Allow: GET, HEAD" in reply
    with wire.connect(server.port, b"HEAD / HTTP/1.0\r\n\r\n") as s:
        s.settimeout(5)
        reply = s.recv(4096)
    assert reply.split(b" ", 2)[1] == b"200" and reply.endswith(b"\r\n\r\n"), reply


def test_partial_hijack_through_wrapping_middleware(server):
    # The inner middleware adds a header via start_response and wraps the body:
    # the head written must carry its header, and nothing else may follow.
    with wire.connect(server.port, b"GET /wrapped HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        data = recv_beeps(s)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nX-Inner: 1" in head
    assert rest and rest == b"BEEP\n" * (len(rest) // 5)
    assert_clean_log(server)


def test_full_hijack_gets_bytes_sent_behind_the_head(server):
    # The client sends the request and more bytes in one segment: the server
    # reads them with the head, and the hijacked socket must still yield them.
    with wire.connect(server.port,
                      b"GET /echo-full HTTP/1.1\r\nHost: x\r\n\r\npipelined-bytes") as s:
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Connection: close\r\n\r\n")
        assert recv_exactly(s, len(head)) == head
        assert recv_exactly(s, len(b"pipelined-bytes")) == b"pipelined-bytes"
        s.sendall(b"later")
        assert recv_exactly(s, 5) == b"later"
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(100) == b""  # the app closed it, the server wrote nothing else
    assert_clean_log(server)


def test_partial_hijack_gets_bytes_sent_behind_the_head(server):
    with wire.connect(server.port, b"GET /echo-partial HTTP/1.1\r\nHost: x\r\n\r\nearly") as s:
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Connection: close\r\nX-Partial: yes\r\n\r\n")
        assert recv_exactly(s, len(head)) == head
        assert recv_exactly(s, 5) == b"early"
        s.sendall(b"more")
        assert recv_exactly(s, 4) == b"more"
    assert_clean_log(server)


def test_hijack_handed_over_from_an_os_thread(start_server):
    # Heartbeat 60 s: if the handover waited for the reactor's next round
    # instead of waking the hub, "from-thread" would not come for a minute.
    server = start_server("gunicorn", heartbeat=60)
    with wire.connect(server.port, b"GET /thread HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        s.settimeout(10)
        data = b""
        while b"from-thread\n" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        assert data == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        b"Connection: close\r\n\r\nfrom-thread\n"), data
    assert server.stats()["adopted"] == 1
    assert_clean_log(server)


def test_pipelined_second_request_is_not_answered_by_the_server(server):
    # A keep-alive server would parse this as a second request and answer it.
    req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with wire.connect(server.port, req + req) as s:
        data = recv_beeps(s, 2)
    assert data.count(b"HTTP/1.1") == 1, data
    assert_clean_log(server)


def test_reactor_starts_in_each_worker_after_fork(start_server):
    # --preload imports the app in the master before forking two workers: each
    # worker must still get its own running reactor (started after the fork).
    server = start_server("gunicorn", heartbeat=0.3, args=("--preload", "--workers", "2"),
                          env={"WSGI_HIJACK_ALLOW_LOCAL_BUS": "1"})
    pids = set()
    for _ in range(40):
        pids.add(server.stats()["pid"])
        if len(pids) == 2:
            break
    socks = [wire.connect(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") for _ in range(20)]
    for s in socks:
        with s:
            data = recv_beeps(s)
            assert data.startswith(DEMO_HEAD) and data.endswith(b"BEEP\n"), data
    def round_loggers():
        return {line.split("] [")[1] for line in server.log().splitlines()
                if "Number of clients connected" in line}

    deadline = time.monotonic() + 10
    while len(round_loggers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(round_loggers()) == 2, server.log()
    assert_clean_log(server)


def test_partial_hijack_registered_before_start_response(server):
    with wire.connect(server.port, b"GET /framework HTTP/1.1\r\nHost: x\r\n\r\n") as s:
        data = recv_beeps(s)
    assert data.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                           b"Connection: close\r\n\r\nBEEP\n"), data
    assert b"never sent" not in data


def test_partial_hijack_without_a_head_is_a_clear_500(server):
    # The app's bug surfaces as the server's own 500 with our message in its
    # log; the connection was never taken, so the server can still answer.
    with wire.connect(server.port, b"GET /no-head HTTP/1.0\r\n\r\n") as s:
        s.settimeout(5)
        data = s.recv(4096)
    assert data.split(b" ", 2)[1] == b"500", data
    time.sleep(0.2)
    assert "partial hijack without start_response" in server.log()
