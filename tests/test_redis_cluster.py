"""The bus on a real Redis Cluster (3 masters, 3 replicas, started here):
channels on different shards, replay exact per channel for SSE, long-poll
and WebSocket, sharded pub/sub, and a master failover inside the cluster."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import httpx
import pytest
from websockets.sync.client import connect

from harness import wire
from harness.clients import Publisher, wait_for, wait_total_held
from harness.recorder import Recorder
from harness.redis_topology import ClusterSet, command
from harness.servers import free_port
from wsgi_hijack.bus.positions import parse_position

pytestmark = [pytest.mark.redis, pytest.mark.slow]

HEARTBEAT = 0.5


@pytest.fixture
def cluster(tmp_path):
    topology = ClusterSet(tmp_path / "cluster")
    yield topology
    topology.stop()


def channels_on_shards(cluster: ClusterSet, count: int) -> list[str]:
    """``count`` channel names, each on a different master."""
    found: dict[int, str] = {}
    for n in range(1000):
        name = f"ch{n}"
        found.setdefault(cluster.master_for_key(f"wsgi_hijack:{{{name}}}:c"), name)
        if len(found) == count:
            return sorted(found.values())
    raise AssertionError("could not spread channels over the shards")


def publish(port: int, channel: str, data: str) -> int:
    resp = httpx.post(f"http://{wire.HOST}:{port}/publish", params={"channel": channel},
                      content=data, timeout=15)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def sse_events(data: bytes) -> list[tuple[str, str]]:
    """``(id, data)`` of each event with an id, ids as sent."""
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "id" in fields:
            found.append((fields["id"], fields["data"]))
    return found


def read_events(sock, count: int, data: bytes = b"") -> tuple[list[tuple[str, str]], bytes]:
    """Read until ``count`` events are in (``data``: read before); (events, all read)."""
    while b"\r\n\r\n" not in data or len(sse_events(data)) < count:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return sse_events(data), data


def test_replay_is_exact_across_shards_for_every_protocol(start_server, cluster):
    a, b, c = channels = channels_on_shards(cluster, 3)
    # A seed node that refuses connections is skipped for the next one.
    url = cluster.url().replace("//", f"//127.0.0.1:{free_port()},", 1)
    server = start_server("gunicorn", heartbeat=HEARTBEAT, args=("--workers", "2"),
                          env={"WSGI_HIJACK_REDIS_URL": url})
    wait_total_held(server, 2, 0, timeout=30)
    query = "&".join(f"channel={ch}" for ch in channels)

    # Live: every message once, each carrying the position on all three.
    with wire.request(server.port, f"/events?{query}") as live:
        opening = wire.read_until(live, b"retry: 2000\n\n")  # subscribed: live from here
        first = {ch: [publish(server.port, ch, f"{ch} one {i}") for i in range(2)]
                 for ch in channels}
        got, _ = read_events(live, 6, opening)
    assert sorted(d for _, d in got) == sorted(f"{ch} one {i}" for ch in channels
                                                for i in range(2))
    marks = parse_position(got[-1][0])
    assert marks == {ch: ids[-1] for ch, ids in first.items()}
    seen = got[-1][0]

    # Missed while away: exactly those, after the position it last had.
    second = {ch: [publish(server.port, ch, f"{ch} two {i}") for i in range(2)]
              for ch in channels}
    with wire.request(server.port, f"/events?{query}", f"Last-Event-ID: {seen}\r\n") as back:
        again, data = read_events(back, 6)
        for ch in channels:  # each channel in its own order, once
            mine = [parse_position(i)[ch] for i, d in again if d.startswith(f"{ch} ")]
            assert mine == second[ch]
        assert parse_position(again[-1][0]) == {ch: ids[-1] for ch, ids in second.items()}
        late = publish(server.port, b, "b live")
        tail = read_events(back, 7, data)[0][6:]
        assert tail == [(again[-1][0].replace(f"{b}={second[b][-1]}", f"{b}={late}"), "b live")]

    # Long-poll from the same position: the missed messages at once, then the next.
    poll = httpx.get(f"http://{wire.HOST}:{server.port}/poll?{query}&since={quote(seen)}",
                     timeout=30).json()
    assert [m["data"] for m in poll["messages"]] == [d for _, d in again] + ["b live"]
    assert parse_position(poll["last_id"]) == {**{ch: ids[-1] for ch, ids in second.items()},
                                               b: late}
    # WebSocket: the same position as ?last_id=, then live messages.
    with connect(f"ws://{wire.HOST}:{server.port}/ws-echo?{query}&last_id={quote(seen)}") as ws:
        replayed = [json.loads(ws.recv(timeout=10)) for _ in range(7)]
        assert [m["data"] for m in replayed] == [d for _, d in again] + ["b live"]
        assert parse_position(replayed[-1]["id"])[b] == late
    # One channel: plain ids, the channel's own.
    with wire.request(server.port, f"/events?channel={a}",
                      f"Last-Event-ID: {first[a][0]}\r\n") as single:
        plain, _ = read_events(single, 3)
    assert plain == [(str(i), d) for i, d in
                     zip([first[a][1], *second[a]],
                         [f"{a} one 1", f"{a} two 0", f"{a} two 1"], strict=True)]

    # Bad positions: 400, saying why.
    for bad in ("ch0=x", f"{a}=1,{a}=2", "=5", "a=1;b=2"):
        resp = httpx.get(f"http://{wire.HOST}:{server.port}/events?{query}",
                         headers={"Last-Event-ID": bad}, timeout=10)
        assert resp.status_code == 400 and "Last-Event-ID" in resp.text, (bad, resp.text)

    # Sharded pub/sub: each publish ran SPUBLISH on its channel's master only,
    # and no node ran a plain PUBLISH (which every node would forward).
    spublished = {}
    for port in cluster.master_ports():
        stats = command(port, "INFO", "commandstats")
        assert "cmdstat_publish:" not in stats
        calls = [line for line in stats.splitlines() if line.startswith("cmdstat_spublish:")]
        spublished[port] = int(calls[0].split("calls=")[1].split(",")[0]) if calls else 0
    expected = {cluster.master_for_key(f"wsgi_hijack:{{{ch}}}:c"): 4 + (ch == b)
                for ch in channels}
    assert spublished == expected


@pytest.fixture
def cluster_of_three(tmp_path):
    """Two replicas a master: after a failover its shard still has one, so
    publishes there can be acknowledged (WAIT 1) again."""
    topology = ClusterSet(tmp_path / "cluster", replicas_per_master=2)
    yield topology
    topology.stop()


def test_a_master_failover_inside_the_cluster_loses_nothing_acknowledged(start_server,
                                                                         cluster_of_three):
    cluster = cluster_of_three
    channels = channels_on_shards(cluster, 2)
    server = start_server("gunicorn", heartbeat=HEARTBEAT, args=("--workers", "2"),
                          env={"WSGI_HIJACK_REDIS_URL": cluster.url()})
    wait_total_held(server, 2, 0, timeout=30)
    query = "&".join(f"channel={ch}" for ch in channels)
    recorder = Recorder()
    try:
        streams = [recorder.add(wire.request(server.port, f"/events?{query}"), f"sse{i}")
                   for i in range(200)]
        for stream in streams:
            recorder.wait_for(stream, b"retry: 2000\n\n", 30)
        wait_total_held(server, 2, len(streams), timeout=30)
        publisher = Publisher(server.port, channels).start()
        wait_for(lambda: len(publisher.accepted) > 10, "publishes before the failover", 30)
        old = cluster.master_for_key(f"wsgi_hijack:{{{channels[0]}}}:c")
        cluster.kill_master(old)
        killed_at = time.monotonic()
        cluster.wait_for_failover(old, timeout=60)
        # Meanwhile the other shard's channel went on live: what was published
        # on it during the failover had reached the clients before it ended.
        during = [i for (ch, i), t in list(publisher.answered_at.items())
                  if ch == channels[1] and t > killed_at + 0.5]
        assert during, "nothing published on the healthy shard during the failover"
        assert all(f"{channels[1]}=".encode() in s.data and
                   _has(s.data, channels[1], during[0]) for s in streams)
        count = len(publisher.accepted)
        wait_for(lambda: len(publisher.accepted) > count + 10, "publishes after it", 60)
        # A client back with a position from before the failover.
        before = sse_events(streams[0].data)[-1][0]
        returning = recorder.add(wire.request(server.port, f"/events?{query}",
                                              f"Last-Event-ID: {before}\r\n"), "returning")
        time.sleep(1)
        publisher.stop()
        last = {ch: publish(server.port, ch, f"{ch} last") for ch in channels}
        for stream in [*streams, returning]:
            for ch in channels:
                recorder.wait_for(stream, f"data: {ch} last\n".encode(), 60)
        beats_after = [s.data[sum(len(d) for t, d in s.chunks if t < killed_at):]
                       .count(b": ping\n\n") for s in streams]
    finally:
        recorder.stop()

    assert [s.name for s in streams if s.closed_at] == []
    assert min(beats_after) > 0
    assert publisher.hung == []
    assert all(status == 503 and retry for status, retry in publisher.refused), \
        publisher.refused
    acknowledged = {**publisher.accepted, **{(ch, i): f"{ch} last" for ch, i in last.items()}}
    for stream in streams:
        got = _by_channel(sse_events(stream.data))
        for ch in channels:
            ids = [i for i, _ in got[ch]]
            assert ids == sorted(set(ids)), f"{stream.name}: {ch} not once each, in order"
        received = {(ch, i): d for ch in channels for i, d in got[ch]}
        assert set(acknowledged) <= set(received), \
            f"{stream.name} missed {sorted(set(acknowledged) - set(received))[:5]}"
        for key, data in received.items():  # no id stands for two messages
            assert acknowledged.get(key, data) == data
    marks = parse_position(before)
    want = sorted(k for k in acknowledged if k[1] > marks[k[0]])
    got = _by_channel(sse_events(returning.data))
    assert sorted((ch, i) for ch in channels for i, _ in got[ch]) == want


def _has(data: bytes, channel: str, message_id: int) -> bool:
    """Whether an event of ``data`` is ``channel``'s message ``message_id``."""
    return any(parse_position(i).get(channel) == message_id and d.startswith(f"{channel} ")
               for i, d in sse_events(data))


def _by_channel(events: list[tuple[str, str]]) -> dict[str, list[tuple[int, str]]]:
    """Each event under its channel (named at the start of its data), with
    that channel's id taken from the position."""
    out: dict[str, list[tuple[int, str]]] = {}
    for position, data in events:
        channel = data.split(" ", 1)[0]
        out.setdefault(channel, []).append((parse_position(position)[channel], data))
    return out
