"""The Redis bus on Redis Cluster: each channel on its shard, nothing global.

How it differs from :mod:`wsgi_hijack.redis_bus` (one server or Sentinel):

- **one slot per channel**: a channel's keys -- its id counter, its stream
  (the replay history), its evicted marker -- and its pub/sub channel share
  the hash tag ``{channel}``, so the publish script, which must touch keys of
  one slot only, runs on the channel's shard.
- **ids per channel**: a global counter would sit on one shard and put a
  second node in every publish. Each channel counts its own ids instead,
  each at least the shard's clock in microseconds, so that they never go
  back, even after a failover inside the cluster. A connection on several
  channels has a position per channel (:mod:`wsgi_hijack.bus.positions`),
  and the reactor routes each channel along its own order
  (:mod:`wsgi_hijack.reactor.channel_routing`).
- **sharded pub/sub**: ``SPUBLISH`` inside the script and ``SSUBSCRIBE`` on
  a connection to the channel's shard, so a message travels only to that
  shard, not to every node as plain ``PUBLISH`` does.
- **a subscription per shard**: one listener (greenlet) per node that owns
  channels wanted here. When one loses its node (a failover), the bus tells
  the reactor which channels lost their subscription (a
  :class:`~wsgi_hijack.bus.Resync` naming them: the other shards' channels
  go on live), reads the cluster's slot map again, and subscribes those
  channels where they now live; the reactor replays what they missed.

The rest is as on one server: ``WAIT`` for ``WSGI_HIJACK_REDIS_MIN_REPLICAS``
replicas (default 1 on a cluster) on the same connection as the publish, and
``BusUnavailable`` (``503``) while the channel's shard cannot take it.
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
)
from .bus.positions import Position, after_on
from .redis_bus import (
    _FAILURES,
    ScriptPublishing,
    _thread_local,
    publish_and_wait,
)
from .redis_bus import _PUBLISH as _PUBLISH_ONE_SERVER
from .redis_entries import CheckedReading, LiveIds, Skipped

log = logging.getLogger("wsgi_hijack.bus")

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError:  # pragma: no cover - only without the [redis] extra
    redis = None
# The same script as on one server, with sharded pub/sub: the message goes
# to the subscribers on this shard only.
_PUBLISH = _PUBLISH_ONE_SERVER.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")


class _Shard:
    """The subscription connection to one node, and the channels it carries."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.channels: set[str] = set()
        self.pubsub: Any = None
        self.runner: Any = None


