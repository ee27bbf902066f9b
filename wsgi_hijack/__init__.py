"""wsgi_hijack: Rack-style socket hijack for WSGI on gevent, and a reactor
that holds tens of thousands of connections per process.

``gunicorn -k gevent wsgi_hijack:app`` runs the demo.
"""

from .bus import BusUnavailable, PublishError, get_bus, publish
from .connection import Connection
from .hijack import (
    HIJACK,
    HIJACKABLE,
    PARTIAL_HIJACK,
    HijackedSocket,
    HijackError,
    HijackMiddleware,
    full_hijack,
    is_hijackable,
    partial_hijack,
)
from .protocols import PlainStream, Protocol, ProtocolError
from .reactor import Reactor, get_reactor

__version__ = "0.1.0"

__all__ = [
    "BusUnavailable", "PublishError", "get_bus", "publish",
    "HIJACK", "HIJACKABLE", "PARTIAL_HIJACK", "Connection", "HijackError",
    "HijackMiddleware", "HijackedSocket", "PlainStream", "Protocol", "ProtocolError",
    "Reactor", "app", "full_hijack", "get_reactor", "is_hijackable", "partial_hijack",
]


def __getattr__(name: str):
    # The demo app is imported on first use, so that importing the library
    # does not configure logging or build the demo.
    if name == "app":
        from .demo import app
        return app
    raise AttributeError(name)
