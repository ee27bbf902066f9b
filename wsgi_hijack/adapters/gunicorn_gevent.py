"""gunicorn's ``-k gevent`` worker (``gunicorn.workers.ggevent.GeventWorker``).

Where it keeps things:

- the socket is ``environ["gunicorn.socket"]``, a gevent socket;
- bytes read past the head sit in the request parser's ``Unreader`` (reached
  through ``environ["wsgi.input"]``, a ``gunicorn.http.body.Body``) and, if the
  app read part of a body, in that ``Body``'s own buffer;
- after the app returns, ``AsyncWorker.handle_request`` writes the head if
  none was sent, then its keep-alive loop reads the next request, and
  ``handle`` closes the socket in a ``finally``.

So: ``detach()`` the fd (gunicorn's socket object becomes an empty shell, its
later ``close()`` does nothing), and end the keep-alive loop. When we hold the
worker's own ``Response`` (``start_response.__self__``, which we do when our
middleware is the outermost app), we mark it as sent and closing: gunicorn
then writes nothing, logs the request in its access log, and ends the loop by
itself. Otherwise we raise ``StopIteration``, which gunicorn's ``handle``
treats as "close this connection" and logs at debug level only.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent.socket

from .base import ServerConnection

try:  # gunicorn is a dependency, but the adapter must not break an import without it
    from gunicorn.http.wsgi import Response as _GunicornResponse
except ImportError:  # pragma: no cover
    _GunicornResponse = None


class GunicornGeventConnection(ServerConnection):
    name = "gunicorn-gevent"

    __slots__ = ("environ", "sock", "response")

    def __init__(self, environ: dict, sock: gevent.socket.socket, response: Any) -> None:
        self.environ = environ
        self.sock = sock
        self.response = response

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> GunicornGeventConnection | None:
        sock = environ.get("gunicorn.socket")
        # gunicorn's sync and gthread workers hand plain sockets: not ours (yet).
        if not isinstance(sock, gevent.socket.socket) or "gunicorn" not in environ.get(
            "SERVER_SOFTWARE", "gunicorn"
        ):
            return None
        response = getattr(start_response, "__self__", None)
        if _GunicornResponse is None or not isinstance(response, _GunicornResponse):
            response = None
        return cls(environ, sock, response)

    def take(self) -> tuple[socket.socket, bytes]:
        pending = b""
        body = self.environ.get("wsgi.input")
        buf = getattr(body, "buf", None)
        if buf is not None:  # what the app's reads pulled in but did not return
            pending += buf.getvalue()
        unreader = getattr(getattr(body, "reader", None), "unreader", None)
        if unreader is not None:
            pending += unreader.take_buffered()
        fd = self.sock.detach()
        return gevent.socket.socket(fileno=fd), pending

    def finish(self, status: str | None) -> Any:
        resp = self.response
        if resp is None:
            raise StopIteration("connection hijacked")
        resp.status = status or "-"  # access log: "-" for a full hijack
        resp.headers_sent = True  # nothing more to write, and close() writes nothing
        resp.chunked = False
        resp.force_close()  # ends gunicorn's keep-alive loop for this socket
        return []
