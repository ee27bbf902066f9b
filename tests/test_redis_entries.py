"""What the Redis buses read from Redis is checked at the edge (issue 22,
item 4): random pub/sub payloads and stream entries, fed to the parsing
functions and to the real listener and replay code of both Redis buses
(with a stand-in for redis-py), never stop them, never reach a client
unless they are what the publish script writes, and leave every real
message in place and in order. The same bad inputs on a real redis-server:
tests/test_redis_bad_entries.py."""

from __future__ import annotations

import math
import time
from unittest import mock

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from wsgi_hijack import redis_cluster_bus
from wsgi_hijack.bus import Live, Message
from wsgi_hijack.bus.base import CHANNEL_RE, EVENT_RE
from wsgi_hijack.redis_bus import RedisBus
from wsgi_hijack.redis_cluster_bus import RedisClusterBus, _Shard
from wsgi_hijack.redis_entries import (
    MAX_ID,
    LiveIds,
    Rejected,
    Skipped,
    channel_name,
    evicted_id,
    live_message,
    stream_message,
)

pytestmark = pytest.mark.unit

CHANNEL = "news"
#: The real messages: ids below the clock, as the publish script's are.
GOOD = [Message(1_000_000 + i, CHANNEL, f"real {i}", "ev" if i % 2 else None, 1.5 + i)
        for i in range(4)]
COUNTER = GOOD[-1].id


def payload(message: Message) -> bytes:
    """A pub/sub payload as the publish script writes it."""
    return b"\n".join((str(message.id).encode(), (message.event or "").encode(),
                       repr(message.time).encode(), message.data.encode()))


def entry(message: Message) -> tuple[bytes, dict]:
    """A stream entry as the publish script writes it."""
    return (f"{message.id}-0".encode(),
            {b"d": message.data.encode(), b"e": (message.event or "").encode(),
             b"t": repr(message.time).encode()})


def same(a: Message, b: Message) -> bool:
    return (a.id, a.channel, a.data, a.event, a.time) == (b.id, b.channel, b.data, b.event,
                                                          b.time)


def assert_valid(message: Message) -> None:
    """What a message the bus lets through always is."""
    assert type(message.id) is int and 0 < message.id <= MAX_ID
    assert CHANNEL_RE.fullmatch(message.channel)
    assert isinstance(message.data, str)
    message.data.encode("utf-8")  # no lone surrogates
    assert message.event is None or EVENT_RE.fullmatch(message.event)
    assert math.isfinite(message.time)


# Payloads: random bytes, and random parts joined as the script joins them
# (ids with signs, spaces, too many digits, 9000000000000000000; events with
# CR or NUL; times that are nan or inf; data that is not UTF-8).
PART = st.one_of(st.binary(max_size=30), st.sampled_from([
    b"", b"0", b"-1", b"+5", b" 7", b"1.5", b"9000000000000000000", b"99999999999999999999",
    b"nan", b"inf", b"-inf", b"1e400", b"\xff\xfe", b"a\rb", b"a\x00b", b"\xd8\x00"]))
PAYLOAD = st.one_of(st.binary(max_size=80),
                    st.lists(PART, min_size=0, max_size=6).map(b"\n".join))
FIELD_NAME = st.one_of(st.sampled_from([b"d", b"e", b"t", b"x", b"D", b""]), st.binary(max_size=3))
FIELDS = st.one_of(st.dictionaries(FIELD_NAME, PART, max_size=5),
                   st.sampled_from([None, [], b"d", {"d": "x", "t": "1"}]))
RAW_ID = st.one_of(PART, st.tuples(PART, PART).map(b"-".join),
                   st.sampled_from([None, 5, "5-0", b"5-0", b"5-1", b"5", b"-0"]))


@given(PAYLOAD)
def test_a_payload_parses_or_is_rejected(raw):
    try:
        message = live_message(CHANNEL, raw)
    except Rejected:
        return
    assert_valid(message)
    assert same(message, live_message(CHANNEL, payload(message)))


@given(RAW_ID, FIELDS)
def test_a_stream_entry_parses_or_is_rejected(raw_id, fields):
    try:
        message = stream_message(CHANNEL, raw_id, fields)
    except Rejected:
        return
    assert_valid(message)
    assert raw_id == f"{message.id}-0".encode()


