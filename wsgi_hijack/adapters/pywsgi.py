"""``gevent.pywsgi.WSGIServer`` (and gunicorn's ``-k gevent_pywsgi``).

Where it keeps things:

- the handler (``start_response.__self__``, a ``WSGIHandler``) owns
  ``socket`` and ``rfile``, a buffered reader over the socket that holds any
  bytes read past the request head;
- ``environ["wsgi.input"]`` is an ``Input`` over that ``rfile`` (or the
  ``rfile`` itself on ``Upgrade`` requests), so the socket is reachable even
  when another middleware wrapped ``start_response``;
- after the app returns, the handler writes the head if ``start_response``
  was called, discards any unread body, and loops for the next request
  unless ``close_connection`` is set.

So: never pass ``start_response`` on (the middleware holds it back), drain the
reader's buffer without blocking, ``detach()`` the fd, mark the body as read,
set ``close_connection``, and return an empty body.

Not under TLS (``WSGIServer(..., certfile=, keyfile=)`` or ``ssl_context=``,
gunicorn's ``gevent_pywsgi`` with ``certfile``): the handler's socket is then
a ``gevent.ssl.SSLSocket``, which is a gevent socket too, but its TLS state
lives in that object. The fd taken from under it would carry the reactor's
writes in clear text on a connection the client believes encrypted, so the
connection is declined (:func:`.base.decline_tls`) and the stream helpers
answer ``501`` with the reason, through pywsgi's own TLS socket.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import gevent.socket
import gevent.ssl
from gevent import pywsgi

from .base import ServerConnection, decline_tls, drain_buffered


class PyWSGIConnection(ServerConnection):
    name = "gevent-pywsgi"

    __slots__ = ("environ", "handler", "rfile", "sock")

    def __init__(self, environ: dict, handler: Any, rfile: Any, sock: Any) -> None:
        self.environ = environ
        self.handler = handler
        self.rfile = rfile
        self.sock = sock

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> PyWSGIConnection | None:
        handler = getattr(start_response, "__self__", None)
        if isinstance(handler, pywsgi.WSGIHandler):
            rfile, sock = handler.rfile, handler.socket
        else:
            handler = None
            wsgi_input = environ.get("wsgi.input")
            if isinstance(wsgi_input, pywsgi.Input):
                rfile = wsgi_input.rfile
            elif environ.get("SERVER_SOFTWARE", "").startswith("gevent"):
                rfile = wsgi_input
            else:
                return None
            sock = getattr(getattr(rfile, "raw", None), "_sock", None)
        if isinstance(sock, (gevent.ssl.SSLSocket, ssl.SSLSocket)):
            return decline_tls(environ, "gevent.pywsgi")
        if not isinstance(sock, gevent.socket.socket):
            return None
        return cls(environ, handler, rfile, sock)

    def take(self) -> tuple[socket.socket, bytes]:
        pending = drain_buffered(self.rfile, self.sock)
        wsgi_input = self.environ.get("wsgi.input")
        if isinstance(wsgi_input, pywsgi.Input):  # so the handler discards no body
            wsgi_input.position = wsgi_input.content_length or 0
            wsgi_input.chunked_input = False
        fd = self.sock.detach()
        sock = gevent.socket.socket(fileno=fd)
        sock.settimeout(None)
        return sock, pending

    def finish(self, status: str | None) -> Any:
        if self.handler is not None:
            self.handler.close_connection = True
            self.handler._orig_status = status or "-"  # its access log only; a
            # status in .status would make it write a head after we return
        return []
