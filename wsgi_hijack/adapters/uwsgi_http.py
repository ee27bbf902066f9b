"""uWSGI's native HTTP socket (``uwsgi --http-socket :8000 --enable-threads``):
request handlers are the worker's threads (or its only thread), in C.

Where it keeps things:

- the socket is a bare fd, ``uwsgi.connection_fd()``; the ``uwsgi`` module
  exists only inside the server;
- the request head and any bytes read with it are in C buffers
  (``wsgi_req->proto_parser_remains``) that Python reaches only through
  ``wsgi.input``, and only up to the body's length: bytes a client sends
  right behind the head without a body (pipelined) are out of reach. So a
  request with a body is not hijackable here (its unread part may sit in
  that buffer); GET streams, which have none, are;
- after the app returns, uWSGI writes the head given to ``start_response``
  (if any) with ``write(fd)``, logs the request, and calls ``close(fd)`` (no
  ``shutdown``); with ``--http-keepalive`` it first reads the next request.

How we step back: the connection moves to a new fd and the uWSGI worker's fd
number is left on ``/dev/null`` (:func:`.base.swap_out` with ``sink``). The
hijacked status goes on to uWSGI's ``start_response`` with no headers, so its
access log shows the real status; uWSGI writes that head into ``/dev/null``,
reads EOF, and closes ``/dev/null``. Not passing a status would make uWSGI log
the request as a 500, and a stand-in with a closed peer would make it log a
failed write: ``/dev/null`` takes the write and logs nothing. A full hijack
is logged as ``200 OK``.

Not hijackable: without threads (``--enable-threads`` or ``--threads``) the
reactor's thread would not run while the worker waits in ``accept``; behind
uWSGI's own ``--http`` router or on a ``--socket`` (uwsgi protocol) the fd
is a connection to the router or a web server, not to the client; under TLS
(``--https-socket``); and for requests with a body, as said above. The reason
is logged once per process and recorded for the ``501`` answer
(:func:`.base.decline`).

TLS (``--https-socket``, which the pip-built uWSGI has when OpenSSL's
headers were there at build time: ``scripts/test.sh`` installs
``libssl-dev`` first): uWSGI keeps the TLS session in C, out of Python's
reach, and ``uwsgi.connection_fd()`` is the bare TCP fd under it. A hijack
would put the reactor's writes on it in clear text, so a request that came
over TLS (uWSGI sets ``HTTPS=on``) is declined first, whatever else the
worker serves, with a reason that says where TLS streams work; the ``501``
goes through uWSGI's own TLS.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from .base import WHY_NOT, ServerConnection, decline, decline_tls, swap_out

_ROUTED = ("http", "https", "socket", "uwsgi-socket", "https-socket", "fastcgi-socket",
           "http2", "spdy", "ssl-socket", "shared-socket", "http-to", "http-socket-modifier1")
_BODY = "a request with a body (uWSGI keeps read-ahead bytes in C)"


def why_not(uwsgi: Any, environ: dict) -> str | None:
    """Why this uWSGI request cannot be hijacked, or None when it can."""
    opt = getattr(uwsgi, "opt", {}) or {}
    if not getattr(uwsgi, "has_threads", False):
        return "threads are off: run uwsgi with --enable-threads (or --threads N)"
    if "http-socket" not in opt:
        return "only uWSGI's --http-socket hands the worker the client's own connection"
    routed = [name for name in _ROUTED if name in opt]
    if routed:
        return "the worker also serves --" + ", --".join(routed) + " (not the client's socket)"
    if environ.get("CONTENT_LENGTH", "0") not in ("", "0") or environ.get(
            "HTTP_TRANSFER_ENCODING"):
        return _BODY
    return None


class UWSGIConnection(ServerConnection):
    name = "uwsgi"

    __slots__ = ("environ", "start_response", "uwsgi")

    def __init__(self, environ: dict, start_response: Any, uwsgi: Any) -> None:
        self.environ = environ
        self.start_response = start_response
        self.uwsgi = uwsgi

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> UWSGIConnection | None:
        if "uwsgi.version" not in environ:
            return None
        uwsgi = sys.modules.get("uwsgi")
        if uwsgi is None:
            return None
        if environ.get("HTTPS") == "on":  # came over --https-socket
            return decline_tls(environ, "uWSGI's --https-socket")
        reason = why_not(uwsgi, environ)
        if reason == _BODY:  # an ordinary request, not worth a log line
            environ[WHY_NOT] = reason
            return None
        if reason is not None:
            return decline(environ, "uWSGI: " + reason)
        return cls(environ, start_response, uwsgi)

    def take(self) -> tuple[socket.socket, bytes]:
        server_sock = socket.socket(fileno=self.uwsgi.connection_fd())
        try:
            return swap_out(server_sock, sink=True), b""
        finally:
            server_sock.detach()  # the fd number stays uWSGI's, now on /dev/null

    def finish(self, status: str | None) -> Any:
        self.start_response(status or "200 OK", [])  # for its access log; goes to /dev/null
        return []
