"""The handoff's parts: the state codec (sans-IO) and the fd transport."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgi_hijack.bus.positions import format_position
from wsgi_hijack.handoff import transport
from wsgi_hijack.handoff.codec import (
    HEADER_SIZE,
    ConnectionState,
    HandoffError,
    decode_batch,
    encode_batch,
)

names = st.text(st.characters(whitelist_categories=("L", "N")), min_size=1, max_size=12)
states = st.builds(
    ConnectionState, fd_index=st.just(0), protocol=names,
    request=st.from_regex(r"/[a-z0-9=?&%.]{0,20}", fullmatch=True).map(
        lambda target: f"GET {target} HTTP/1.1"),
    channels=st.lists(names, max_size=3).map(tuple),
    last_id=st.none() | st.integers(0, 1 << 60) | st.dictionaries(
        st.sampled_from(["news", "tick", "a.b"]), st.integers(0, 1 << 60), min_size=1).map(
        format_position), outbuf=st.binary(max_size=200),
    input=st.binary(max_size=50), goodbye=st.binary(max_size=50),
    deadline_in=st.none() | st.floats(0, 1e6),
    protocol_state=st.dictionaries(names, st.integers() | names, max_size=3))


def _numbered(items: list[ConnectionState]) -> list[ConnectionState]:
    for i, item in enumerate(items):
        item.fd_index = i
    return items


@pytest.mark.unit
@given(st.lists(states, max_size=5), st.dictionaries(names, st.integers(), max_size=2))
@settings(max_examples=200, deadline=None)
def test_a_batch_decodes_to_what_was_encoded(items, meta):
    items = _numbered(items)
    assert decode_batch(encode_batch(items, meta), len(items)) == (meta, items)


@pytest.mark.unit
@given(st.lists(states, min_size=1, max_size=3), st.data())
@settings(max_examples=200, deadline=None)
def test_a_truncated_or_corrupted_batch_is_refused_whole(items, data):
    message = encode_batch(_numbered(items))
    cut = data.draw(st.integers(0, len(message) - 1))
    with pytest.raises(HandoffError, match="truncated|magic"):
        decode_batch(message[:cut], len(items))
    spot = data.draw(st.integers(HEADER_SIZE, len(message) - 1))
    flipped = message[:spot] + bytes([message[spot] ^ 0x40]) + message[spot + 1:]
    with pytest.raises(HandoffError, match="corrupted"):
        decode_batch(flipped, len(items))


@pytest.mark.unit
@pytest.mark.parametrize("bad, reason", [
    ({"fd": 5, "protocol": "sse"}, "names fd 5"),
    ({"fd": 0, "protocol": ""}, "protocol must be a name"),
    ({"fd": 0, "protocol": "sse", "request": "GET http://x/ HTTP/1.1"},
     "request must be a request line"),
    ({"fd": 0, "protocol": "sse", "last_id": -1}, "last_id"),
    ({"fd": 0, "protocol": "sse", "last_id": "news=1,news=2"}, "named twice"),
    ({"fd": 0, "protocol": "sse", "last_id": "news=x"}, "last_id"),
    ({"fd": 0, "protocol": "sse", "outbuf": "%%%"}, "base64"),
    ({"fd": 0, "protocol": "sse", "channels": "c"}, "channels"),
    ({"fd": 0, "protocol": "sse", "deadline_in": -2}, "deadline_in"),
])
def test_a_malformed_connection_says_what_is_wrong(bad, reason):
    import json
    import struct
    import zlib

    payload = json.dumps({"meta": {}, "connections": [bad]}).encode()
    message = struct.pack("!4sII", b"WHH1", len(payload), zlib.crc32(payload)) + payload
    with pytest.raises(HandoffError, match=reason):
        decode_batch(message, 1)


@pytest.mark.unit
def test_two_connections_may_not_share_an_fd():
    with pytest.raises(HandoffError, match="same fd"):
        decode_batch(encode_batch([ConnectionState(0, "sse"), ConnectionState(0, "sse")]), 2)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.unit
def test_fds_move_in_chunks_and_still_reach_their_peers():
    """600 socket fds (over two kernel limits per message) arrive and work."""
    pairs = [socket.socketpair() for _ in range(600)]
    giver, taker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    items = [ConnectionState(i, "plain", outbuf=b"x") for i in range(len(pairs))]
    message = encode_batch(items, {"from": "test"})
    result: dict = {}

    def give() -> None:
        result["taken"] = transport.give(giver, [a.fileno() for a, _ in pairs], message)

    thread = threading.Thread(target=give)
    thread.start()
    fds, received = transport.take(taker, max_fds=1000)
    meta, decoded = decode_batch(received, len(fds))
    transport.accept_answer(taker, len(decoded))
    thread.join()
    try:
        assert result["taken"] == 600 and meta == {"from": "test"} and decoded == items
        for fd, (_, peer_end) in zip(fds, pairs, strict=True):
            os.write(fd, b"moved")
            assert peer_end.recv(5) == b"moved"
    finally:
        for fd in fds:
            os.close(fd)
        _close(*(end for pair in pairs for end in pair), giver, taker)


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        sock.close()


@pytest.mark.unit
def test_a_refusal_reaches_the_giver_and_leaks_no_fd():
    pairs = [socket.socketpair() for _ in range(300)]
    giver, taker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = _open_fds()
    errors: list[Exception] = []

    def give() -> None:
        try:
            transport.give(giver, [a.fileno() for a, _ in pairs],
                           encode_batch([ConnectionState(i, "sse") for i in range(300)]))
        except HandoffError as exc:
            errors.append(exc)

    thread = threading.Thread(target=give)
    thread.start()
    with pytest.raises(HandoffError, match="no room"):
        transport.take(taker, max_fds=100)
    transport.refuse(taker, "no room for 300 connections")
    thread.join()
    try:
        assert "successor refused: no room for 300" in str(errors[0])
        assert _open_fds() == before  # the taker closed all it had received
        for a, b in pairs:  # and the giver still holds every connection
            a.sendall(b"k")
            assert b.recv(1) == b"k"
    finally:
        _close(*(end for pair in pairs for end in pair), giver, taker)


@pytest.mark.unit
def test_a_giver_gone_mid_handoff_leaves_nothing_open():
    pairs = [socket.socketpair() for _ in range(10)]
    giver, taker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    before = _open_fds()
    socket.send_fds(giver, [b"F"], [a.fileno() for a, _ in pairs])
    giver.close()
    with pytest.raises(HandoffError, match="closed mid-handoff"):
        transport.take(taker, max_fds=100)
    assert _open_fds() == before - 1  # the giver's end is closed; nothing received stays
    taker.close()
    for a, b in pairs:
        a.close()
        b.close()


def test_the_socket_is_this_users_only():
    """0600 on the socket, and the peer's uid checked: another user cannot hand over."""
    import shutil
    import tempfile

    where = tempfile.mkdtemp(dir="/tmp")  # a directory anyone may enter: the socket decides
    os.chmod(where, 0o755)
    path = os.path.join(where, "handoff.sock")
    server = transport.listen(path)
    server.settimeout(20)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a stranger: nobody
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            os.write(write, b"connected")
        except PermissionError:
            os.write(write, b"refused")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"refused"
    os.chmod(path, 0o666)  # even with the file open to all, the credentials are checked
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                s.recv(1)
        finally:
            os._exit(0)
    conn, _ = server.accept()
    with pytest.raises(HandoffError, match="uid 65534"):
        transport.take(conn, max_fds=10)
    conn.close()
    os.waitpid(pid, 0)
    server.close()
    os.close(read)
    os.close(write)
    shutil.rmtree(where)


@pytest.mark.unit
@given(st.integers(0, 5000), st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_connections_are_spread_evenly_each_once(count, takers):
    from wsgi_hijack.handoff.successors import spread

    shares = spread(count, takers)
    assert len(shares) == takers
    assert sorted(i for share in shares for i in share) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_successors_are_the_live_workers_started_later(tmp_path):
    import subprocess
    import sys
    import time

    from wsgi_hijack.handoff.successors import start_time, successors

    older = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.05)  # a clock tick apart at least
    giver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.05)
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        assert start_time(older.pid) <= start_time(giver.pid) <= start_time(newer.pid)
        for proc in (older, giver, newer, gone):
            (tmp_path / f"worker-{proc.pid}.sock").touch()
        (tmp_path / "master-1.sock").touch()
        found = successors(tmp_path, giver.pid)
        assert [pid for pid, _ in found] == [newer.pid]
        assert found[0][1] == tmp_path / f"worker-{newer.pid}.sock"
    finally:
        for proc in (older, giver, newer):
            proc.kill()
            proc.wait()
