"""The lobby's scan of a split head: each byte peeked and scanned once.

A client may send its request head (or its TLS hello) one byte per segment.
The lobby looks at each segment as it arrives; it must not copy and scan the
whole head again each time, which costs the square of the head's size
(issue 22). Here a lobby runs in this process on a real loopback listener,
and every ``MSG_PEEK`` it makes is counted by the socket class it peeks
through, so the count does not rely on the lobby's own stats. Each byte is
sent only once the lobby has looked at the one before, so every byte is a
look of its own whatever the machine's speed. (Bytes the receiver peeks at but
does not read are acknowledged late, so a trickle on loopback runs at a few
hundred bytes a second: the heads here are small.)
"""

from __future__ import annotations

import socket
import time

import gevent
import pytest

from wsgi_hijack import lobby_scan
from wsgi_hijack.lobby import MAX_HEAD, Lobby

pytestmark = pytest.mark.unit

_stdsocket = socket.socket


class PeekCounter(_stdsocket):
    """The lobby's socket class with every peek counted (bytes and calls)."""

    peeked = 0
    peeks = 0

    def recv(self, size, flags=0):
        data = super().recv(size, flags)
        if flags & socket.MSG_PEEK:
            PeekCounter.peeked += len(data)
            PeekCounter.peeks += 1
        return data


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(lobby_scan, "_stdsocket", PeekCounter)
    PeekCounter.peeked = PeekCounter.peeks = 0
    return PeekCounter


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """Let the lobby's greenlet run until ``condition()``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.0005)


class Running:
    """A Lobby on a loopback listener; ``handed`` gets what each handed-over
    connection had sent when it was handed over (read by the handoff)."""

    def __init__(self, tls: bool = False) -> None:
        self.listener = _stdsocket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.handed: list[bytes] = []
        self.rcvbufs: list[int] = []
        self.lobby = Lobby([self.listener], self._handoff, head_timeout=60,
                           room=lambda: 100, socket_class=_stdsocket, tls=tls).start()

    def _handoff(self, sock, listener) -> bool:
        self.handed.append(sock.recv(1 << 20))  # all there is: the head is in
        self.rcvbufs.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        sock.close()
        return True

    def connect(self) -> socket.socket:
        client = socket.create_connection(self.listener.getsockname(), timeout=10)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted = self.lobby.stats["accepted"]
        wait_until(lambda: self.lobby.stats["accepted"] > accepted, "the accept")
        return client

    def trickle(self, client: socket.socket, data: bytes) -> None:
        """``data`` one byte per segment, each looked at before the next goes."""
        for i in range(len(data)):
            peeks = PeekCounter.peeks
            client.send(data[i:i + 1])
            wait_until(lambda before=peeks: PeekCounter.peeks > before, f"a look at byte {i}")

    def close(self) -> None:
        self.lobby.close()
        self.listener.close()


@pytest.fixture
def running(counted):
    started: list[Running] = []

    def start(tls: bool = False) -> Running:
        started.append(Running(tls))
        return started[-1]

    yield start
    for r in started:
        r.close()


def padded_head(size: int) -> bytes:
    start, end = b"GET /nope HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def test_a_head_in_one_byte_segments_is_peeked_and_scanned_once(running, counted):
    size = 2000
    head = padded_head(size)
    r = running()

    whole = r.connect()
    whole.sendall(head)
    wait_until(lambda: len(r.handed) == 1, "the whole head to be handed over")
    one_segment = counted.peeked
    assert one_segment == size and r.handed == [head]

    split = r.connect()
    counted.peeked = 0
    r.trickle(split, head)
    wait_until(lambda: len(r.handed) == 2, "the split head to be handed over")
    assert r.handed[1] == head  # untouched: the server reads it from the start
    # Each byte copied out of the kernel once: the same as the head in one
    # segment. Re-peeking the whole buffer at each look costs size**2 / 2
    # (2 MB here).
    assert counted.peeks >= size  # every byte was a look of its own
    assert counted.peeked <= 2 * one_segment, (counted.peeked, one_segment)
    stats = r.lobby.stats
    assert stats["peeked_bytes"] == counted.peeked + one_segment
    assert stats["scanned_bytes"] <= 2 * size + one_segment, stats
    assert stats["handed_over"] == 2 and r.lobby.waiting == 0
    # A head in many segments gets a fixed receive buffer, so that the kernel
    # merges its 1-byte segments: a peek walks the queue up to its offset.
    with open("/proc/sys/net/core/rmem_max") as f:  # what SO_RCVBUF is capped at
        rmem_max = int(f.read())
    assert r.rcvbufs[1] == 2 * min(4 * MAX_HEAD, rmem_max) != r.rcvbufs[0], r.rcvbufs
    whole.close()
    split.close()


def test_an_end_of_head_straddling_segments_is_found(running, counted):
    # Empty lines before the request line are no end of head, even split;
    # "\r\n\r\n" split at each of its positions is one.
    r = running()
    head = b"\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    for cut in range(1, len(head)):
        client = r.connect()
        peeks = counted.peeks
        client.send(head[:cut])
        wait_until(lambda before=peeks: counted.peeks > before, "the first look")
        r.trickle(client, head[cut:])
        wait_until(lambda n=cut: len(r.handed) == n, f"the head cut at {cut}")
        assert r.handed[-1] == head
        client.close()
    assert r.lobby.stats["handed_over"] == len(head) - 1


def test_split_heads_end_as_whole_ones_do(running, counted):
    r = running()
    # Too large: most of the limit at once, the rest byte by byte.
    big = r.connect()
    first = b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 100)
    big.sendall(first)
    r.trickle(big, b"a" * (MAX_HEAD - len(first)))  # the last byte reaches the limit
    wait_until(lambda: r.lobby.stats["too_large"] == 1, "the 431")
    big.settimeout(10)
    assert big.recv(100).startswith(b"HTTP/1.1 431 ")

    # A split partial head, then the client's FIN: 400 (the rest cannot come).
    half = r.connect()
    r.trickle(half, b"GET / HTTP/1.1\r\nHost: x\r\n")
    half.shutdown(socket.SHUT_WR)
    wait_until(lambda: r.lobby.stats["half_closed"] == 1, "the 400")
    half.settimeout(10)
    assert half.recv(100).startswith(b"HTTP/1.1 400 ")

    # A split partial head, then a reset: closed (counted as gone, or as
    # half closed when the reset came with bytes not yet looked at).
    reset = r.connect()
    r.trickle(reset, b"GET / HT")
    ended = r.lobby.stats["gone"] + r.lobby.stats["half_closed"]
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    reset.close()
    wait_until(lambda: r.lobby.stats["gone"] + r.lobby.stats["half_closed"] > ended,
               "the reset to be seen")
    assert r.lobby.waiting == 0

    # A split partial head when the lobby stops: 503, as for a whole one.
    stopped = r.connect()
    r.trickle(stopped, b"GET / HTTP/1.1\r\n")
    r.lobby.close()
    stopped.settimeout(10)
    assert stopped.recv(100).startswith(b"HTTP/1.1 503 ")
    for s in (big, half, stopped):
        s.close()


def test_a_tls_hello_in_one_byte_segments_is_peeked_once(running, counted):
    record = b"\x16\x03\x01" + (1500).to_bytes(2, "big") + bytes(range(250)) * 6
    assert len(record) == 5 + 1500
    r = running(tls=True)
    client = r.connect()
    r.trickle(client, record)
    wait_until(lambda: len(r.handed) == 1, "the hello to be handed over")
    assert r.handed == [record]
    assert counted.peeked <= 2 * len(record), counted.peeked
    client.close()


def test_without_a_kernel_peek_offset_each_byte_is_still_scanned_once(
        running, counted, monkeypatch):
    # Kernels before Linux 6.9 keep no peek offset for TCP: each look peeks
    # the whole buffer again (a copy in the kernel), but scans only what is new.
    monkeypatch.setattr(lobby_scan, "_peek_offset_supported", False)
    size = 1000
    head = padded_head(size)
    r = running()
    client = r.connect()
    r.trickle(client, head)
    wait_until(lambda: len(r.handed) == 1, "the split head to be handed over")
    assert r.handed == [head]
    assert r.lobby.stats["scanned_bytes"] <= 2 * size, r.lobby.stats
    client.close()