class RedisClusterBus(ScriptPublishing, CheckedReading):
    """A bus on a Redis Cluster; see the module docstring."""

    confirms_subscriptions = True
    ids_per_channel = True

    def __init__(self, url: str, prefix: str | None = None, history_size: int | None = None,
                 history_age: float | None = None, max_message: int | None = None) -> None:
        if redis is None:
            raise RuntimeError("the Redis bus needs redis-py: pip install 'wsgi_hijack[redis]'")
        self.target = redis_connect.parse(url)
        if self.target.kind != "cluster":
            raise ValueError(f"{self.target.describe()} is not a redis+cluster:// URL")
        self.url = self.target.describe()
        #: What every key and pub/sub channel starts with (WSGI_HIJACK_REDIS_PREFIX).
        self.prefix = config.redis_prefix(0) if prefix is None else prefix
        self.history_size = history_size or config.history_size()
        self.history_age = history_age or config.history_age()
        self.max_message = max_message or config.max_message()
        self.min_replicas = config.redis_min_replicas(url)
        self.replica_timeout_ms = max(1, int(config.redis_replica_timeout() * 1000))
        self._clients = _thread_local()  # one cluster client per OS thread (redis_bus.py)
        self._sha = hashlib.sha1(_PUBLISH.encode()).hexdigest()
        self._wanted: set[str] = set()
        self._shards: dict[tuple[str, int], _Shard] = {}
        self._dispatch: Dispatch | None = None
        self._counters = Counters()
        # What is read from Redis is checked at the edge (redis_entries).
        self._live_ids = LiveIds()
        self._skipped = Skipped()
        # node -> pause before subscribing there again after a loss (0.1 s,
        # doubling to 5 s, forgotten once the node confirms a subscription)
        self._backoff: dict[tuple[str, int], float] = {}

    @property
    def _client(self) -> Any:
        client = getattr(self._clients, "client", None)
        if client is None:
            client = self._clients.client = redis_connect.connect(self.target)
        return client

    def _key(self, kind: str, channel: str) -> str:
        return f"{self.prefix}{{{channel}}}:{kind}"

    # -- publishing -------------------------------------------------------------------

    def _keys(self, channel: str) -> tuple[str, ...]:
        return (self._key("id", channel), self._key("s", channel), self._key("c", channel),
                self._key("ev", channel))

    def _run_publish(self, keys: tuple, args: tuple) -> tuple[int, int]:
        """On the channel's master. A node that is gone or no longer owns the
        slot (a failover, a resharding): read the slot map again, try once more."""
        for attempt in (1, 2):
            cluster = self._client
            node = cluster.get_redis_connection(cluster.get_node_from_key(keys[0]))
            try:
                return publish_and_wait(node, _PUBLISH, self._sha, keys, args,
                                        self.min_replicas, self.replica_timeout_ms)
            except _FAILURES:
                if attempt == 2:
                    raise
                cluster.nodes_manager.initialize()
        raise AssertionError("unreachable")

    def last_id(self, channel: str | None = None) -> int:
        if channel is None:
            return 0  # no global position: each channel has its own
        try:
            return int(self._client.get(self._key("id", channel)) or 0)
        except _FAILURES as exc:
            raise BusUnavailable(f"{self.url} is unavailable ({exc})") from exc

    # -- replay -----------------------------------------------------------------------

    def replay(self, channels: Iterable[str], after: Position | None,
               upto: Any = None) -> Replay:
        """Each channel's messages after its own position, up to ``upto``
        (channel -> id pairs; the channel's last id where not given)."""
        channels = list(channels)
        bound = dict(upto or ())
        if type(after) is tuple:  # channel -> id pairs, as the reactor keeps them
            after = dict(after)
        # Above the channel's last id, a position that is this channel's own
        # says messages were lost (a failover); a plain id given for several
        # channels is another channel's and says nothing.
        exact = type(after) is dict or len(channels) == 1
        oldest = time.time() - self.history_age
        found: list[Message] = []
        gap, last = False, {}
        try:
            for channel in channels:
                top = self.last_id(channel)
                last[channel] = upper = min(bound.get(channel, top), top)
                start = after_on(after, channel)
                if start is None:
                    continue
                if start > top:
                    gap = gap or exact
                    continue
                for raw_id, fields in self._client.xrange(self._key("s", channel),
                                                          min=f"({start}-0", max=f"{upper}-0"):
                    message = self._entry(channel, raw_id, fields)
                    if message is None:
                        continue  # not the publish script's: skipped, logged
                    if message.time < oldest:
                        gap = True
                        continue
                    found.append(message)
                evicted = self._evicted(channel, self._client.get(self._key("ev", channel)))
                if evicted is not None and evicted > start:
                    gap = True
        except (*_FAILURES, BusUnavailable) as exc:
            log.warning("replay from %s failed: %s", self.url, exc)
            return Replay([], True, {c: bound.get(c, 0) for c in channels}, failed=True)
        found.sort(key=lambda m: (m.id, m.channel))
        return Replay(found, gap, last)

    # -- the worker's subscriptions, one connection per shard ---------------------------

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()

    def start(self, dispatch: Dispatch) -> None:
        if not monkey.is_module_patched("socket"):
            # Each shard's listener and the reactor share the map of shards;
            # as greenlets of one thread they take turns, as OS threads they
            # would not. The gevent workers patch; the thread servers do not.
            raise RuntimeError("the Redis Cluster bus needs a gevent worker (gunicorn -k "
                               "gevent, or gevent.pywsgi): this process is not monkeypatched")
        self._dispatch = dispatch
        for channel in list(self._wanted):
            self.subscribe(channel)

    def subscribe(self, channel: str) -> None:
        self._wanted.add(channel)
        if self._dispatch is None:
            return  # start() subscribes it
        try:
            address = self._address(channel)
        except _FAILURES as exc:  # the cluster is unreachable: placed once it is back
            log.warning("no shard for %r now (%s); it is subscribed when there is", channel, exc)
            gevent.spawn(self._recover, None, {channel})
            return
        shard = self._shards.get(address)
        if shard is None:
            shard = self._shards[address] = _Shard(address)
            shard.channels.add(channel)
            shard.runner = gevent.spawn(self._listen, shard)
            return
        shard.channels.add(channel)
        self._send(shard, "ssubscribe", channel)

    def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        for shard in self._shards.values():
            if channel in shard.channels:
                shard.channels.discard(channel)
                self._send(shard, "sunsubscribe", channel)

    def _address(self, channel: str) -> tuple[str, int]:
        node = self._client.get_node_from_key(self._key("c", channel))
        return node.host, int(node.port)

    def _send(self, shard: _Shard, command: str, channel: str) -> None:
        pubsub = shard.pubsub
        if pubsub is None:
            return  # not connected yet: the listener subscribes its channels when it is
        try:
            getattr(pubsub, command)(self._key("c", channel))
        except _FAILURES as exc:
            log.debug("%s %s deferred until the shard is back: %s", command, channel, exc)

    def _listen(self, shard: _Shard) -> None:
        host, port = shard.address
        # No retries of redis-py's own: a node that is gone stays gone until
        # the cluster fails over, and _recover() finds where the channel went.
        client = redis.Redis(host=host, port=port, username=self.target.username,
                             password=self.target.password, decode_responses=False,
                             socket_connect_timeout=redis_connect.CONNECT_TIMEOUT,
                             retry=Retry(NoBackoff(), 0))
        pubsub = client.pubsub()
        prefix = f"{self.prefix}{{".encode()
        try:
            # Set first: a channel added while this subscribes is sent on
            # its own, not lost between the two (a second confirmation of a
            # subscription is harmless).
            shard.pubsub = pubsub
            for channel in list(shard.channels):  # one at a time: each its own slot
                pubsub.ssubscribe(self._key("c", channel))
            while self._dispatch is not None and self._shards.get(shard.address) is shard:
                item = pubsub.get_message(timeout=1.0)
                if item is None:
                    continue
                kind, name = _text(item["type"]), item["channel"]
                if not isinstance(name, bytes) or not name.startswith(prefix):
                    continue
                raw_channel = name[len(prefix):name.rfind(b"}")]
                if kind == "smessage":
                    # Checked: anything that is not the publish script's is
                    # skipped (logged), and the listener goes on.
                    message = self._live(raw_channel, item["data"])
                    if message is not None:
                        self._deliver(message)
                elif kind == "ssubscribe":
                    self._backoff.pop(shard.address, None)
                    self._deliver(Live(raw_channel.decode()))
        except _FAILURES as exc:
            # A failover takes seconds: no busy loop meanwhile.
            pause = self._backoff.get(shard.address, 0.1)
            self._backoff[shard.address] = min(pause * 2, 5.0)
            log.warning("Redis Cluster: lost the subscription to %s:%d (%s); again in "
                        "%.1f s", host, port, exc, pause)
            gevent.sleep(pause)
            self._recover(shard, set(shard.channels))
        finally:
            shard.pubsub = None
            try:
                pubsub.close()
            except Exception:
                pass

    def _recover(self, lost: _Shard | None, channels: set[str]) -> None:
        """``channels`` have no subscription (their shard's connection is
        gone, or their shard could not be found): tell the reactor, which
        holds their live messages back while the other channels go on, find
        where each lives now, and subscribe it there."""
        if lost is not None:
            if self._shards.get(lost.address) is lost:
                del self._shards[lost.address]
            self._deliver(Resync(tuple(sorted(channels))))
        backoff = 0.1
        while self._dispatch is not None:
            try:
                self._client.nodes_manager.initialize()
                placed = {c: self._address(c) for c in channels if c in self._wanted}
                break
            except _FAILURES as exc:
                log.warning("Redis Cluster unreachable (%s); again in %.1f s", exc, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        else:
            return
        for channel in placed:
            self.subscribe(channel)
        log.warning("Redis Cluster: %d channels subscribed again on %s", len(placed),
                    ", ".join(sorted({f"{h}:{p}" for h, p in placed.values()})))

    def _deliver(self, item: Message | Live | Resync) -> None:
        dispatch = self._dispatch
        if dispatch is not None:
            dispatch(item)

    def close(self) -> None:
        self._dispatch = None
        for shard in list(self._shards.values()):
            if isinstance(shard.runner, gevent.Greenlet):
                shard.runner.kill(block=False)
        self._shards.clear()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
