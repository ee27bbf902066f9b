"""gunicorn's ``-k sync`` and ``-k gthread`` workers: request handlers that are
OS threads, with no gevent and no monkeypatching.

Where they keep things:

- the socket is ``environ["gunicorn.socket"]``, a plain blocking stdlib
  socket; under TLS (``certfile``) an ``ssl.SSLSocket``, whose TLS state
  cannot leave it: the fd alone would carry the reactor's writes in clear
  text, so TLS connections are declined (:func:`.base.decline_tls`) and the
  stream helpers answer ``501`` with the reason, through the worker's TLS;
- bytes read past the head sit in the parser's ``Unreader`` and the
  ``Body``'s buffer, as under the gevent worker (:mod:`.gunicorn_common`);
- after the app returns, ``handle_request`` writes the head unless
  ``headers_sent``, logs the request, and says whether to keep the connection
  (``resp.should_close()``). The sync worker then always closes it:
  ``util.close_graceful(client)`` (gunicorn 26+), which is ``shutdown(SHUT_WR)``,
  a short drain of what the client sends, and ``close()``. The gthread worker
  hands the connection back to its main thread (``finish_request``), which
  either re-registers it in its selector for keep-alive (after
  ``setblocking(False)``) or calls ``TConn.close(graceful=True)``:
  ``setblocking(True)`` then ``close_graceful``.

How we step back: the worker's ``Response`` is marked as sent and closing
(:func:`.gunicorn_common.step_back`), so nothing is written, the access log
has the request, and both workers take the close path. The connection itself
is moved to a new fd (:func:`.base.swap_out`) and the worker's socket object
is left on a stand-in whose peer is gone. A plain ``detach()`` would not do
here: gthread's ``TConn.close`` calls ``setblocking(True)`` first, which
raises ``EBADF`` on a detached socket, and its ``except`` branch then counts
the connection closed a second time (``nr_conns`` drifts below zero). On the
stand-in, ``setblocking`` works, ``shutdown(SHUT_WR)`` and the drain see a
closed peer, ``close()`` closes only the stand-in: no error logged, no byte
written, the client's connection untouched. gthread's ``nr_conns`` drops by
one as for any finished request, so a held connection does not count against
``worker_connections``.

The app gets a plain blocking stdlib socket; the reactor runs in a gevent
hub of its own thread (:func:`wsgi_hijack.reactor.get_reactor`).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from .base import decline_tls, swap_out
from .gunicorn_common import GunicornConnection, take_read_ahead


class GunicornThreadConnection(GunicornConnection):
    __slots__ = ()

    @property
    def name(self) -> str:  # type: ignore[override]
        return "gunicorn-gthread" if self.environ.get("wsgi.multithread") else "gunicorn-sync"

    @classmethod
    def owns(cls, sock: Any) -> bool:
        # Exactly a stdlib stream socket: a gevent socket belongs to the gevent
        # worker, an SSLSocket carries TLS the reactor cannot speak.
        return type(sock) is socket.socket and sock.type == socket.SOCK_STREAM

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> GunicornThreadConnection | None:
        if isinstance(environ.get("gunicorn.socket"), ssl.SSLSocket):
            worker = "gthread" if environ.get("wsgi.multithread") else "sync"
            return decline_tls(environ, f"gunicorn's {worker} worker")
        return super().detect(environ, start_response)  # type: ignore[return-value]

    def take(self) -> tuple[socket.socket, bytes]:
        pending = take_read_ahead(self.environ)
        return swap_out(self.sock), pending
