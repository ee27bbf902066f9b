"""The Redis bus on Sentinel: a failover under load loses no acknowledged
message, hands out no id twice, and every client stays connected.

Real processes: a primary, two replicas and three sentinels
(:class:`harness.redis_topology.SentinelSet`), gunicorn with two workers,
and a thousand raw SSE clients read by one thread.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from harness import wire
from harness.clients import Publisher, wait_for, wait_total_held
from harness.recorder import Recorder
from harness.redis_topology import SentinelSet

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CLIENTS = 1000
HEARTBEAT = 0.5


@pytest.fixture
def sentinels(tmp_path):
    topology = SentinelSet(tmp_path / "sentinel")
    yield topology
    topology.stop()


def events(data: bytes) -> tuple[list[tuple[int, str]], int]:
    """Each event with an id, as (id, data), and how many gap events came."""
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    found, gaps = [], 0
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if fields.get("event") == "gap":
            gaps += 1
        elif "id" in fields:
            found.append((int(fields["id"]), fields["data"]))
    return found, gaps


def test_a_failover_under_load_loses_nothing_acknowledged(start_server, sentinels):
    server = start_server("gunicorn", heartbeat=HEARTBEAT, args=("--workers", "2"),
                          env={"WSGI_HIJACK_REDIS_URL": sentinels.url()})
    wait_total_held(server, 2, 0, timeout=30)
    publisher = Publisher(server.port, ["news"]).start()
    first = wait_for(lambda: publisher.accepted, "a first publish", 20)
    since = min(i for _, i in first)
    recorder = Recorder()
    try:
        streams = [recorder.add(wire.request(server.port, "/events?channel=news",
                                             f"Last-Event-ID: {since}\r\n"), f"sse{i}")
                   for i in range(CLIENTS)]
        for stream in streams:
            recorder.wait_for(stream, b"retry: 2000\n\n", 30)
        wait_total_held(server, 2, CLIENTS, timeout=30)
        time.sleep(1)  # published to everyone, before the primary dies
        old = sentinels.kill_primary()
        killed_at = time.monotonic()
        new = sentinels.wait_for_failover(old, timeout=60)
        assert new != old
        # Publishing works again on the new primary.
        wait_for(lambda: publisher.acknowledged_after(killed_at),
                 "a publish acknowledged after the failover", 60)
        time.sleep(1)
        publisher.stop()
        last = wait_for(lambda: publisher.publish("news", "last"), "the last publish", 30)
        for stream in streams:
            recorder.wait_for(stream, b"data: last\n", 60)
        heartbeats_after = [s.data[_offset_at(s, killed_at):].count(b": ping\n\n")
                            for s in streams]
    finally:
        recorder.stop()

    # Every client stayed connected, and had heartbeats after the kill.
    assert [s.name for s in streams if s.closed_at] == []
    assert min(heartbeats_after) > 0
    # Each publish answered 202, or 503 with Retry-After, within its timeout.
    assert publisher.hung == []
    assert {status for status, _ in publisher.refused} <= {503}
    assert all(retry for _, retry in publisher.refused)
    assert publisher.slowest < Publisher.TIMEOUT
    acknowledged = sorted(i for _, i in publisher.accepted if since < i <= last)
    by_id: dict[int, str] = {i: d for (_, i), d in publisher.accepted.items()}
    for stream in streams:
        got, gaps = events(stream.data)
        ids = [i for i, _ in got]
        assert ids == sorted(set(ids)), f"{stream.name}: ids not strictly increasing"
        for message_id, data in got:  # no id stands for two messages
            assert by_id.setdefault(message_id, data) == data, f"id {message_id} given twice"
        missing = set(acknowledged) - set(ids)
        assert not missing or gaps, f"{stream.name} missed {sorted(missing)} untold"
    # With WAIT for a replica (the default with Sentinel), nothing acknowledged was lost.
    assert all(set(acknowledged) <= {i for i, _ in events(s.data)[0]} for s in streams)
    assert len(acknowledged) > 20
    server.proc.send_signal(signal.SIGTERM)


def _offset_at(stream, when: float) -> int:
    """How many bytes ``stream`` had received by ``when``."""
    return sum(len(chunk) for t, chunk in stream.chunks if t < when)


def test_dead_sentinels_unknown_services_and_ids_from_before_a_failover(start_server, sentinels,
                                                                        tmp_path):
    """The bad inputs: a sentinel list that starts with a dead sentinel, a
    service no sentinel knows, a client that connects while the primary is
    dead (its replay meets the failover), and one that comes back after it
    with a Last-Event-ID from before."""
    dead = sentinels.kill_sentinel(0)
    assert sentinels.url().split("//")[1].startswith(f"127.0.0.1:{dead},")
    server = start_server("gunicorn", heartbeat=HEARTBEAT,
                          env={"WSGI_HIJACK_REDIS_URL": sentinels.url()})
    publisher = Publisher(server.port, ["news"])
    before = [publisher.publish("news", f"before {i}") for i in range(5)]
    assert None not in before, publisher.refused

    unknown = start_server("gunicorn", heartbeat=HEARTBEAT, env={
        "WSGI_HIJACK_REDIS_URL": sentinels.url().replace("/mymaster/", "/nosuch/")})
    resp = httpx.post(f"http://{wire.HOST}:{unknown.port}/publish",
                      params={"channel": "news"}, content="x", timeout=15)
    assert resp.status_code == 503 and resp.headers["retry-after"]
    assert "nosuch" in resp.text, resp.text

    recorder = Recorder()
    try:
        old = sentinels.kill_primary()
        during = recorder.add(wire.request(server.port, "/events?channel=news",
                                           f"Last-Event-ID: {before[0]}\r\n"), "during")
        sentinels.wait_for_failover(old, timeout=60)
        after = [wait_for(lambda i=i: publisher.publish("news", f"after {i}"),
                          "a publish on the new primary", 30) for i in range(3)]
        late = recorder.add(wire.request(server.port, "/events?channel=news",
                                         f"Last-Event-ID: {before[0]}\r\n"), "late")
        for stream in (during, late):
            recorder.wait_for(stream, b"data: after 2\n", 60)
    finally:
        recorder.stop()
    assert min(after) > max(before)  # the new primary's ids are above the old one's
    want = [(i, f"before {n}") for n, i in enumerate(before)][1:] + \
        [(i, f"after {n}") for n, i in enumerate(after)]
    for stream in (during, late):
        got, gaps = events(stream.data)
        assert gaps == 0, stream.data
        assert got == want, stream.name

