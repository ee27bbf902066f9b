"""Settings read from the environment, checked once, with errors that say what to fix."""

from __future__ import annotations

import os

DEFAULT_HEARTBEAT = 10.0
DEFAULT_MAX_BUFFER = 64 * 1024


def _positive(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a positive {kind.__name__}") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r}: expected a positive {kind.__name__}")
    return value


def heartbeat_interval() -> float:
    """Seconds between heartbeat rounds: ``WSGI_HIJACK_HEARTBEAT``, default 10."""
    return _positive("WSGI_HIJACK_HEARTBEAT", DEFAULT_HEARTBEAT)


def max_buffer() -> int:
    """Bytes a connection may have waiting to be sent before it is dropped as
    a client that stopped reading: ``WSGI_HIJACK_MAX_BUFFER``, default 64 KiB.
    This is on top of what the kernel's socket send buffer already holds."""
    return int(_positive("WSGI_HIJACK_MAX_BUFFER", DEFAULT_MAX_BUFFER, int))


def send_threads() -> int:
    """OS threads that share each fan-out of 10,000 connections or more (a
    heartbeat round, a message): ``WSGI_HIJACK_SEND_THREADS``, default 1 (the
    reactor's own thread only). Opt-in: more threads shorten a large round at
    about the same CPU per heartbeat, on cores the worker may not have to
    spare (benchmarks/results/results.md, benchmarks/results/threads/results.md)."""
    return int(_positive("WSGI_HIJACK_SEND_THREADS", 1, int))


def log_level() -> str:
    """Level of the ``wsgi_hijack`` loggers: ``WSGI_HIJACK_LOG_LEVEL``, default INFO
    (each heartbeat round is logged at INFO)."""
    level = os.environ.get("WSGI_HIJACK_LOG_LEVEL", "INFO").strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"WSGI_HIJACK_LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING, "
                         "ERROR or CRITICAL")
    return level


def history_size() -> int:
    """Messages kept per channel for replay: ``WSGI_HIJACK_HISTORY_SIZE``, default 1000."""
    return int(_positive("WSGI_HIJACK_HISTORY_SIZE", 1000, int))


def history_age() -> float:
    """Seconds a message stays in the replay history: ``WSGI_HIJACK_HISTORY_AGE``,
    default 3600."""
    return _positive("WSGI_HIJACK_HISTORY_AGE", 3600.0)


def max_message() -> int:
    """Largest message, in UTF-8 bytes: ``WSGI_HIJACK_MAX_MESSAGE``, default 64 KiB."""
    return int(_positive("WSGI_HIJACK_MAX_MESSAGE", 64 * 1024, int))


def poll_timeout() -> float:
    """Seconds a long-poll is held before it answers with no messages:
    ``WSGI_HIJACK_POLL_TIMEOUT``, default 25 (under common proxies' 30 s)."""
    return _positive("WSGI_HIJACK_POLL_TIMEOUT", 25.0)


def sse_retry_ms() -> int:
    """The SSE ``retry`` hint sent to each new stream, in milliseconds:
    ``WSGI_HIJACK_SSE_RETRY``, default 2000."""
    return int(_positive("WSGI_HIJACK_SSE_RETRY", 2000, int))


def redis_url() -> str | None:
    """``WSGI_HIJACK_REDIS_URL``: use the Redis bus, shared by every worker and
    host. One server (``redis://127.0.0.1:6379/0``), a Sentinel set
    (``redis+sentinel://h:26379,h:26380/mymaster/0``) or a Cluster
    (``redis+cluster://h:7000,h:7001``): :mod:`wsgi_hijack.redis_connect`.
    Unset: the in-process bus."""
    from .redis_connect import parse

    url = os.environ.get("WSGI_HIJACK_REDIS_URL", "").strip()
    if url:
        parse(url)  # raises ValueError, saying what to fix
    return url or None


#: What a Redis key prefix may hold (as a channel name): no braces, so that
#: a Cluster's hash tag stays the channel's, and no spaces.
_PREFIX_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


