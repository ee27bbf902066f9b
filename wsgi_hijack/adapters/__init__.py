"""Server adapters: one module per server kind, each knowing how to detach
the client connection from that server and step back cleanly.

:func:`detect` asks each in turn; the first that recognises the request wins.
``None`` means this server cannot hijack, and the environ says so.
"""

from __future__ import annotations

from typing import Any

from .base import WHY_NOT, ServerConnection
from .gunicorn_gevent import GunicornGeventConnection
from .gunicorn_threads import GunicornThreadConnection
from .pywsgi import PyWSGIConnection
from .resume import ResumedConnection
from .uwsgi_http import UWSGIConnection
from .werkzeug import WerkzeugConnection

# A resumed connection (moved here from another worker) first: it is no
# server's. Then pywsgi: gunicorn's gevent_pywsgi worker also sets gunicorn.socket,
# but the connection belongs to a pywsgi handler there. The gunicorn adapters
# tell their workers apart by the socket's class (gevent or stdlib), and
# werkzeug and uWSGI by their own environ keys.
ADAPTERS: list[Any] = [ResumedConnection, PyWSGIConnection, GunicornGeventConnection,
                       GunicornThreadConnection, WerkzeugConnection, UWSGIConnection]


def detect(environ: dict, start_response: Any) -> ServerConnection | None:
    for adapter in ADAPTERS:
        conn = adapter.detect(environ, start_response)
        if conn is not None:
            return conn
        if WHY_NOT in environ:  # the adapter that knew this server has said why not;
            return None  # a later one must not put its own reason over it
    return None


__all__ = ["ServerConnection", "detect", "ADAPTERS"]
