"""gunicorn's gevent worker, accepting through the lobby.

``-k wsgi_hijack.workers.ggevent.GeventWorker`` (what
:mod:`wsgi_hijack.gunicorn_conf` selects for ``gevent``). It differs from
``gunicorn.workers.ggevent.GeventWorker`` only in how connections arrive:

- gevent's ``StreamServer`` accepts whenever a pool slot is free and gives
  each connection a greenlet that waits for its head, bounded by
  ``keepalive``. At the fd limit its accept loop meets ``EMFILE``, logs a
  traceback and backs off, while clients wait unanswered.
- Here the :class:`~wsgi_hijack.lobby.Lobby` accepts, within the fd budget
  (:class:`~wsgi_hijack.admission.FdBudget`: held connections, connections
  on their way in and the worker's own files never pass ``RLIMIT_NOFILE``),
  and parks each connection without a greenlet until its head is complete
  or ``WSGI_HIJACK_HEAD_TIMEOUT`` passes. Only then does a pool greenlet run
  gunicorn's own ``handle``, which reads the head at once; from the second
  request on, ``keepalive`` keeps its meaning.

The two accept paths side by side, at the fd limit and under slow heads:
benchmarks/results/arrival.md.

With TLS (``certfile``), the lobby waits for the client's first TLS record
instead of a clear-text head, and the pool greenlet does the handshake
itself (:class:`~wsgi_hijack.tls.TLSSocket`, bounded by the same head
deadline): the TLS state then goes with a hijacked connection to the
reactor, which encrypts every write for it. gunicorn's own TLS socket would
keep that state bound to its fd, where the reactor cannot speak it
(docs/tls.rst). The ``gevent_pywsgi`` flavour keeps gunicorn's own accept
path.
"""

from __future__ import annotations

import os
import ssl
import time
from typing import Any

import gevent
import gevent.event
import gevent.socket
from gevent.pool import Pool
from gunicorn.workers import ggevent

from .. import config, metrics
from ..admission import FdBudget
from ..handoff import worker as handoff
from ..lobby import TIMEOUT_RESPONSE, Lobby, head_state
from ..reactor import get_reactor
from ..tls import TLSError, TLSSocket
from . import checks

#: Seconds a stopping worker still waits for heads already begun (as
#: gunicorn's gthread worker lingers for kept-alive connections); the rest
#: are answered 503 with Retry-After.
STOP_LINGER = 2.0


