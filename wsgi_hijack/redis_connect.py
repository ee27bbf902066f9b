"""Where the Redis bus finds Redis: one server, a Sentinel set, or a Cluster.

``WSGI_HIJACK_REDIS_URL`` names the deployment. Three forms:

- ``redis://[[user]:password@]host:port/db`` (or ``rediss://``, ``unix://``):
  one server, as redis-py reads it.
- ``redis+sentinel://[[user]:password@]host:port,host:port,.../service/db``:
  the sentinels, comma-separated, and the service name they monitor. The
  password is the primary's and the replicas'; sentinels that need one of
  their own take ``?sentinel_password=``. The primary is looked up through
  the sentinels on every (re)connect, so a failover moves publishing and the
  subscription to the new primary by themselves (redis-py's ``Sentinel``).
  Sentinels that are down are skipped, as long as one answers.
- ``redis+cluster://[[user]:password@]host:port,host:port,...``: seed nodes of
  a Redis Cluster (one is enough; the rest are found from it). No db: a
  cluster has only db 0. Its bus is :mod:`wsgi_hijack.redis_cluster_bus`.

Parsing is strict and its errors say what to fix: a typo in the URL must not
turn into a bus that silently talks to nobody.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote

SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")

# Short timeouts: a publish must fail fast and loudly when Redis is gone (the
# demo answers 503), and a dead sentinel must not hold up the lookup.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
SENTINEL_TIMEOUT = 1.0


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``WSGI_HIJACK_REDIS_URL``."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str = field(repr=False)  # (it may hold passwords: see hide())
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict, repr=False)

    def describe(self) -> str:
        """The URL without its passwords: for logs and error messages."""
        if self.kind == "single":
            return hide(self.url)
        nodes = ",".join(f"{h}:{p}" for h, p in self.nodes)
        if self.kind == "sentinel":
            return f"Sentinel service {self.service!r} (db {self.db}) via {nodes}"
        return f"Redis Cluster via {nodes}"


def parse(url: str) -> RedisTarget:
    """``WSGI_HIJACK_REDIS_URL`` as a :class:`RedisTarget`; ValueError says what is wrong."""
    if not url.startswith(SCHEMES):
        raise ValueError(f"WSGI_HIJACK_REDIS_URL={hide(url)!r}: expected one of "
                         f"{', '.join(SCHEMES)}")
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisTarget("single", url)
    kind = "sentinel" if url.startswith("redis+sentinel://") else "cluster"
    rest = url.split("://", 1)[1]
    rest, _, query = rest.partition("?")
    userinfo, at, hosts_and_path = rest.rpartition("@")
    if not at:
        userinfo, hosts_and_path = "", rest
    hosts, _, path = hosts_and_path.partition("/")
    username = password = None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(item, url) for item in hosts.split(",") if item.strip())
    if not nodes:
        raise ValueError(f"{hide(url)!r}: no host:port given")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    segments = [s for s in path.split("/") if s]
    if kind == "cluster":
        if segments and segments != ["0"]:
            raise ValueError(f"{hide(url)!r}: a Redis Cluster has only db 0; "
                             "drop the path")
        return RedisTarget(kind, url, nodes, username=username, password=password,
                           options=options)
    if not segments or len(segments) > 2:
        raise ValueError(f"{hide(url)!r}: expected redis+sentinel://host:port,.../"
                         "<service name>/<db>, e.g. .../mymaster/0")
    db = 0
    if len(segments) == 2:
        try:
            db = int(segments[1])
        except ValueError:
            raise ValueError(f"{hide(url)!r}: db must be a number, not "
                             f"{segments[1]!r}") from None
    return RedisTarget(kind, url, nodes, unquote(segments[0]), db, username, password,
                       options)


def database(target: RedisTarget) -> int:
    """The db number the bus uses (for a one-server URL, redis-py's own
    reading of it: ``/1``, ``?db=1``); a Cluster's is 0."""
    if target.kind != "single":
        return target.db
    from redis.connection import parse_url

    return int(parse_url(target.url).get("db") or 0)


