"""A bad entry in Redis costs nothing (issue 22, item 4), on a real
redis-server and a real Redis Cluster under gunicorn: after a ``PUBLISH`` of
garbage on every channel name the buses use, a well-formed message with an
id no publish handed out (9000000000000000000), or ``XADD`` entries with
foreign fields and ids in a channel's stream, a real publish still reaches a
held SSE client, and a client replaying from before the foreign entries gets
exactly the real messages. Each bad input is skipped with a log line."""

from __future__ import annotations

import random

import pytest
import redis

from harness import wire
from harness.clients import open_sse, published_id, wait_total_held
from harness.redis_topology import ClusterSet
from wsgi_hijack.redis_bus import RedisBus
from wsgi_hijack.redis_cluster_bus import RedisClusterBus

HUGE = b"9000000000000000000"


def events(data: bytes) -> list[tuple[int, str]]:
    """(id, data) of each SSE event with an id (after the head, if it is there)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    body = (rest if sep else head).decode()
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines()
                      if ": " in line and not line.startswith(":"))
        if "id" in fields:
            found.append((int(fields["id"]), fields["data"]))
    return found


def garbage(seed: int) -> list[bytes]:
    """Bad payloads: random bytes (seeded: the same every run) and the
    near misses, with a well-formed message whose id was never handed out."""
    rng = random.Random(seed)
    return [b"garbage", b"", b"\n\n\n", b"1\n\n", b"x\n\n1.0\nbad id", b"-5\n\n1.0\nbad id",
            b"0\n\n1.0\nzero id", b"5\na\rb\n1.0\nbad event", b"5\n\nnan\nbad time",
            b"5\n\n1.0\n\xff\xfe", HUGE + b"\n\n1.0\nhuge id",
            b"99999999999999999999\n\n1.0\ntoo many digits",
            *(rng.randbytes(rng.randrange(1, 200)) for _ in range(30))]


def keys_of(bus, channel: str) -> dict[str, str]:
    counter, stream, pubsub, evicted = bus._keys(channel)
    return {"counter": counter, "stream": stream, "pubsub": pubsub, "evicted": evicted}


def foreign_entries(client, stream: str, after: int) -> None:
    """XADD entries the publish script would never write, between the real
    id ``after`` and the next one: foreign fields, not UTF-8, a time that is
    not a number, an event with CR, a sequence number of its own."""
    for seq, fields in enumerate([{"foo": "bar"}, {"d": b"\xff", "t": "1"},
                                  {"d": "x", "t": "nan"}, {"d": "x", "e": "a\rb", "t": "1"},
                                  {"d": "looks real", "e": "", "t": "1.0"}], start=1):
        client.xadd(stream, fields, id=f"{after}-{seq}")


def test_garbage_on_every_channel_name_does_not_silence_the_bus(start_server, redis_server):
    server = start_server("gunicorn", env={"WSGI_HIJACK_REDIS_URL": redis_server.url})
    wait_total_held(server, 1, 0, timeout=20)
    bus = RedisBus(redis_server.url)
    names = [*keys_of(bus, "news").values(), bus._key("ctl"), bus._keys("other")[2]]
    raw = redis.Redis(port=redis_server.port)
    (held,) = open_sse(server, "news", 1)
    with held:
        for name in names:
            for payload in garbage(len(name)):
                raw.publish(name, payload)
        real = published_id(server, "news", "real")
        got = events(wire.read_within(held, b"data: real\n\n"))
    assert got == [(real, "real")]  # and nothing of the garbage
    log = server.log()
    assert "skipped a pub/sub message" in log and "Traceback" not in log
    assert len([line for line in log.splitlines() if "skipped" in line]) < 10  # rate-limited


def test_an_id_never_handed_out_does_not_make_later_messages_dropped(start_server,
                                                                      redis_server):
    server = start_server("gunicorn", env={"WSGI_HIJACK_REDIS_URL": redis_server.url})
    wait_total_held(server, 1, 0, timeout=20)
    pubsub = RedisBus(redis_server.url)._keys("news")[2]
    raw = redis.Redis(port=redis_server.port)
    (held,) = open_sse(server, "news", 1)
    with held:
        before = published_id(server, "news", "before")
        wire.read_within(held, b"data: before\n\n")
        assert raw.publish(pubsub, HUGE + b"\n\n1.0\nhuge id") == 1
        assert raw.publish(pubsub, b"%d\n\n1.0\nabove the counter" % (before + 10 ** 12)) == 1
        ids = [published_id(server, "news", f"after {i}") for i in range(3)]
        got = events(wire.read_within(held, b"data: after 2\n\n"))
    assert got == [(ids[i], f"after {i}") for i in range(3)]  # and neither bad one
    assert "was never handed out" in server.log()


def test_a_foreign_stream_entry_does_not_stop_a_replay(start_server, redis_server):
    server = start_server("gunicorn", env={"WSGI_HIJACK_REDIS_URL": redis_server.url})
    wait_total_held(server, 1, 0, timeout=20)
    stream = RedisBus(redis_server.url)._keys("news")[1]
    raw = redis.Redis(port=redis_server.port)
    ids = [published_id(server, "news", f"m{i}") for i in range(2)]
    foreign_entries(raw, stream, ids[1])
    ids.append(published_id(server, "news", "m2"))
    with wire.request(server.port, "/events?channel=news",
                      f"Last-Event-ID: {ids[0]}\r\n") as s:
        data = wire.read_within(s, b"data: m2\n\n")
        live = published_id(server, "news", "live")
        data = wire.read_within(s, b"data: live\n\n", data)
    assert b"event: gap" not in data
    assert events(data) == [(ids[1], "m1"), (ids[2], "m2"), (live, "live")]
    # An entry far above the counter is never read (the replay stops at the counter).
    raw.xadd(RedisBus(redis_server.url)._keys("quiet")[1], {"d": "x", "t": "1"},
             id=HUGE.decode() + "-0")
    with wire.request(server.port, "/events?channel=quiet", "Last-Event-ID: 1\r\n") as s:
        opening = wire.read_within(s, b"retry: 2000\n\n")
        more = wire.read_within(s, b": ping\n\n")  # a heartbeat: the replay is over
    assert b"id: " not in opening + more and b"event: gap" not in opening + more
    assert "skipped a stream entry" in server.log()


@pytest.fixture
def cluster(tmp_path):
    topology = ClusterSet(tmp_path / "cluster", replicas_per_master=0)
    yield topology
    topology.stop()


@pytest.mark.redis
def test_bad_entries_on_a_cluster_cost_nothing(start_server, cluster):
    """The same three on Redis Cluster: garbage and a huge id by SPUBLISH (and
    PUBLISH) on the channel's shard, foreign stream entries; its listener
    goes on and its replay returns the real messages."""
    url = cluster.url()
    server = start_server("gunicorn", env={"WSGI_HIJACK_REDIS_URL": url,
                                           "WSGI_HIJACK_REDIS_MIN_REPLICAS": "0"})
    wait_total_held(server, 1, 0, timeout=30)
    keys = keys_of(RedisClusterBus(url), "news")
    shard = redis.Redis(port=cluster.master_for_key(keys["pubsub"]))
    (held,) = open_sse(server, "news", 1)
    with held:
        first = published_id(server, "news", "first")
        wire.read_within(held, b"data: first\n\n")
        for name in keys.values():
            for payload in garbage(len(name)):
                shard.execute_command("SPUBLISH", name, payload)
                shard.publish(name, payload)
        second = published_id(server, "news", "second")
        got = events(wire.read_within(held, b"data: second\n\n"))
    assert got == [(second, "second")]  # and nothing of the garbage
    foreign_entries(shard, keys["stream"], second)
    third = published_id(server, "news", "third")
    with wire.request(server.port, "/events?channel=news",
                      f"Last-Event-ID: {first}\r\n") as s:
        data = wire.read_within(s, b"data: third\n\n")
    assert b"event: gap" not in data
    assert events(data) == [(second, "second"), (third, "third")]
    log = server.log()
    assert "skipped a pub/sub message" in log and "skipped a stream entry" in log
    assert "Traceback" not in log