def redis_prefix(db: int = 0) -> str:
    """``WSGI_HIJACK_REDIS_PREFIX``: what every key, stream and pub/sub channel
    of the Redis bus starts with, so that deployments sharing one Redis
    never hear each other. Default ``wsgi_hijack:`` on db 0 (the keys of
    earlier versions, kept), ``wsgi_hijack:<db>:`` on any other db: pub/sub
    ignores the db number, so two deployments on two dbs would otherwise
    receive each other's messages. On a Cluster (db 0 only) and whenever
    several deployments share a db, give each its own. 1 to 64 characters
    from ``A-Z a-z 0-9 _ . : -``."""
    raw = os.environ.get("WSGI_HIJACK_REDIS_PREFIX")
    if raw is None or raw == "":
        return "wsgi_hijack:" if db == 0 else f"wsgi_hijack:{db}:"
    if not 1 <= len(raw) <= 64 or not set(raw) <= _PREFIX_CHARS:
        raise ValueError(f"WSGI_HIJACK_REDIS_PREFIX={raw!r}: expected 1 to 64 characters from "
                         "A-Z a-z 0-9 _ . : -")
    return raw


def redis_min_replicas(url: str, environ: dict[str, str] | None = None) -> int:
    """Replicas that must have a message before its publish succeeds:
    ``WSGI_HIJACK_REDIS_MIN_REPLICAS``. Default 1 with Sentinel (so that a
    failover keeps what was acknowledged: docs/operations.rst) and on a
    Cluster, else 0.
    ``environ``: another process's environment (the doctor's look at a server)."""
    raw = (os.environ if environ is None else environ).get(
        "WSGI_HIJACK_REDIS_MIN_REPLICAS", "").strip()
    if not raw:
        return 1 if url.startswith(("redis+sentinel://", "redis+cluster://")) else 0
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"WSGI_HIJACK_REDIS_MIN_REPLICAS={raw!r}: expected an int >= 0")
    return value


def redis_replica_timeout() -> float:
    """Seconds a publish waits for ``redis_min_replicas`` replicas to confirm
    it before it fails (503): ``WSGI_HIJACK_REDIS_REPLICA_TIMEOUT``, default 0.5."""
    return _positive("WSGI_HIJACK_REDIS_REPLICA_TIMEOUT", 0.5)


def head_timeout() -> float:
    """Seconds a new connection may take to send its complete request head:
    ``WSGI_HIJACK_HEAD_TIMEOUT``, default 30 (Puma's ``first_data_timeout``).
    Past it the connection gets ``408`` and is closed. Shorter than 10 s cuts
    clients whose first segments are retransmitted (after 1, 3 and 7 s), so
    the worker warns (:mod:`wsgi_hijack.workers.checks`)."""
    return _positive("WSGI_HIJACK_HEAD_TIMEOUT", 30.0)


def fd_reserve() -> int:
    """File descriptors kept free for ordinary requests and files:
    ``WSGI_HIJACK_FD_RESERVE``, default 100."""
    return int(_positive("WSGI_HIJACK_FD_RESERVE", 100, int))


def max_connections() -> int | None:
    """Held connections per worker at most: ``WSGI_HIJACK_MAX_CONNECTIONS``;
    default: the fd limit minus the reserve."""
    return int(_positive("WSGI_HIJACK_MAX_CONNECTIONS", 0, int)) or None


def max_per_ip() -> int | None:
    """Held connections per client address at most: ``WSGI_HIJACK_MAX_PER_IP``;
    default off (see wsgi_hijack.admission for when to turn it on)."""
    return int(_positive("WSGI_HIJACK_MAX_PER_IP", 0, int)) or None


def sse_restart_retry_ms() -> int:
    """The SSE ``retry`` hint written when a worker exits, in milliseconds:
    ``WSGI_HIJACK_SSE_RESTART_RETRY``, default 1000."""
    return int(_positive("WSGI_HIJACK_SSE_RESTART_RETRY", 1000, int))


def ws_max_message() -> int:
    """Largest WebSocket message a client may send, in bytes (all its frames
    together): ``WSGI_HIJACK_WS_MAX_MESSAGE``, default 64 KiB. A bigger one is
    refused with close code 1009 as soon as its frame header announces it."""
    return int(_positive("WSGI_HIJACK_WS_MAX_MESSAGE", 64 * 1024, int))


