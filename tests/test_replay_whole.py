"""A replay arrives whole, however large, on every protocol (issue 22, item 2).

What a client missed is written as its socket drains, not all at once: on a
real network (a 1400-byte MSS) behind a slow reader, the part the kernel
does not take at once used to count against the per-connection cap, and
the stream was cut as "slow" after about 79 KB. Long-poll answers are pages
(a client far behind catches up over several polls, each answer whole).

The clients here set ``TCP_MAXSEG`` to 1400 and a small receive buffer
before connecting, wait before reading (so the server meets a full socket),
then read in small pieces.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from websockets.sync.client import connect as ws_connect

from harness import wire
from harness.clients import published_id, wait_for

MSS = 1400
SMALL = [f"{i:04d}" + "s" * 2044 for i in range(100)]  # 100 x 2 KB
LARGE = [f"{i:04d}" + "L" * 59996 for i in range(3)]  # 3 x 60 KB


def _slow_socket() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(30)
    return s


def _slow_request(port: int, target: str, headers: str = "") -> socket.socket:
    s = _slow_socket()
    s.connect((wire.HOST, port))
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    time.sleep(0.5)  # the server writes the replay into a socket that is not read yet
    return s


def _read_slowly(s: socket.socket, done, buf: bytes = b"") -> bytes:
    """Read 2 KB at a time until ``done(buf)``."""
    while not done(buf):
        data = s.recv(2048)
        if not data:
            raise wire.Closed(f"closed after {len(buf)} bytes")
        buf += data
    return buf


@pytest.fixture
def demo(start_server):
    # Heartbeats rare: only the replay is on the wire.
    return start_server("gunicorn", heartbeat=30, app="wsgi_hijack:app")


def _publish_all(server, channel: str, payloads: list[str]) -> list[int]:
    return [published_id(server, channel, data) for data in payloads]


@pytest.mark.parametrize("payloads", [SMALL, LARGE], ids=["100x2KB", "3x60KB"])
def test_sse_replay_arrives_whole(demo, payloads):
    ids = _publish_all(demo, "r", payloads)
    s = _slow_request(demo.port, "/events?channel=r", "Last-Event-ID: 0\r\n")
    with s:
        last = f"id: {ids[-1]}\n".encode()
        buf = _read_slowly(s, lambda b: last in b and b.endswith(b"\n\n"))
    events = [e for e in buf.split(b"\r\n\r\n", 1)[1].split(b"\n\n") if e.startswith(b"id:")]
    got = [(int(e.split(b"\n")[0][4:]), e.split(b"\n")[1][6:].decode()) for e in events]
    assert got == list(zip(ids, payloads, strict=True))


@pytest.mark.parametrize("payloads", [SMALL, LARGE], ids=["100x2KB", "3x60KB"])
def test_chunked_replay_arrives_whole(demo, payloads):
    _publish_all(demo, "c", payloads)
    s = _slow_request(demo.port, "/stream?channel=c", "Last-Event-ID: 0\r\n")
    with s:
        head, buf = wire.read_head(s)
        messages: list[str] = []
        while len(messages) < len(payloads):
            buf = _read_slowly(s, lambda b: b"\r\n" in b, buf)
            size_line, rest = buf.split(b"\r\n", 1)
            size = int(size_line, 16)
            rest = _read_slowly(s, lambda b: len(b) >= size + 2, rest)  # noqa: B023
            chunk, buf = rest[:size], rest[size + 2:]
            if chunk != b"\n":  # a heartbeat
                messages.append(chunk.decode().rstrip("\n"))
    assert b"chunked" in head.lower()
    assert messages == payloads


@pytest.mark.parametrize("payloads", [SMALL, LARGE], ids=["100x2KB", "3x60KB"])
def test_websocket_replay_arrives_whole(demo, payloads):
    ids = _publish_all(demo, "w", payloads)
    s = _slow_socket()
    s.connect((wire.HOST, demo.port))
    with ws_connect(f"ws://{wire.HOST}:{demo.port}/ws?channel=w&last_id=0", sock=s,
                    origin=f"http://{wire.HOST}:{demo.port}", max_size=None) as ws:
        got = []
        while len(got) < len(payloads):
            message = json.loads(ws.recv(timeout=30))
            if "id" in message:
                got.append((message["id"], message["data"]))
    assert got == list(zip(ids, payloads, strict=True))


@pytest.mark.parametrize("payloads", [SMALL, LARGE], ids=["100x2KB", "3x60KB"])
def test_long_poll_pages_are_whole_and_catch_up(demo, payloads):
    """Each answer matches its Content-Length; polling on from each answer's
    ``last_id`` yields every message once."""
    ids = _publish_all(demo, "p", payloads)
    since, got, polls = 0, [], 0
    while len(got) < len(payloads):
        s = _slow_request(demo.port, f"/poll?channel=p&since={since}")
        with s:
            head, body = wire.read_head(s)
            length = int(wire.parse_head(head)[1]["content-length"])
            body = _read_slowly(s, lambda b: len(b) >= length, body)  # noqa: B023
            assert s.recv(1) == b""  # then the server closes: nothing more, nothing cut
        answer = json.loads(body[:length])
        assert answer["messages"], answer  # something new each time
        got += [(m["id"], m["data"]) for m in answer["messages"]]
        since = answer["last_id"]
        polls += 1
    assert got == list(zip(ids, payloads, strict=True))
    assert polls > 1  # more than a page missed: it came in pages


def test_unread_long_poll_answer_is_reaped(start_server):
    """A long-poll whose answer is never read is closed after the poll timeout,
    not held forever."""
    # One page holds all of it: far more than the socket buffers take.
    server = start_server("gunicorn", heartbeat=30, env={"WSGI_HIJACK_POLL_TIMEOUT": "1",
                                                         "WSGI_HIJACK_MAX_BUFFER": "8000000"})
    for data in LARGE * 40:
        published_id(server, "q", data)
    s = _slow_request(server.port, "/poll?channel=q&since=0")
    with s:
        wait_for(lambda: server.stats()["dropped_slow"] >= 1, "the unread answer reaped", 30)
        wait_for(lambda: server.stats()["held"] == 0, "nothing held", 10)
