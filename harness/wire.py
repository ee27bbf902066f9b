"""Raw-socket helpers for talking HTTP to a server under test.

Tests and benchmarks speak to servers with plain sockets rather than an HTTP
client when they need to see the bytes as they arrive (a response head before
its streamed body, SSE events one by one, what was left in the socket after a
hijack) or to send what no client library would. These are the few loops that
everybody needs; each returns the bytes it read past what it looked for, so
that nothing read ahead is lost.
"""

from __future__ import annotations

import json
import socket
import time

HOST = "127.0.0.1"
END_OF_HEAD = b"\r\n\r\n"


class Closed(ConnectionError):
    """The peer closed the connection before what we were reading for arrived."""


def connect(port: int, data: bytes = b"", timeout: float = 10.0,
            source: str | None = None) -> socket.socket:
    """A blocking TCP connection to 127.0.0.1:``port`` with a timeout, ``data``
    sent. ``source``: the client address to bind to first (127.0.0.x: each
    address has its own ephemeral ports, and a per-address limit sees it apart)."""
    s = socket.socket()
    try:
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect((HOST, port))
        if data:
            s.sendall(data)
    except BaseException:
        s.close()
        raise
    return s


def request(port: int, target: str, headers: str = "", method: str = "GET",
            timeout: float = 10.0, source: str | None = None) -> socket.socket:
    """Send an HTTP/1.1 request head (``headers``: extra ``Name: value\\r\\n``
    lines) and return the socket, the response unread: the caller reads it
    at its own pace, e.g. a stream that never ends."""
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
    return connect(port, head.encode(), timeout, source)


def open_streams(port: int, count: int, path: str = "/", timeout: float = 20.0,
                 source: str | None = None) -> list[socket.socket]:
    """``count`` connections, each sent ``GET path``, responses unread. A pause
    every 100 connects: the listen backlog is finite, and this is not a storm.
    ``source``: the client address to bind to (127.0.0.x) before connecting."""
    socks = []
    for i in range(count):
        socks.append(request(port, path, timeout=timeout, source=source))
        if i % 100 == 99:
            time.sleep(0.01)
    return socks


def read_until(s: socket.socket, needle: bytes, buf: bytes = b"",
               eof_ok: bool = False) -> bytes:
    """Read until ``needle`` is in what was read (``buf``: bytes already read).

    Returns everything read, ``buf`` included. A close before the needle
    raises :class:`Closed`, or, with ``eof_ok``, returns what came."""
    while needle not in buf:
        data = s.recv(65536)
        if not data:
            if eof_ok:
                return buf
            raise Closed(f"closed before {needle!r}: {buf!r}")
        buf += data
    return buf


def read_within(s: socket.socket, needle: bytes, buf: bytes = b"",
                seconds: float = 20) -> bytes:
    """:func:`read_until`, for a stream that may have only heartbeats: fails
    after ``seconds`` instead of reading them forever."""
    deadline = time.monotonic() + seconds
    while needle not in buf:
        assert time.monotonic() < deadline, f"no {needle!r} in {buf[-1500:]!r}"
        data = s.recv(65536)
        if not data:
            raise Closed(f"closed before {needle!r}: {buf!r}")
        buf += data
    return buf


def read_head(s: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """Read to the end of a response head: (the head without its blank line,
    the bytes read after it). Raises :class:`Closed` if the peer closes first."""
    head, _, rest = read_until(s, END_OF_HEAD, buf).partition(END_OF_HEAD)
    return head, rest


def recv_exactly(s: socket.socket, n: int, buf: bytes = b"") -> bytes:
    """Read until ``n`` bytes are in hand (``buf`` counts), never more than
    that from the socket: what follows stays there for the next read."""
    while len(buf) < n:
        data = s.recv(n - len(buf))
        if not data:
            raise Closed(f"closed after {buf!r}, wanted {n} bytes")
        buf += data
    return buf


def recv_until_closed(s: socket.socket, timeout: float | None = None) -> bytes:
    """Everything the peer sends until it closes (``timeout`` per recv)."""
    if timeout is not None:
        s.settimeout(timeout)
    chunks = []
    while data := s.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """The status code and the headers (names lower-cased) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
    return status, headers


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """A plain ``GET`` over HTTP/1.0, so the server closes after the body:
    status, headers, body. No client library, so it works from any process,
    patched by gevent or not, and against any server."""
    with connect(port, f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode(),
                 timeout) as s:
        data = recv_until_closed(s)
    if not data.startswith(b"HTTP/"):
        raise Closed(f"GET {path}: no HTTP answer: {data[:300]!r}")
    head, _, body = data.partition(END_OF_HEAD)
    status, headers = parse_head(head)
    return status, headers, body


def get_json(port: int, path: str, timeout: float = 10.0) -> dict:
    """``GET path`` that must answer 200 with JSON; raises ``RuntimeError`` otherwise."""
    status, _, body = http_get(port, path, timeout)
    if status != 200:
        raise RuntimeError(f"{path}: {status} {body[:300]!r}")
    return json.loads(body)

