"""Hostile and broken input: slow heads, chatty stream clients, fuzzed requests,
protocol bugs. None of it may cost another client its data or kill the reactor."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import servers, wire
from harness.clients import published_id
from harness.wire import read_until, recv_until_closed


def test_protocol_bug_costs_only_its_connection(start_server):
    server = start_server("gunicorn", heartbeat=0.3)
    with wire.request(server.port, "/_buggy") as bad, wire.request(server.port, "/") as good:
        read_until(bad, b"\r\n\r\n")
        read_until(good, b"\r\n\r\n")
        bad.sendall(b"anything")
        recv_until_closed(bad, 5)  # closed by the reactor
        data = read_until(good, b"BEEP\n")
        data = read_until(good, b"BEEP\n", data.replace(b"BEEP\n", b"", 1))
    assert "protocol buggy failed on input" in server.log()
    assert server.stats()["dropped_protocol"] == 1


def test_stream_client_that_talks_is_ignored(start_server):
    server = start_server("gunicorn", heartbeat=5)
    with wire.request(server.port, "/events?channel=chatty") as chatty, \
            wire.request(server.port, "/events?channel=chatty") as quiet:
        read_until(chatty, b"retry: 2000\n\n")
        read_until(quiet, b"retry: 2000\n\n")
        junk = b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 4096  # 1 MiB after the hijack
        chatty.sendall(junk)
        msg = published_id(server, "chatty", "still here")
        for s in (chatty, quiet):
            data = read_until(s, b"data: still here\n\n")
            assert f"id: {msg}\n".encode() in data
            assert b"HTTP/1.1" not in data  # the junk was not parsed as a request
    assert "Traceback" not in server.log()


def test_slow_request_heads_do_not_tie_up_the_worker(start_server):
    # A request head must be complete within 2 s of the connect; until then it
    # waits in the lobby, with no greenlet and no pool slot.
    server = start_server("gunicorn", heartbeat=5, env={"WSGI_HIJACK_HEAD_TIMEOUT": "2"})
    slow = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\n")
        slow.append(s)
    for _ in range(5):  # dribble one header byte at a time
        for s in slow:
            try:
                s.sendall(b"X")
            except OSError:
                pass
        status, _, _ = server.get("/nope", timeout=5)  # ordinary requests are served
        assert status == 404
        time.sleep(0.3)
    timed_out = 0
    for s in slow:
        s.settimeout(10)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        timed_out += data.startswith(b"HTTP/1.1 408 ")
        s.close()
    assert timed_out == 300  # every slow head was given up on, with an answer
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    # A long-poll with nothing to answer is held until its deadline: short
    # here, so that every fuzzed request gets its head within the read timeout.
    server = servers.start("gunicorn", tmp_path_factory.mktemp("fuzz"), app="tests.apps:app",
                           heartbeat=5, env={"WSGI_HIJACK_POLL_TIMEOUT": "2"})
    yield server
    server.stop()


TOKEN = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="% "),
                max_size=30)
PATH = st.one_of(st.sampled_from(["/", "/events", "/poll", "/stream", "/publish", "/metrics",
                                  "/nope"]), TOKEN.map(lambda t: "/" + t))
QUERY = st.lists(st.tuples(st.sampled_from(["channel", "since", "event", "x", ""]),
                           st.text(max_size=20)), max_size=4)
METHOD = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "BREW"])
HEADER = st.tuples(st.sampled_from(["Last-Event-ID", "Authorization", "Content-Type",
                                    "X-Anything", "Origin"]),
                   st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHOD, path=PATH, query=QUERY, headers=st.lists(HEADER, max_size=3),
       body=st.binary(max_size=200))
def test_fuzzed_requests_never_get_a_5xx(fuzz_server, method, path, query, headers, body):
    from urllib.parse import quote

    qs = "&".join(f"{quote(k)}={quote(v)}" for k, v in query)
    target = path + ("?" + qs if qs else "")
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost", "Connection: close",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=10) as s:
        s.sendall(request)
        head = read_until(s, b"\r\n", eof_ok=True)
    assert head.startswith(b"HTTP/1."), (request, head)
    status = int(head.split(b" ", 2)[1])
    assert status < 500, (request, head)


def test_fuzzing_left_no_error_in_the_log(fuzz_server):
    assert fuzz_server.get("/nope")[0] == 404
    log = fuzz_server.log()
    assert "Traceback" not in log and "[ERROR]" not in log, log[-3000:]