@given(st.one_of(st.binary(max_size=20), st.text(max_size=20), st.none()))
def test_a_channel_name_or_an_evicted_marker_parses_or_is_rejected(raw):
    for parse in (channel_name, evicted_id):
        try:
            parse(raw)
        except Rejected:
            pass


def test_what_the_script_writes_parses_back():
    for message in GOOD:
        assert same(live_message(CHANNEL, payload(message)), message)
        assert same(stream_message(CHANNEL, *entry(message)), message)
    assert evicted_id(b"1796105478457829-0") == 1796105478457829 and evicted_id(None) is None


@pytest.mark.parametrize("raw, why", [
    (b"garbage", "parts"),
    (b"9000000000000000000\n\n1.0\nx", None),  # parses: the id check is LiveIds'
    (b"99999999999999999999\n\n1.0\nx", "digits"),
    (b"0\n\n1.0\nx", "out of range"),
    (b"-5\n\n1.0\nx", "digits"),
    (b"5\na\rb\n1.0\nx", "event"),
    (b"5\n\nnan\nx", "finite"),
    (b"5\n\n1.0\n\xff", "UTF-8"),
])
def test_bad_payloads_say_why(raw, why):
    if why is None:
        assert live_message(CHANNEL, raw).id == 9000000000000000000
        return
    with pytest.raises(Rejected, match=why):
        live_message(CHANNEL, raw)


def test_a_live_id_above_the_clock_is_checked_against_the_counter():
    reads = []

    def counter(value):
        return lambda: reads.append(value) or value

    ids = LiveIds(clock=lambda: 1000)
    assert ids.handed_out("k", 999, counter(b"5")) and reads == []  # below the clock: no read
    assert not ids.handed_out("k", 9000000000000000000, counter(b"2000"))
    assert ids.handed_out("k", 1500, counter(b"2000"))  # under the counter read before
    assert reads == [b"2000"]
    assert ids.handed_out("k", 2500, counter(b"2500")) and reads == [b"2000", b"2500"]
    assert not ids.handed_out("other", 1500, counter(None))  # no counter: never handed out
    assert not ids.handed_out("k2", 1500, counter(b"garbage"))


def test_skipped_lines_are_rate_limited(caplog):
    now = [0.0]
    skipped = Skipped(interval=10, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="wsgi_hijack.bus"):
        for _ in range(1000):
            skipped.skip("a pub/sub message", "garbage")
        now[0] = 11
        skipped.skip("a pub/sub message", "garbage")
        skipped.skip("a stream entry", "foreign")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and skipped.count == 1002
    assert "999 more skipped" in lines[1] and "foreign" in lines[2]


# -- the buses' own listener and replay, with a stand-in for redis-py ------------------


class FakeRedis:
    """What the buses call on redis-py: get, xrange, pubsub (a listener's
    items, then the end: ``on_end()`` stops the bus)."""

    def __init__(self, values=None, entries=(), items=(), on_end=None):
        self.values = values or {}
        self.entries = list(entries)
        self.items = list(items)
        self.on_end = on_end
        self.gets: list[str] = []

    def get(self, key):
        self.gets.append(key)
        return self.values.get(key)

    def xrange(self, key, min, max):
        return list(self.entries)

    def pubsub(self):
        return self

    # the pub/sub connection
    def subscribe(self, *names):
        pass

    ssubscribe = subscribe

    def listen(self):
        yield from self.items
        self.on_end()
        raise redis.ConnectionError("the end of the test's items")

    def get_message(self, timeout=None):
        if self.items:
            return self.items.pop(0)
        self.on_end()
        return None

    def close(self):
        pass


def mixed(good: list, bad: list, where: list[int]) -> list:
    """``good`` in order, with the bad ones put in at the positions ``where``."""
    out = list(good)
    for item, at in zip(bad, where, strict=False):
        out.insert(at % (len(out) + 1), item)
    return out


BAD_PAYLOADS = st.lists(st.one_of(PAYLOAD, st.sampled_from(
    [b"9000000000000000000\n\n1.0\nevil", b"%d\n\n1.0\nevil" % (COUNTER + 10 ** 12)])),
    max_size=8)
WHERE = st.lists(st.integers(0, 20), min_size=8, max_size=8)