class GeventWorker(ggevent.GeventWorker):
    lobby: Lobby | None = None
    _told_to_stop: gevent.event.Event | None = None
    #: The server's TLS settings when ``certfile`` is set (our handshake).
    _tls: ssl.SSLContext | None = None
    #: TLS connections between the lobby and a pool slot: in their handshake
    #: or waiting for their head (each an fd and a greenlet, no slot).
    _handshaking = 0

    def run(self) -> None:
        if self.server_class is not None:
            checks.run_checks(self.cfg, own_lobby=False, logger=self.log)
            return super().run()
        if self.cfg.is_ssl:
            self._tls = tls_context(self.cfg, self.log)
        reactor = get_reactor()
        budget = FdBudget()
        checks.run_checks(self.cfg, own_lobby=True, logger=self.log, budget=budget,
                          admission=reactor.admission)
        pool = self.pool = Pool(self.worker_connections)
        self._told_to_stop = gevent.event.Event()
        for sock in self.sockets:
            sock.setblocking(1)

        def room() -> int:
            return budget.room(reactor.holding,
                               lobby.waiting + len(pool) + self._handshaking)

        # A listener shared with other workers (no SO_REUSEPORT): one accept
        # per wake-up, as gunicorn does, so that one worker does not take
        # a burst that others could serve.
        shared = self.cfg.workers > 1 and not os.environ.get("WSGI_HIJACK_PUBLIC_BIND")
        lobby = self.lobby = Lobby(self.sockets, self._hand_off, config.head_timeout(), room,
                                   socket_class=gevent.socket.socket,
                                   max_accept=1 if shared else 1024, tls=self._tls is not None)
        lobby.start()
        checks.lobby_active = True
        lobby_metrics = metrics.create_lobby()
        while self.alive:
            self.notify()
            if lobby_metrics is not None:
                lobby_metrics.sync(lobby.stats, lobby.waiting)
            self._told_to_stop.wait(1.0)
        self._stop(lobby, pool)

    def handle_exit(self, sig: Any, frame: Any) -> None:
        # Stop being a successor at once: the park must not give this worker
        # connections while it leaves (wsgi_hijack.handoff.worker). And leave
        # now, not at the loop's next check a second later: the clients wait
        # for the successor meanwhile (benchmarks/results/handoff/).
        handoff.leaving()
        super().handle_exit(sig, frame)
        self._wake()

    def handle_request(self, *args: Any) -> Any:
        try:
            return super().handle_request(*args)
        finally:
            if not self.alive:  # max_requests reached: leave now as well
                self._wake()

    def _wake(self) -> None:
        if self._told_to_stop is not None:
            self._told_to_stop.set()

    def _hand_off(self, client: Any, listener: Any) -> bool:
        if self._tls is not None:
            # The handshake and the head take a greenlet, not a pool slot: a
            # client that stalls there must not keep others from being served
            # (the fd budget bounds how many wait, as in the lobby).
            self._handshaking += 1
            gevent.spawn(self._serve_tls, listener, client)
            return True
        if self.pool.full():
            return False
        self.pool.spawn(self._serve, listener, client)
        return True

    def _serve_tls(self, listener: Any, client: Any) -> None:
        try:
            tls = self._handshake(client)
            if tls is None:
                return
            self.pool.wait_available()  # a slot once the head is in
        finally:
            self._handshaking -= 1
        self.pool.spawn(self._serve, listener, tls)

    def _serve(self, listener: Any, client: Any) -> None:
        try:
            try:
                addr = client.getpeername()
            except OSError:  # reset while it waited for a slot
                client.close()
                return
            self.handle(listener, client, addr)
        finally:
            if self.lobby is not None and self.lobby.waiting:
                self.lobby.wake()  # a slot is free for a ready head

    def _handshake(self, client: Any) -> TLSSocket | None:
        """The TLS handshake, then the request head, both within the head
        deadline, as the lobby waits for a clear-text head; None when either
        failed (the client got the alert that says why, or a 408, and is
        closed). A greenlet waits here, where the lobby needs none: the TLS
        state costs more than the greenlet (benchmarks/results/tls.md)."""
        assert self._tls is not None
        deadline = time.monotonic() + config.head_timeout()
        try:
            tls = TLSSocket.accept(client, self._tls, deadline)
        except (TLSError, OSError) as exc:  # TimeoutError is an OSError
            self.log.debug("TLS handshake failed: %s", exc)
            client.close()
            return None
        try:
            if tls.wait_for(lambda head: head_state(head) != "partial", deadline):
                return tls
            if tls.take_pending():  # part of a head, then silence: say so
                tls.sendall(TIMEOUT_RESPONSE)
        except (TLSError, OSError) as exc:
            self.log.debug("TLS connection failed before its head: %s", exc)
        tls.close()
        return None

    def _stop(self, lobby: Lobby, pool: Pool) -> None:
        lobby.stop_accepting()
        started = time.monotonic()
        while (lobby.waiting or self._handshaking) and \
                time.monotonic() - started < STOP_LINGER:
            gevent.sleep(0.1)
        lobby.close()
        # Then as gunicorn: requests in flight get graceful_timeout.
        while time.monotonic() - started <= self.cfg.graceful_timeout:
            if not len(pool):
                return
            self.notify()
            gevent.sleep(0.5)
        self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
        pool.kill(timeout=1)


def tls_context(cfg: Any, logger: Any) -> ssl.SSLContext:
    """gunicorn's own TLS settings (``certfile``, ``keyfile``, ``ca_certs``,
    ``cert_reqs``, ``ciphers``, the ``ssl_context`` hook), with two changes:

    - no renegotiation: a client may not start a new handshake in the middle
      of a stream the reactor holds (TLS 1.3 has none anyway);
    - ALPN offers HTTP/1.1 only: a held stream is an HTTP/1.1 connection of
      its own. HTTP/2 to browsers belongs to a proxy in front (docs/tls.rst).
    """
    from gunicorn.sock import _get_alpn_protocols, ssl_context

    context = ssl_context(cfg)
    context.options |= ssl.OP_NO_RENEGOTIATION
    if "h2" in _get_alpn_protocols(cfg):
        logger.warning("wsgi_hijack: http_protocols asks for HTTP/2 over TLS; this worker "
                       "speaks HTTP/1.1 on TLS connections (held streams are connections of "
                       "their own): terminate TLS and HTTP/2 at a proxy in front instead "
                       "(docs/tls.rst)")
        context.set_alpn_protocols(["http/1.1"])
    return context
