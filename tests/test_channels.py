"""Channels over real servers: SSE, chunked and long-poll subscribers, publish, replay."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from httpx_sse import connect_sse

from harness import wire
from harness.clients import publish, published_id
from harness.servers import assert_clean_log
from harness.wire import read_until


def base(server) -> str:
    return f"http://127.0.0.1:{server.port}"


def wait_subscribed(server, held: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.stats()["held"] < held:
        assert time.monotonic() < deadline, server.stats()
        time.sleep(0.02)


@pytest.fixture
def gunicorn(start_server):
    return start_server("gunicorn", heartbeat=5)


def test_sse_with_a_third_party_client(server):
    received = []

    def listen():
        with httpx.Client(timeout=10) as client, connect_sse(
                client, "GET", f"{base(server)}/events?channel=news") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            for sse in source.iter_sse():
                if not sse.data:
                    # The retry hint and ": ping" comment blocks dispatch no event
                    # per the standard; httpx-sse yields them (with the last id).
                    continue
                received.append(sse)
                if len(received) == 3:
                    return

    thread = threading.Thread(target=listen)
    thread.start()
    wait_subscribed(server, 1)
    ids = [published_id(server, "news", "hello"),
           published_id(server, "news", "two\nlines\r\nand\rthree", event="update"),
           published_id(server, "news", " leading space and ünïcödé ✓")]
    thread.join(10)
    assert [e.id for e in received] == [str(i) for i in ids], (received, ids)
    assert [e.event for e in received] == ["message", "update", "message"]
    assert [e.data for e in received] == ["hello", "two\nlines\nand\nthree",
                                          " leading space and ünïcödé ✓"]
    assert_clean_log(server)


def test_sse_exact_bytes_on_the_wire(gunicorn):
    with wire.request(gunicorn.port, "/events?channel=wire") as s:
        head = read_until(s, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream")
        wait_subscribed(gunicorn, 1)
        first = published_id(gunicorn, "wire", "a\r\nb\rc\nd", event="x")
        second = published_id(gunicorn, "wire", "")
        data = read_until(s, b"data: \n\n", head)
    body = data.partition(b"\r\n\r\n")[2]
    assert body == (b"retry: 2000\n\n"
                    + f"id: {first}\nevent: x\ndata: a\ndata: b\ndata: c\ndata: d\n\n".encode()
                    + f"id: {second}\ndata: \n\n".encode())


def test_sse_heartbeat_is_a_comment(start_server):
    server = start_server("gunicorn", heartbeat=0.2)
    with wire.request(server.port, "/events?channel=hb") as s:
        data = read_until(s, b": ping\n\n")
    assert data.endswith(b"retry: 2000\n\n: ping\n\n"), data


def test_only_subscribers_of_the_channel_receive(gunicorn):
    with wire.request(gunicorn.port, "/events?channel=a") as sa, \
            wire.request(gunicorn.port, "/events?channel=b") as sb, \
            wire.request(gunicorn.port, "/events?channel=a&channel=b") as sab:
        for s in (sa, sb, sab):
            read_until(s, b"retry: 2000\n\n")
        wait_subscribed(gunicorn, 3)
        ia = published_id(gunicorn, "a", "for a")
        ib = published_id(gunicorn, "b", "for b")
        got_ab = read_until(sab, b"data: for b\n\n")
        got_a = read_until(sa, b"data: for a\n\n")
        got_b = read_until(sb, b"data: for b\n\n")
    assert f"id: {ia}\ndata: for a".encode() in got_ab and b"for b" not in got_a
    assert b"for a" not in got_b and f"id: {ib}".encode() in got_b


def test_publish_rejects_bad_input_and_publishes_nothing(gunicorn):
    with wire.request(gunicorn.port, "/events?channel=ok") as s:
        read_until(s, b"retry: 2000\n\n")
        wait_subscribed(gunicorn, 1)
        before = gunicorn.stats()["messages"]
        url = f"{base(gunicorn)}/publish"
        cases = [
            (httpx.post(url, content=b"x"), 400, "channel"),  # no channel
            (httpx.post(url, params=[("channel", "ok"), ("channel", "b")], content=b"x"), 400,
             "exactly one"),
            (publish(gunicorn, "bad channel!", "x"), 400, "invalid channel"),
            (publish(gunicorn, "x" * 200, "x"), 400, "invalid channel"),
            (publish(gunicorn, "ok", "x", event="a\nid: 999"), 400, "invalid event"),
            (publish(gunicorn, "ok", "x", event=""), 400, "invalid event"),
            (publish(gunicorn, "ok", b"\xff\xfe not utf-8"), 400, "UTF-8"),
            (publish(gunicorn, "ok", b"x" * (64 * 1024 + 1)), 413, "limit"),
            (httpx.get(url, params={"channel": "ok"}), 405, "POST"),
        ]
        for resp, status, reason in cases:
            assert resp.status_code == status, (resp.status_code, resp.text)
            assert reason in resp.text, resp.text
        # One good message after all the bad ones: it is the first and only one.
        good = published_id(gunicorn, "ok", "the only one")
        data = read_until(s, b"data: the only one\n\n")
    assert data.count(b"data:") == 1
    assert gunicorn.stats()["messages"] == before + 1
    assert good >= 1


def test_publish_token(start_server):
    server = start_server("gunicorn", heartbeat=5,
                          env={"WSGI_HIJACK_PUBLISH_TOKEN": "s3cret"})
    assert publish(server, "c", "x").status_code == 401
    assert publish(server, "c", "x", headers={"Authorization": "Bearer nope"}).status_code == 401
    ok = publish(server, "c", "x", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 202 and isinstance(ok.json()["id"], int)


@pytest.mark.unit
def test_publish_rule_refuses_non_loopback_without_token(monkeypatch):
    from wsgi_hijack.demo import may_publish

    monkeypatch.delenv("WSGI_HIJACK_PUBLISH_TOKEN", raising=False)
    assert may_publish({"REMOTE_ADDR": "127.0.0.1"})[0]
    assert may_publish({"REMOTE_ADDR": "::1"})[0]
    allowed, status, reason = may_publish({"REMOTE_ADDR": "192.0.2.10"})
    assert not allowed and status.startswith("403") and "loopback" in reason


def test_subscribe_errors_are_clear_400s(gunicorn):
    for target, reason in [("/events", "no channel"), ("/events?channel=a%20b", "invalid channel"),
                           ("/poll?channel=a&since=abc", "since"),
                           ("/poll?channel=a&since=-1", "since"),
                           # per-channel positions are for Redis Cluster only
                           ("/poll?channel=a&since=a%3D1", "non-negative integer message id")]:
        status, _, body = gunicorn.get(target)
        assert status == 400 and reason.encode() in body, (target, status, body)
    with wire.request(gunicorn.port, "/events?channel=a", "Last-Event-ID: 12x\r\n") as s:
        reply = read_until(s, b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert gunicorn.stats()["held"] == 0


def test_replay_with_last_event_id(gunicorn):
    ids = [published_id(gunicorn, "r", f"m{i}") for i in range(5)]
    with wire.request(gunicorn.port, "/events?channel=r", f"Last-Event-ID: {ids[1]}\r\n") as s:
        data = read_until(s, b"data: m4\n\n")
        wait_subscribed(gunicorn, 1)
        live = published_id(gunicorn, "r", "live")
        data = read_until(s, b"data: live\n\n", data)
    body = data.partition(b"\r\n\r\n")[2].decode()
    assert body == ("retry: 2000\n\n" + "".join(f"id: {ids[i]}\ndata: m{i}\n\n" for i in (2, 3, 4))
                    + f"id: {live}\ndata: live\n\n")


def test_replay_older_than_history_says_gap(start_server):
    server = start_server("gunicorn", heartbeat=5, env={"WSGI_HIJACK_HISTORY_SIZE": "3"})
    ids = [published_id(server, "g", f"m{i}") for i in range(6)]
    with wire.request(server.port, "/events?channel=g", f"Last-Event-ID: {ids[0]}\r\n") as s:
        data = read_until(s, b"data: m5\n\n")
    body = data.partition(b"\r\n\r\n")[2].decode()
    gap = f'event: gap\ndata: {{"last_id": {ids[5]}}}\n\n'
    assert body == ("retry: 2000\n\n" + gap
                    + "".join(f"id: {ids[i]}\ndata: m{i}\n\n" for i in (3, 4, 5)))
    # Up to date with the history: no gap.
    with wire.request(server.port, "/events?channel=g", f"Last-Event-ID: {ids[2]}\r\n") as s:
        data = read_until(s, b"data: m5\n\n")
    assert b"gap" not in data


def test_replay_while_publishing_gives_each_message_once(gunicorn):
    # An OS thread publishes 1,500 messages while clients join at different
    # points with Last-Event-ID: each must see a gapless, duplicate-free run.
    # Ids are at least the clock in microseconds (bus/memory.py): the clients
    # join 40 ms of ids apart, and one that was there from the start has them all.
    first = published_id(gunicorn, "race", "start")
    clients = [(first, wire.request(gunicorn.port, "/events?channel=race",
                                    f"Last-Event-ID: {first}\r\n"))]
    read_until(clients[0][1], b"retry: 2000\n\n")
    assert gunicorn.get("/_burst?channel=race&n=1500&sleep_ms=1")[0] == 200
    for k in range(1, 6):
        time.sleep(0.15)
        last = first + k * 40_000
        clients.append((last, wire.request(gunicorn.port, "/events?channel=race",
                                           f"Last-Event-ID: {last}\r\n")))
    runs = []
    for last, s in clients:
        with s:
            data = read_until(s, b"data: burst 1499\n\n")
        runs.append((last, [int(line[4:]) for line in data.decode().split("\n")
                            if line.startswith("id: ")]))
    every = runs[0][1]
    assert len(every) == 1500 and every == sorted(set(every))
    for last, got in runs:
        assert got == [i for i in every if i > last], (last, got[:5], len(got))


def test_several_waiting_messages_leave_in_one_write(gunicorn):
    with wire.request(gunicorn.port, "/events?channel=batch") as s1, \
            wire.request(gunicorn.port, "/events?channel=batch") as s2:
        wait_subscribed(gunicorn, 2)
        before = gunicorn.stats()
        status, _, body = gunicorn.get("/_batch?channel=batch&n=5")
        ids = json.loads(body)["ids"]
        for s in (s1, s2):
            data = read_until(s, b"data: batch 4\n\n")
            assert [int(x) for x in data.split(b"id: ")[1:] if x[:1].isdigit() for x in
                    [x.split(b"\n")[0]]] == ids
        after = gunicorn.stats()
    assert after["messages"] - before["messages"] == 5
    # 5 messages x 2 subscribers, gathered: one write per subscriber.
    assert after["deliveries"] - before["deliveries"] == 2, (before, after)


def test_chunked_stream(gunicorn):
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"{base(gunicorn)}/stream?channel=ch") as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        wait_subscribed(gunicorn, 1)
        published_id(gunicorn, "ch", "one")
        published_id(gunicorn, "ch", "two\nlines")
        lines = []
        for line in resp.iter_lines():
            lines.append(line)
            if line == "lines":
                break
    assert lines == ["one", "two", "lines"]


def test_chunked_stream_raw_framing_and_http10_refused(gunicorn):
    with wire.request(gunicorn.port, "/stream?channel=cr") as s:
        read_until(s, b"\r\n\r\n")
        wait_subscribed(gunicorn, 1)
        published_id(gunicorn, "cr", "héllo")
        data = read_until(s, "héllo\n\r\n".encode())
    assert data == b"7\r\n" + "héllo\n".encode() + b"\r\n"  # 7 bytes: é is two
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=5) as s:
        s.sendall(b"GET /stream?channel=cr HTTP/1.0\r\n\r\n")
        assert b" 400 " in read_until(s, b"\r\n\r\n")


def poll(server, query: str, timeout: float = 10) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = httpx.get(f"{base(server)}/poll?{query}", timeout=timeout)
    return resp, time.monotonic() - start


def test_long_poll_wakes_on_publish(gunicorn):
    last = published_id(gunicorn, "lp", "old")
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        r=poll(gunicorn, f"channel=lp&since={last}")[0]))
    thread.start()
    wait_subscribed(gunicorn, 1)
    new = published_id(gunicorn, "lp", "new", event="e")
    thread.join(10)
    resp = result["r"]
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {"messages": [{"id": new, "channel": "lp", "event": "e",
                                         "data": "new"}], "last_id": new, "gap": False}
    assert wait_subscribed(gunicorn, 0) is None and gunicorn.stats()["held"] == 0


def test_long_poll_answers_at_once_when_behind(gunicorn):
    a = published_id(gunicorn, "lp2", "a")
    b = published_id(gunicorn, "lp2", "b")
    resp, _ = poll(gunicorn, f"channel=lp2&since={a - 1}")
    body = resp.json()
    assert [m["id"] for m in body["messages"]] == [a, b] and body["last_id"] == b


def test_long_poll_times_out_empty(start_server):
    server = start_server("gunicorn", heartbeat=5, env={"WSGI_HIJACK_POLL_TIMEOUT": "0.5"})
    last = published_id(server, "quiet", "x")
    resp, elapsed = poll(server, f"channel=quiet&since={last}")
    assert resp.status_code == 200
    assert resp.json() == {"messages": [], "last_id": last, "gap": False}
    assert server.stats()["held"] == 0
    assert elapsed >= 0.5


def test_long_poll_on_pywsgi(start_server):
    server = start_server("pywsgi", heartbeat=5)
    last = published_id(server, "py", "x")
    result = {}
    thread = threading.Thread(target=lambda: result.update(
        r=poll(server, f"channel=py&since={last}")[0]))
    thread.start()
    wait_subscribed(server, 1)
    new = published_id(server, "py", "y")
    thread.join(10)
    assert result["r"].json()["last_id"] == new