def ws_pong_timeout() -> float:
    """Seconds a WebSocket peer may stay silent (no pong, no frame at all) before
    it is closed with code 1011: ``WSGI_HIJACK_WS_PONG_TIMEOUT``; default three
    heartbeat intervals (30 s). Pings go out each heartbeat and liveness is
    checked right after, so it must be longer than the heartbeat interval."""
    return _positive("WSGI_HIJACK_WS_PONG_TIMEOUT", 3 * heartbeat_interval())


def ws_max_queue() -> int:
    """Messages from one WebSocket client that may wait for the app's callback:
    ``WSGI_HIJACK_WS_MAX_QUEUE``, default 64. A client that sends faster than
    its callback handles them is closed with code 1008."""
    return int(_positive("WSGI_HIJACK_WS_MAX_QUEUE", 64, int))


def publish_token() -> str | None:
    """``WSGI_HIJACK_PUBLISH_TOKEN``: the demo's ``POST /publish`` (and its
    WebSocket chat) then needs ``Authorization: Bearer <token>``, from any
    address. Unset: only loopback clients may publish, and ``POST /publish``
    refuses the content types a page on any site can send
    (:mod:`wsgi_hijack.demo_publish`)."""
    return os.environ.get("WSGI_HIJACK_PUBLISH_TOKEN") or None


def allowed_origins() -> tuple[str, ...]:
    """``WSGI_HIJACK_ALLOWED_ORIGINS``: the browser origins (``scheme://host[:port]``,
    separated by commas or spaces; ``*`` for any) whose pages may open a
    WebSocket and publish in the demo, besides the server's own origin on a
    loopback address (``http://127.0.0.1:8000``, ``http://localhost:8000``).
    Default: none besides. The ``Host`` header alone never makes an origin
    allowed: a DNS rebinding page sends its own name in both
    (:func:`wsgi_hijack.websocket.origin_allowed`)."""
    raw = os.environ.get("WSGI_HIJACK_ALLOWED_ORIGINS", "")
    origins = []
    for item in raw.replace(",", " ").split():
        origin = item.strip().lower().rstrip("/")
        if origin != "*" and ("://" not in origin or origin.count("/") != 2):
            raise ValueError(f"WSGI_HIJACK_ALLOWED_ORIGINS: {item!r} is not an origin; expected "
                             "scheme://host[:port] (no path), or *")
        origins.append(origin)
    return tuple(origins)


def handoff_enabled() -> bool:
    """``WSGI_HIJACK_HANDOFF``: ``1`` (default) moves held connections to the
    successor worker on a reload or recycle (:mod:`wsgi_hijack.handoff`);
    ``0`` closes them with their goodbye, and clients reconnect."""
    raw = os.environ.get("WSGI_HIJACK_HANDOFF", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"WSGI_HIJACK_HANDOFF={raw!r}: expected 0 or 1")
    return raw == "1"


def handoff_dir() -> str | None:
    """``WSGI_HIJACK_HANDOFF_DIR``: the deployment's private directory, where
    its workers and masters meet to move connections. Default: a new one
    made ``0700`` by the master, with a random name
    (``wsgi_hijack-<uid>-<deployment hash>-<random>``, under
    ``$XDG_RUNTIME_DIR`` when that is this user's own, else the temporary
    directory), inherited by everything the master starts. One named here
    that another user owns, or that is open to others, is refused with a
    warning and a private one made instead (:mod:`wsgi_hijack.handoff.rendezvous`)."""
    return os.environ.get("WSGI_HIJACK_HANDOFF_DIR", "").strip() or None


def deployment() -> str | None:
    """``WSGI_HIJACK_DEPLOYMENT``: what identifies this deployment, so that no
    other deployment of the same user takes its connections at a restart.
    Default: the sorted list of the addresses it binds (``127.0.0.1:8000``,
    ``unix:/run/app.sock``); set it when the binds do not tell two
    deployments apart (``fd://`` binds inherited from systemd, say). A
    reload or a binary upgrade keeps the identity the first master took."""
    return os.environ.get("WSGI_HIJACK_DEPLOYMENT", "").strip() or None


def handoff_timeout() -> float:
    """Seconds moved connections wait for a successor to take them:
    ``WSGI_HIJACK_HANDOFF_TIMEOUT``, default 30 (gunicorn's graceful
    timeout). Past it they get their goodbye, and clients reconnect."""
    return _positive("WSGI_HIJACK_HANDOFF_TIMEOUT", 30.0)
