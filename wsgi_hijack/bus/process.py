"""This process's bus, chosen by the configuration and made again after a fork."""

from __future__ import annotations

import os
import threading

from .. import config
from .base import Bus
from .memory import InProcessBus

_bus: Bus | None = None
_bus_pid = 0
_bus_lock = threading.Lock()


def make_bus() -> Bus:
    """The bus the configuration asks for: Redis when ``WSGI_HIJACK_REDIS_URL``
    is set (on Redis Cluster for ``redis+cluster://``), else the in-process bus."""
    url = config.redis_url()
    if url:
        # Imported here: redis-py is an optional dependency.
        if url.startswith("redis+cluster://"):
            from ..redis_cluster_bus import RedisClusterBus

            return RedisClusterBus(url)
        from ..redis_bus import RedisBus

        return RedisBus(url)
    return InProcessBus()


def get_bus() -> Bus:
    """This process's bus, made on first use (and again after a fork)."""
    global _bus, _bus_pid
    if _bus is None or _bus_pid != os.getpid():
        with _bus_lock:
            if _bus is None or _bus_pid != os.getpid():
                _bus, _bus_pid = make_bus(), os.getpid()
    return _bus


def publish(channel: str, data: str | bytes, event: str | None = None) -> int:
    """Publish on this process's bus; returns the message id. Any greenlet or thread."""
    return get_bus().publish(channel, data, event)
