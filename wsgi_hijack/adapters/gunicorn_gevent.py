"""gunicorn's ``-k gevent`` worker (``gunicorn.workers.ggevent.GeventWorker``).

Where it keeps things:

- the socket is ``environ["gunicorn.socket"]``, a gevent socket;
- bytes read past the head sit in the request parser's ``Unreader`` and the
  ``Body``'s buffer (:mod:`.gunicorn_common`, shared with the thread workers);
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

Under TLS, our worker (:mod:`wsgi_hijack.workers.ggevent`) reads requests
through a :class:`~wsgi_hijack.tls.TLSSocket`: the fd and its TLS state
leave together, and the reactor encrypts for it. gunicorn's own gevent
worker wraps the connection in gevent's ``SSLSocket`` instead, whose TLS
state cannot leave its socket object: the fd alone would carry clear text
on a connection the client believes encrypted, so those are declined (the
stream helpers answer ``501`` with the reason, through the server's TLS).
"""

from __future__ import annotations

from typing import Any

import gevent.socket
import gevent.ssl

from ..tls import TLSSocket
from ..workers import checks
from .base import decline_tls
from .gunicorn_common import GunicornConnection, take_read_ahead


class GunicornGeventConnection(GunicornConnection):
    name = "gunicorn-gevent"

    __slots__ = ()

    @classmethod
    def owns(cls, sock: Any) -> bool:
        # gunicorn's sync and gthread workers hand plain sockets: see gunicorn_threads.
        return isinstance(sock, (gevent.socket.socket, TLSSocket))

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> GunicornGeventConnection | None:
        if isinstance(environ.get("gunicorn.socket"), gevent.ssl.SSLSocket):
            return decline_tls(environ, "gunicorn's own gevent worker")
        return super().detect(environ, start_response)  # type: ignore[return-value]

    def take(self) -> tuple[Any, bytes]:
        checks.stock_gevent_worker()  # says once if this is gunicorn's own worker class
        pending = take_read_ahead(self.environ)
        if isinstance(self.sock, TLSSocket):  # the fd and its TLS state, together
            return self.sock.take(), pending
        fd = self.sock.detach()
        return gevent.socket.socket(fileno=fd), pending
