"""The Redis bus: one publish reaches every subscriber of every worker and host.

How it uses Redis (redis-py, with hiredis when installed):

- **where**: one server, or a Sentinel set whose primary is looked up again on
  every reconnect (:mod:`wsgi_hijack.redis_connect`).
- **ids**: one counter (``{prefix}id``) for the whole deployment, so ids are
  ordered per channel -- and across channels -- on every worker and host. The
  counter never goes back: each id is at least the server's clock in
  microseconds (``TIME``). A failover can lose the counter's last increments
  (replication is asynchronous); the promoted replica's clock is past every id
  handed out before, so no id is ever given twice, and a client's
  ``Last-Event-ID`` never points at another message. (This needs the
  servers' clocks to agree to within the failover's duration: NTP.)
- **publish**: one Lua script, atomic in Redis: take the next id, append the
  message to the channel's stream (``XADD {prefix}s:{channel} MAXLEN n``, the
  shared replay history), and ``PUBLISH`` it on ``{prefix}c:{channel}``.
  Because the three happen as one, every worker receives messages in id order,
  and a message is in the history before anyone can receive it. With
  ``WSGI_HIJACK_REDIS_MIN_REPLICAS`` (default 1 with Sentinel) the script is
  followed by ``WAIT``, on the same connection: a publish succeeds only once
  that many replicas have the message, so a failover to the most up-to-date
  replica keeps it (docs/operations.rst says what can still be lost).
- **fan-out**: each worker keeps one pub/sub connection (a greenlet reading
  it) and subscribes to a channel while it has local subscribers; the reactor
  fans each message out locally. The reactor holds a connection back until
  Redis confirms its channel's subscription, then replays from the stream, so
  nothing published meanwhile is lost (see :mod:`wsgi_hijack.reactor.routing`).
- **replay**: ``XRANGE`` on the channels' streams, after the client's id. A
  stream is capped by count (``MAXLEN``); messages older than the history age
  are treated as gone. The publish script records the newest id it trimmed
  (``{prefix}ev:{channel}``): a client whose id is below it has missed
  something, and the replay reports a gap.
- **outages**: ``publish`` raises :class:`~wsgi_hijack.bus.BusUnavailable`
  (the demo answers ``503``); held connections stay open and keep their
  heartbeats; the listener reconnects with exponential backoff, subscribes
  again, and the reactor replays what it missed from the streams. For replay
  to survive a Redis restart, Redis must persist (``appendonly yes``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from typing import Any

import gevent
from gevent import monkey

from . import config, redis_connect
from .bus.base import (
    BusUnavailable,
    Counters,
    Dispatch,
    Live,
    Message,
    Replay,
    Resync,
    check_channel,
    check_data,
    check_event,
)
from .redis_entries import CheckedReading, LiveIds, Skipped

log = logging.getLogger("wsgi_hijack.bus")
# Per OS thread, not per greenlet (which is what threading.local is once
# gevent has patched it).
_thread_local = monkey.get_original("_thread", "_local")

try:
    import redis
    from redis.exceptions import NoScriptError, RedisError
except ImportError:  # pragma: no cover - only without the [redis] extra
    redis = None
    RedisError = NoScriptError = OSError

# What a failed command raises: redis-py's errors (RedisClusterException is
# not one of them) and the socket's.
_FAILURES: tuple[type[BaseException], ...] = (RedisError, OSError)
if redis is not None:
    from redis.exceptions import RedisClusterException

    _FAILURES = (RedisError, RedisClusterException, OSError)

# KEYS: counter, stream, pub/sub channel, "evicted" marker. ARGV: data, event, time, maxlen.
# The id is the counter plus one, or the server's clock in microseconds if
# that is ahead: ids never go back, even after a failover lost increments.
# ('%.0f': Lua's own number-to-string would write 1.76e+15.)
# Before the stream drops its oldest entries, remember the newest id dropped:
# a client whose last id is below it has missed something (a gap).
_PUBLISH = """
local now = redis.call('TIME')
local id = redis.call('INCR', KEYS[1])
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
if id < clock then
  id = clock
  redis.call('SET', KEYS[1], string.format('%.0f', id))
