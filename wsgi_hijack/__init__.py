"""wsgi_hijack: Rack-style socket hijack for WSGI on gevent, and a reactor
that holds tens of thousands of connections per process.

``gunicorn -c python:wsgi_hijack.gunicorn_conf wsgi_hijack:app`` runs the demo.

The names below are imported on first use, not with the package: gunicorn
imports ``wsgi_hijack.gunicorn_conf`` and ``wsgi_hijack.workers`` in its
master process, before a gevent worker monkeypatches, and nothing that
makes locks or picks its mode at import (the bus, prometheus-client) may
be imported there.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BusUnavailable": "bus", "PublishError": "bus", "get_bus": "bus", "publish": "bus",
    "Connection": "connection",
    "HIJACK": "hijack", "HIJACKABLE": "hijack", "PARTIAL_HIJACK": "hijack",
    "HijackedSocket": "hijack", "HijackError": "hijack", "HijackMiddleware": "hijack",
    "full_hijack": "hijack", "is_hijackable": "hijack", "partial_hijack": "hijack",
    "PlainStream": "protocols", "Protocol": "protocols", "ProtocolError": "protocols",
    "Reactor": "reactor", "get_reactor": "reactor",
    "app": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wsgi_hijack' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
