"""Operating limits: admission at the fd limit, the per-address cap."""

from __future__ import annotations

import socket
import time


def get_head(port: int, path: str, source: str | None = None) -> tuple[socket.socket, bytes]:
    s = socket.socket()
    if source:
        s.bind((source, 0))
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(4096)
        if not data:
            break
        buf += data
    return s, buf


def test_full_worker_refuses_with_503_and_keeps_serving(start_server):
    # fd limit 2,000 (soft and hard), reserve 100: at most 1,900 held.
    server = start_server("gunicorn", heartbeat=1, nofile=2000)
    held, refused = [], []
    for i in range(2500):
        s, head = get_head(server.port, "/events?channel=full")
        if head.startswith(b"HTTP/1.1 200"):
            held.append(s)
        else:
            assert head.startswith(b"HTTP/1.1 503"), head
            assert b"Retry-After: 2" in head, head
            refused.append(s)
            s.close()
        if i % 200 == 199:
            time.sleep(0.02)
    assert len(held) == 1900, (len(held), len(refused))
    assert len(refused) == 600
    # Ordinary requests still work while full.
    status, _, body = server.get("/nope")
    assert status == 404
    stats = server.stats()
    assert stats["held"] == 1900 and stats["refused"] == 600
    # Room again once clients leave.
    for s in held[:100]:
        s.close()
    deadline = time.monotonic() + 10
    while server.stats()["held"] > 1800:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    s, head = get_head(server.port, "/events?channel=full")
    assert head.startswith(b"HTTP/1.1 200"), head
    s.close()
    for s in held[100:]:
        s.close()
    log = server.log()
    assert "EMFILE" not in log and "Too many open files" not in log
    assert "Traceback" not in log


def test_per_address_cap_answers_429(start_server):
    server = start_server("gunicorn", heartbeat=5, env={"WSGI_HIJACK_MAX_PER_IP": "3"})
    mine = [get_head(server.port, "/events?channel=ip", "127.0.0.2") for _ in range(3)]
    assert all(head.startswith(b"HTTP/1.1 200") for _, head in mine)
    s, head = get_head(server.port, "/events?channel=ip", "127.0.0.2")
    assert head.startswith(b"HTTP/1.1 429") and b"Retry-After" in head, head
    s.close()
    # Another address is not affected.
    other, head = get_head(server.port, "/", "127.0.0.3")
    assert head.startswith(b"HTTP/1.1 200"), head
    # A slot frees when one of the first three leaves.
    mine[0][0].close()
    deadline = time.monotonic() + 5
    while True:
        s, head = get_head(server.port, "/events?channel=ip", "127.0.0.2")
        if head.startswith(b"HTTP/1.1 200"):
            break
        s.close()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for sock in [s, other] + [m[0] for m in mine[1:]]:
        sock.close()
    assert "Traceback" not in server.log()