end
id = string.format('%.0f', id)
local over = redis.call('XLEN', KEYS[2]) - tonumber(ARGV[4]) + 1
if over > 0 then
  local dropped = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', over)
  redis.call('SET', KEYS[4], dropped[#dropped][1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], id .. '-0', 'd', ARGV[1], 'e', ARGV[2], 't', ARGV[3])
redis.call('PUBLISH', KEYS[3], id .. '\\n' .. ARGV[2] .. '\\n' .. ARGV[3] .. '\\n' .. ARGV[1])
return id
"""


class ScriptPublishing:
    """``publish`` as both Redis buses do it: the checks, the publish script
    (with ``WAIT``), and what a failure means for the caller. The bus gives
    ``_keys(channel)`` (the script's KEYS) and ``_run_publish``."""

    url: str
    target: redis_connect.RedisTarget
    min_replicas: int
    replica_timeout_ms: int
    max_message: int
    history_size: int
    _counters: Counters

    def _keys(self, channel: str) -> tuple[str, ...]:
        raise NotImplementedError

    def _run_publish(self, keys: tuple, args: tuple) -> tuple[int, int]:
        raise NotImplementedError

    def publish(self, channel: str, data: str | bytes, event: str | None = None) -> int:
        check_channel(channel)
        event = check_event(event)
        data = check_data(data, self.max_message)
        args = (data.encode("utf-8"), (event or "").encode(), repr(time.time()),
                self.history_size)
        try:
            message_id, acked = self._run_publish(self._keys(channel), args)
        except _FAILURES as exc:
            self._counters.add("bus_errors")
            raise BusUnavailable(f"cannot publish to {channel!r}: {self.url} is unavailable "
                                 f"({redis_connect.explain(exc, self.target)})") from exc
        if acked < self.min_replicas:
            self._counters.add("bus_errors")
            raise BusUnavailable(
                f"message {message_id} on {channel!r} reached {acked} of the "
                f"{self.min_replicas} replicas required (WSGI_HIJACK_REDIS_MIN_REPLICAS) in "
                f"{self.replica_timeout_ms} ms: not acknowledged, it may be lost in a failover "
                "(some clients may have it already)")
        self._counters.add("published")
        return message_id


def publish_and_wait(client: Any, script: str, sha: str, keys: tuple, args: tuple,
                     min_replicas: int, timeout_ms: int) -> tuple[int, int]:
    """The publish script, then ``WAIT`` for the replicas on the same
    connection (a pipeline), so that it waits for this very write.
    Returns (id, replicas that confirmed it)."""
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(sha, len(keys), *keys, *args)
        if min_replicas:
            pipe.execute_command("WAIT", min_replicas, timeout_ms)
        try:
            replies = pipe.execute()
        except NoScriptError:
            if attempt == 2:
                raise
            # A server that has not seen the script yet (new, restarted, or
            # promoted by a failover): load it, and publish once more.
            client.script_load(script)
            continue
        return int(replies[0]), int(replies[1]) if min_replicas else 0
    raise AssertionError("unreachable")


class RedisBus(ScriptPublishing, CheckedReading):
    """A bus shared by every worker and host connected to the same Redis."""

    def __init__(self, url: str, prefix: str | None = None, history_size: int | None = None,
                 history_age: float | None = None, max_message: int | None = None) -> None:
        if redis is None:
            raise RuntimeError("the Redis bus needs redis-py: pip install 'wsgi_hijack[redis]'")
        self.target = redis_connect.parse(url)
        if self.target.kind == "cluster":
            raise ValueError(f"{self.target.describe()}: use RedisClusterBus")
        #: Where, for logs and errors (without the password).
        self.url = self.target.describe()
        self.min_replicas = config.redis_min_replicas(url)
        self.replica_timeout_ms = max(1, int(config.redis_replica_timeout() * 1000))
        #: What every key and pub/sub channel starts with (WSGI_HIJACK_REDIS_PREFIX).
        self.prefix = config.redis_prefix(redis_connect.database(self.target)) \
            if prefix is None else prefix
        self.history_size = history_size or config.history_size()
        self.history_age = history_age or config.history_age()
        self.max_message = max_message or config.max_message()
        # One client (and connection pool) per OS thread: under gevent a
        # connection belongs to the hub of the thread that made it, so an app
        # thread that publishes must not borrow the worker's connections.
        # The thread's own is dropped with the thread.
        self._clients = _thread_local()
        self._publish_sha = hashlib.sha1(_PUBLISH.encode()).hexdigest()
        self._wanted: set[str] = set()
        self._pubsub: Any = None
        self._listener: gevent.Greenlet | None = None
        self._dispatch: Dispatch | None = None
        self._counters = Counters()
        # What is read from Redis is checked at the edge (redis_entries).
        self._live_ids = LiveIds()
        self._skipped = Skipped()

    @property
    def _client(self) -> Any:
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = redis_connect.connect(self.target)
        return client

    def _key(self, kind: str, channel: str = "") -> str:
        return f"{self.prefix}{kind}{channel}"

    # -- publishing, from any greenlet -------------------------------------------

    def _keys(self, channel: str) -> tuple[str, ...]:
        return (self._key("id"), self._key("s:", channel), self._key("c:", channel),
                self._key("ev:", channel))

    def _run_publish(self, keys: tuple, args: tuple) -> tuple[int, int]:
        return publish_and_wait(self._client, _PUBLISH, self._publish_sha, keys, args,
                                self.min_replicas, self.replica_timeout_ms)

    def last_id(self, channel: str | None = None) -> int:
        try:
            return int(self._client.get(self._key("id")) or 0)
        except _FAILURES as exc:
            raise BusUnavailable(f"{self.url} is unavailable "
                                 f"({redis_connect.explain(exc, self.target)})") from exc

    # -- replay -----------------------------------------------------------------------

    def replay(self, channels: Iterable[str], after: int | None,
               upto: int | None = None) -> Replay:
        channels = list(channels)
        try:
            last = self.last_id()  # read first: every id up to it is in its stream
            upto = last if upto is None else min(upto, last)
            if after is None:
                return Replay([], False, upto)
            oldest = time.time() - self.history_age
            found: list[Message] = []
            gap = after > last
            for channel in channels:
                key = self._key("s:", channel)
                for raw_id, fields in self._client.xrange(key, min=f"({after}-0",
                                                          max=f"{upto}-0"):
                    message = self._entry(channel, raw_id, fields)
                    if message is None:
                        continue  # not the publish script's: skipped, logged
                    if message.time < oldest:
                        gap = True  # expired by age: gone as far as the client knows
                        continue
                    found.append(message)
                if not gap and self._trimmed_after(channel, after):
                    gap = True
        except (*_FAILURES, BusUnavailable) as exc:
            log.warning("replay from %s failed: %s", self.url, exc)
            return Replay([], True, upto or 0, failed=True)
        found.sort(key=lambda m: m.id)
        return Replay(found, gap, upto)

    def _trimmed_after(self, channel: str, after: int) -> bool:
        evicted = self._evicted(channel, self._client.get(self._key("ev:", channel)))
        return evicted is not None and evicted > after

    # -- the worker's subscription -------------------------------------------------

    #: A subscription is live once Redis confirms it (a Live event).
    confirms_subscriptions = True
    ids_per_channel = False

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()

    def start(self, dispatch: Dispatch) -> None:
        """Listen, and hand messages and events to ``dispatch`` (the reactor's)."""
        self._dispatch = dispatch
        if monkey.is_module_patched("socket"):
            self._sleep = gevent.sleep
            self._listener = gevent.spawn(self._listen)
        else:
            # Without monkeypatching redis-py blocks: listen in an OS thread of
            # its own, which hands messages to the reactor thread-safely.
            self._sleep = time.sleep
            thread_class = monkey.get_original("threading", "Thread")
            thread_class(target=self._listen, name="wsgi_hijack-redis", daemon=True).start()

    def subscribe(self, channel: str) -> None:
        self._wanted.add(channel)
        self._send("subscribe", channel)  # live once Redis confirms: a Live event

    def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._send("unsubscribe", channel)

    def _send(self, command: str, channel: str) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # not connected: the listener subscribes all wanted channels when it is
        try:
            getattr(pubsub, command)(self._key("c:", channel))
        except _FAILURES as exc:
            log.debug("%s %s deferred until Redis is back: %s", command, channel, exc)

    def _listen(self) -> None:
        backoff, connected_before = 0.1, False
        control = self._key("ctl")
        prefix = self._key("c:").encode()
        while self._dispatch is not None:
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(control)  # always one subscription, so listen() can block
                if connected_before:  # messages may have passed us by meanwhile
                    self._deliver(Resync())
                wanted = list(self._wanted)
                self._pubsub = pubsub
                if wanted:
                    pubsub.subscribe(*[self._key("c:", c) for c in wanted])
                if connected_before:
                    log.warning("Redis bus reconnected to %s; %d channels subscribed again",
                                self.url, len(wanted))
                connected_before, backoff = True, 0.1
                for item in pubsub.listen():
                    kind, name = item["type"], item["channel"]
                    if not name.startswith(prefix):
                        continue
                    if kind == b"message" or kind == "message":
                        # Checked: anything that is not the publish script's
                        # is skipped (logged), and the listener goes on.
                        message = self._live(name[len(prefix):], item["data"])
                        if message is not None:
                            self._deliver(message)
                    elif kind == b"subscribe" or kind == "subscribe":
                        self._deliver(Live(name[len(prefix):].decode()))
            except _FAILURES as exc:
                self._pubsub = None
                log.warning("Redis bus lost its subscription (%s); reconnecting in %.1f s",
                            exc, backoff)
            finally:
                self._pubsub = None
                try:
                    pubsub.close()
                except Exception:
                    pass
            self._sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _deliver(self, item: Message | Live | Resync) -> None:
        dispatch = self._dispatch
        if dispatch is not None:
            dispatch(item)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        self._dispatch = None
        if listener is not None:
            listener.kill(block=False)
        # (A listener thread ends at its next message or reconnect: nobody to dispatch to.)

