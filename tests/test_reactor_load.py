"""The reactor under load, in a real gunicorn worker: capacity, slow and dead clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness import wire
from harness.servers import assert_clean_log

HERE = Path(__file__).parent


def open_streams(server, count: int, path: str = "/") -> list[socket.socket]:
    return wire.open_streams(server.port, count, path)


def read_head(s: socket.socket) -> bytes:
    """The bytes after the head."""
    return wire.read_head(s)[1]


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def fd_count(pid: int) -> int:
    """Socket fds of the process (files such as metrics' mmaps come and go)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count


def test_thousand_connections_with_worker_connections_100(start_server):
    server = start_server("gunicorn", heartbeat=0.5, args=("--worker-connections", "100"))
    socks = open_streams(server, 1000)
    try:
        rests = [read_head(s) for s in socks]
        assert wait_for(lambda: server.stats()["held"] == 1000, 10)
        # Every one of them gets a heartbeat.
        for s, rest in zip(socks, rests, strict=True):
            s.settimeout(5)
            while b"BEEP\n" not in rest:
                rest += s.recv(64)
        # The pool still has room: an ordinary request is served at once.
        assert server.get("/nope", timeout=5)[0] == 404
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: server.stats()["held"] == 0, 5)
    assert_clean_log(server)


def test_no_greenlet_per_held_connection(server):
    before = server.stats()
    socks = open_streams(server, 500)
    try:
        for s in socks:
            read_head(s)
        assert wait_for(lambda: server.stats()["held"] == 500, 10)
        during = server.stats()
        # A few greenlets may come and go (the stats request itself); 500 may not.
        assert during["greenlets"] - before["greenlets"] < 10, (before, during)
    finally:
        for s in socks:
            s.close()


def test_client_that_never_reads_does_not_delay_others(start_server):
    # /big writes 1 MiB per heartbeat; the stalled client shrinks its receive
    # buffer and never reads, so its kernel buffers fill within a few rounds.
    server = start_server("gunicorn", heartbeat=0.2)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    readers = open_streams(server, 20, "/big")
    rests = [read_head(s) for s in readers]
    assert wait_for(lambda: server.stats()["held"] == 21, 5)
    start_rounds = server.stats()["rounds"]
    received = [len(r) for r in rests]
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        for i, s in enumerate(readers):
            s.setblocking(False)
            try:
                while True:
                    data = s.recv(1 << 20)
                    if not data:
                        break
                    received[i] += len(data)
            except BlockingIOError:
                pass
        time.sleep(0.02)
    stats = server.stats()
    rounds = stats["rounds"] - start_rounds
    assert rounds >= 8, stats
    # Each reader got (nearly) every round's MiB: nobody waited on the staller.
    for got in received:
        assert got // (1 << 20) >= rounds - 2, (got, rounds)
    assert stats["dropped_slow"] == 1, stats
    assert stats["held"] == 20
    stalled.close()
    for s in readers:
        s.close()
    assert_clean_log(server)


def test_killed_clients_leave_no_fds_behind(start_server):
    heartbeat = 3.0
    server = start_server("gunicorn", heartbeat=heartbeat)
    pid = server.stats()["pid"]
    survivors = open_streams(server, 10)
    for s in survivors:
        read_head(s)
    assert wait_for(lambda: server.stats()["held"] == 10, 5)
    baseline = fd_count(pid)
    holder = subprocess.Popen([sys.executable, str(HERE / "hold_clients.py"), str(server.port),
                               "300", "/"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        assert wait_for(lambda: fd_count(pid) >= baseline + 300, 5)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    killed_at = time.monotonic()
    assert wait_for(lambda: fd_count(pid) <= baseline, heartbeat), (fd_count(pid), baseline)
    assert time.monotonic() - killed_at <= heartbeat
    # The survivors still get every heartbeat after the others died.
    stats = server.stats()
    assert stats["held"] == 10 and stats["dropped_closed"] == 300, stats
    for s in survivors:
        s.settimeout(3)
        data = b""
        while b"BEEP\n" not in data:
            data += s.recv(64)
        s.close()
    assert_clean_log(server)


def test_broken_clients_in_the_middle_do_not_stop_the_round(start_server):
    # The seed's rescue around the whole loop stopped every write after the
    # first broken socket. Reset half the clients (RST, not FIN), then check
    # that every survivor, before and after them in the set, still hears beats.
    server = start_server("gunicorn", heartbeat=0.3)
    socks = open_streams(server, 100)
    for s in socks:
        read_head(s)
    assert wait_for(lambda: server.stats()["held"] == 100, 5)
    for s in socks[::2]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    for s in socks[1::2]:
        s.settimeout(3)
        s.recv(65536)  # drain what is already there
        data = b""
        while b"BEEP\n" not in data:
            data += s.recv(64)
    assert wait_for(lambda: server.stats()["held"] == 50, 3)
    for s in socks[1::2]:
        s.close()
    assert_clean_log(server)
