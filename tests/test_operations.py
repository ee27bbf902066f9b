"""Operating limits: admission at the fd limit, the per-address cap."""

from __future__ import annotations

import socket
import time

from harness import wire


def get_head(port: int, path: str, source: str | None = None) -> tuple[socket.socket, bytes]:
    s = wire.request(port, path, timeout=20, source=source)
    return s, wire.read_until(s, wire.END_OF_HEAD, eof_ok=True)


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


class ReconnectingSSE:
    """An EventSource-like raw client: on close, reconnects with Last-Event-ID."""

    def __init__(self, port: int, channel: str) -> None:
        self.port, self.channel = port, channel
        self.ids: list[int] = []
        self.reconnects = 0
        self.goodbyes = 0
        self.stop = False
        import threading

        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            last = f"Last-Event-ID: {self.ids[-1]}\r\n" if self.ids else ""
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                s.sendall(f"GET /events?channel={self.channel} HTTP/1.1\r\nHost: x\r\n"
                          f"{last}\r\n".encode())
                buf = b""
                while not self.stop:
                    try:
                        data = s.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        break
                    buf += data
                    *blocks, buf = buf.split(b"\n\n")
                    for block in blocks:
                        for line in block.split(b"\n"):
                            if line.startswith(b"id: "):
                                self.ids.append(int(line[4:]))
                            elif line == b"retry: 1000":
                                self.goodbyes += 1
                s.close()
            except OSError:
                pass
            if not self.stop:
                self.reconnects += 1
                time.sleep(0.2)


def test_reload_with_hup_loses_nothing(start_server, redis_server):
    """With handoff off (WSGI_HIJACK_HANDOFF=0), a reload says goodbye: every
    client reconnects with its last id and still gets every message once.
    (With handoff on, nobody reconnects: tests/test_handoff.py.)"""
    import os
    import signal
    import threading

    import httpx

    server = start_server("gunicorn", heartbeat=1,
                          env={"WSGI_HIJACK_REDIS_URL": redis_server.url,
                               "WSGI_HIJACK_HANDOFF": "0"})
    clients = [ReconnectingSSE(server.port, "hup") for _ in range(10)]
    deadline = time.monotonic() + 10
    while server.stats()["held"] < 10:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    published: list[int] = []

    def publisher() -> None:
        for i in range(150):
            for _ in range(50):  # a publish may meet the switch-over: retry it
                try:
                    resp = httpx.post(f"http://127.0.0.1:{server.port}/publish",
                                      params={"channel": "hup"}, content=f"m{i}", timeout=5)
                    if resp.status_code == 202:
                        published.append(resp.json()["id"])
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
            time.sleep(0.02)

    thread = threading.Thread(target=publisher)
    thread.start()
    time.sleep(1.0)
    old_pid = server.stats()["pid"]
    os.kill(server.proc.pid, signal.SIGHUP)  # before, during and after the reload
    thread.join(60)
    assert len(published) == 150
    deadline = time.monotonic() + 15
    while any(len(c.ids) < 150 for c in clients) and time.monotonic() < deadline:
        time.sleep(0.1)
    for c in clients:
        c.stop = True
    assert server.stats()["pid"] != old_pid  # a new worker serves now
    for c in clients:
        assert c.ids == published, (c.reconnects, len(c.ids), len(published), server.log()[-3000:])
        assert c.reconnects >= 1 and c.goodbyes >= 1


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{labels}}} not in:\n{text}")


def test_metrics_sum_over_workers(start_server, redis_server):
    import httpx

    from harness.clients import open_sse, published_id, wait_total_held

    server = start_server("gunicorn", heartbeat=0.3, args=("--workers", "2"),
                          env={"WSGI_HIJACK_REDIS_URL": redis_server.url})
    wait_total_held(server, 2, 0, timeout=20)
    socks = open_sse(server, "metrics", 30)
    seen = wait_total_held(server, 2, 30)
    assert all(seen.values()), seen
    published_id(server, "metrics", "one")
    time.sleep(1.5)  # counters reach prometheus once a second
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    assert _metric(text, "wsgi_hijack_held_connections", 'protocol="sse"') == 30
    assert _metric(text, "wsgi_hijack_hijacks_total", 'result="accepted"') == 30
    assert _metric(text, "wsgi_hijack_messages_published_total") == 1
    assert _metric(text, "wsgi_hijack_messages_delivered_total") == 30
    assert _metric(text, "wsgi_hijack_write_run_seconds_count") >= 2
    for s in socks[:10]:
        s.close()
    time.sleep(1.5)
    text = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    assert _metric(text, "wsgi_hijack_held_connections", 'protocol="sse"') == 20
    assert _metric(text, "wsgi_hijack_dropped_total", 'reason="closed"') == 10
    for s in socks[10:]:
        s.close()