def connect(target: RedisTarget) -> Any:
    """A redis-py client for ``target``: ``Redis`` (one server, or the primary
    of a Sentinel set, found again on each reconnect) or ``RedisCluster``."""
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry
    from redis.sentinel import Sentinel

    # One immediate retry, for a pooled connection that broke while idle (to
    # a primary that is gone): it reconnects, asking the sentinels again.
    # Not redis-py's default of three with growing pauses, which would hold a
    # publish for seconds in an outage instead of answering 503 at once.
    timeouts = {"socket_timeout": SOCKET_TIMEOUT, "socket_connect_timeout": CONNECT_TIMEOUT,
                "retry": Retry(NoBackoff(), 1)}
    if target.kind == "single":
        return redis.Redis.from_url(target.url, decode_responses=False, **timeouts)
    auth = {"username": target.username, "password": target.password}
    if target.kind == "sentinel":
        # No retry: a sentinel that is down is skipped for the next one at once.
        sentinel_kwargs = {"socket_timeout": SENTINEL_TIMEOUT,
                           "socket_connect_timeout": SENTINEL_TIMEOUT,
                           "retry": Retry(NoBackoff(), 0)}
        if "sentinel_password" in target.options:
            sentinel_kwargs["password"] = target.options["sentinel_password"]
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)
        return sentinel.master_for(target.service, db=target.db, decode_responses=False,
                                   **auth, **timeouts)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.nodes],
                        decode_responses=False, **auth, **timeouts)


def explain(exc: BaseException, target: RedisTarget) -> str:
    """What went wrong, in a line: redis-py's text for a Sentinel lookup that
    found no primary lists whole client objects."""
    from redis.sentinel import MasterNotFoundError

    if isinstance(exc, MasterNotFoundError):
        return (f"no sentinel answered with a primary for service {target.service!r} "
                "(all down, failing over, or a name they do not monitor)")
    return str(exc)


def _node(item: str, url: str) -> tuple[str, int]:
    host, colon, port = item.strip().rpartition(":")
    if not colon or not host:
        raise ValueError(f"{hide(url)!r}: {item!r} is not host:port")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"{hide(url)!r}: port of {item!r} is not a number") from None


# A query parameter that holds a password: redis-py takes ``?password=`` (and
# passes any other name on to the connection: ``ssl_password=``...), the
# Sentinel URL ``?sentinel_password=``.
_SECRET_PARAMETER = re.compile(r"(?i)([?&][^=&#]*password[^=&#]*=)([^&#]*)")


def hide(url: str) -> str:
    """``url`` with every password in it as ``***``, in every form redis-py
    or :func:`parse` reads one: ``scheme://[user]:password@``, also where the
    user information is taken up to the last ``@`` (a password with ``/`` in
    it, as the Sentinel and Cluster forms read it), and any query parameter
    whose name says password (``?password=``, ``?sentinel_password=``,
    ``?ssl_password=``), for ``redis://``, ``rediss://``, ``unix://`` and
    ours alike. For logs, errors and the doctor: never print a URL without it."""
    text = _SECRET_PARAMETER.sub(r"\1***", url)
    for userinfo in _userinfo(text):
        user, colon, secret = userinfo.partition(":")
        if colon and secret:
            text = text.replace(f"{userinfo}@", f"{user}:***@", 1)
    return text


def _userinfo(url: str) -> tuple[str, str]:
    """The user information of ``url`` as redis-py reads it (up to the first
    ``/``, ``?`` or ``#``) and as :func:`parse` does (the last ``@`` before ``?``)."""
    rest = url.partition("://")[2] if "://" in url else url
    return (re.split(r"[/?#]", rest, maxsplit=1)[0].rpartition("@")[0],
            rest.partition("?")[0].rpartition("@")[0])


def redact(text: str, url: str) -> str:
    """``text`` (an error's, say) with each password of ``url`` in it, as
    written or percent-decoded, replaced by ``***``."""
    found = {userinfo.partition(":")[2] for userinfo in _userinfo(url)}
    query = url.partition("?")[2]
    found.update(value for name, value in parse_qsl(query, keep_blank_values=True)
                 if "password" in name.lower())
    found.update(m.group(2) for m in _SECRET_PARAMETER.finditer(url))
    for secret in sorted({*found, *map(unquote, found)}, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return hide(text)
