"""Werkzeug's development server (``werkzeug.serving.run_simple``, ``flask run``),
threaded or not: request handlers are OS threads (or the main thread).

Where it keeps things:

- the socket is ``environ["werkzeug.socket"]``, the handler's plain blocking
  ``connection``;
- bytes read past the head sit in the handler's ``rfile``, a
  ``BufferedReader`` over that socket; ``environ["wsgi.input"]`` is that
  ``rfile`` (or a ``DechunkedInput`` around it, as ``_rfile``);
- ``start_response`` is a closure in ``WSGIRequestHandler.run_wsgi``, and so is
  the state that decides what is written: after iterating the app's body,
  ``execute`` calls ``write(b"")``, which sends the head (and asserts that
  ``start_response`` was called); in a ``finally`` it drains the socket with
  a selector and ``rfile.read``; an exception in ``connection_dropped_errors``
  (``ConnectionError``, timeouts) goes to ``connection_dropped``, which does
  nothing, while any other exception is logged and answered with a 500. Then
  ``handle`` reads the next request line unless ``close_connection``, and
  ``shutdown_request`` calls ``shutdown(SHUT_WR)`` and ``close()``.

How we step back: the connection is moved to a new fd (:func:`.base.swap_out`)
after the ``rfile`` buffer is drained without blocking, and the handler's
socket object is left on a stand-in whose peer is gone. Then the hijacked
status goes on to werkzeug's own ``start_response`` with no headers and the
body is empty: werkzeug logs the request with that status (its access log is
written as it starts the head), and its first write to the stand-in fails
with ``BrokenPipeError``, which it takes for a client that went away: no
error, no 500, nothing reaches the client. The drain, the next-request read
(``close_connection`` is set by the ``Connection: close`` it adds), the
shutdown and the close all meet the stand-in. The interactive debugger
(``run_simple(use_debugger=True)``, ``flask run --debug``) passes
``start_response`` through and sees an ordinary empty body, so hijack works
under it too. If another layer wraps ``start_response``, the request is not
hijackable.

Not under TLS (``run_simple(..., ssl_context=...)``, ``flask run --cert``):
the socket is then an ``ssl.SSLSocket``, whose TLS state cannot leave it;
the fd alone would carry the reactor's writes in clear text, so the
connection is declined (:func:`.base.decline_tls`) and the stream helpers
answer ``501`` with the reason, through Werkzeug's TLS socket.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from .base import ServerConnection, decline_tls, drain_buffered, swap_out


class WerkzeugConnection(ServerConnection):
    name = "werkzeug"

    __slots__ = ("environ", "sock", "rfile", "start_response")

    def __init__(self, environ: dict, sock: socket.socket, rfile: Any,
                 start_response: Any) -> None:
        self.environ = environ
        self.sock = sock
        self.rfile = rfile
        self.start_response = start_response

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> WerkzeugConnection | None:
        sock = environ.get("werkzeug.socket")
        if isinstance(sock, ssl.SSLSocket):
            return decline_tls(environ, "Werkzeug's development server (ssl_context)")
        if type(sock) is not socket.socket:
            return None
        # Only werkzeug's own start_response: then we are the outermost app
        # and werkzeug iterates the body we return.
        if getattr(start_response, "__module__", None) != "werkzeug.serving" or not getattr(
                start_response, "__qualname__", "").endswith("run_wsgi.<locals>.start_response"):
            return None
        wsgi_input = environ.get("wsgi.input")
        rfile = getattr(wsgi_input, "_rfile", wsgi_input)  # DechunkedInput keeps it there
        if not hasattr(rfile, "peek"):
            return None
        return cls(environ, sock, rfile, start_response)

    def take(self) -> tuple[socket.socket, bytes]:
        pending = drain_buffered(self.rfile, self.sock)
        self.sock.settimeout(None)
        return swap_out(self.sock), pending

    def finish(self, status: str | None) -> Any:
        # A full hijack has no status of its own: logged as 200.
        self.start_response(status or "200 OK", [])
        return []