def listen_single(items: list) -> list:
    bus = RedisBus("redis://127.0.0.1:1/0")
    got: list = []
    fake = FakeRedis({bus._keys(CHANNEL)[0]: str(COUNTER).encode()}, items=items,
                     on_end=lambda: setattr(bus, "_dispatch", None))
    bus._clients.client = fake
    bus._dispatch, bus._sleep = got.append, lambda seconds: None
    bus._listen()  # returns only once the items are all read (on_end)
    return got


def listen_cluster(items: list) -> list:
    bus = RedisClusterBus("redis+cluster://127.0.0.1:1")
    got: list = []
    stop = lambda: setattr(bus, "_dispatch", None)  # noqa: E731
    bus._clients.client = FakeRedis({bus._keys(CHANNEL)[0]: str(COUNTER).encode()})
    shard = bus._shards[("127.0.0.1", 1)] = _Shard(("127.0.0.1", 1))
    shard.channels.add(CHANNEL)
    bus._dispatch = got.append
    pubsub = FakeRedis(items=items, on_end=stop)
    with mock.patch.object(redis_cluster_bus.redis, "Redis", lambda **kw: pubsub):
        bus._listen(shard)
    return got


@settings(max_examples=60, deadline=None)
@given(BAD_PAYLOADS, WHERE)
def test_the_listeners_skip_what_is_not_a_real_message(bad, where):
    """Random payloads among real messages on the bus's own pub/sub channel:
    each real message is dispatched, in order; whatever else is dispatched
    parses, and has an id the bus could have handed out."""
    for listen, kind, name in (
            (listen_single, b"message", RedisBus("redis://127.0.0.1:1/0")._keys(CHANNEL)[2]),
            (listen_cluster, b"smessage",
             RedisClusterBus("redis+cluster://127.0.0.1:1")._keys(CHANNEL)[2])):
        name = name.encode()
        items = [{"type": kind.replace(b"message", b"subscribe"), "channel": name, "data": 1}]
        items += mixed([payload(m) for m in GOOD], bad, where)
        got = listen([{"type": kind, "channel": name, "data": d}
                      if isinstance(d, bytes) else d for d in items])
        assert got[0] == Live(CHANNEL)
        messages = got[1:]
        real = [m for m in messages if any(same(m, g) for g in GOOD)]
        assert [m.id for m in real] == [m.id for m in GOOD]
        for message in messages:
            assert_valid(message)
            assert message.id <= max(COUNTER, time.time_ns() // 1000)


ENTRIES = st.lists(st.tuples(RAW_ID, FIELDS), max_size=8)


@settings(max_examples=60, deadline=None)
@given(ENTRIES, WHERE, st.one_of(st.none(), PART))
def test_the_replay_readers_skip_foreign_entries(bad, where, evicted):
    """Random stream entries (and a random evicted marker) among the real
    ones: a replay of both buses returns each real message, in order, and
    does not fail."""
    for bus in (RedisBus("redis://127.0.0.1:1/0"),
                RedisClusterBus("redis+cluster://127.0.0.1:1")):
        keys = bus._keys(CHANNEL)
        bus._clients.client = FakeRedis(
            {keys[0]: str(COUNTER).encode(), keys[3]: evicted},
            entries=mixed([entry(m) for m in GOOD], bad, where))
        bus.history_age = 1e12  # the good messages' times are in 1970
        replay = bus.replay([CHANNEL], 0)
        assert not replay.failed
        real = [m for m in replay.messages if any(same(m, g) for g in GOOD)]
        assert [m.id for m in real] == [m.id for m in GOOD]
        for message in replay.messages:
            assert_valid(message)


def test_a_replay_of_only_foreign_entries_is_empty_and_moves_nothing():
    bus = RedisBus("redis://127.0.0.1:1/0")
    keys = bus._keys(CHANNEL)
    bus._clients.client = FakeRedis(
        {keys[0]: str(COUNTER).encode(), keys[3]: b"not an id"},
        entries=[(b"5-0", {b"foo": b"bar"}), (b"6-1", {b"d": b"x", b"t": b"1"}),
                 (b"7-0", {b"d": b"\xff", b"t": b"1"}), (b"8-0", {b"d": b"x", b"t": b"nan"})])
    replay = bus.replay([CHANNEL], 4)
    assert replay.messages == [] and not replay.gap and not replay.failed
    assert replay.last_id == COUNTER  # the counter's, as always: no entry moved it
