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

TLS (``certfile``) and the ``gevent_pywsgi`` flavour keep gunicorn's own
accept path: the lobby looks for the end of a clear-text head.
"""

from __future__ import annotations

import os
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
from ..lobby import Lobby
from ..reactor import get_reactor
from . import checks

#: Seconds a stopping worker still waits for heads already begun (as
#: gunicorn's gthread worker lingers for kept-alive connections); the rest
#: are answered 503 with Retry-After.
STOP_LINGER = 2.0


class GeventWorker(ggevent.GeventWorker):
    lobby: Lobby | None = None
    _told_to_stop: gevent.event.Event | None = None

    def run(self) -> None:
        if self.cfg.is_ssl or self.server_class is not None:
            checks.run_checks(self.cfg, own_lobby=False, logger=self.log)
            return super().run()
        reactor = get_reactor()
        budget = FdBudget()
        checks.run_checks(self.cfg, own_lobby=True, logger=self.log, budget=budget,
                          admission=reactor.admission)
        pool = self.pool = Pool(self.worker_connections)
        self._told_to_stop = gevent.event.Event()
        for sock in self.sockets:
            sock.setblocking(1)

        def room() -> int:
            return budget.room(reactor.holding, lobby.waiting + len(pool))

        # A listener shared with other workers (no SO_REUSEPORT): one accept
        # per wake-up, as gunicorn does, so that one worker does not take
        # a burst that others could serve.
        shared = self.cfg.workers > 1 and not os.environ.get("WSGI_HIJACK_PUBLIC_BIND")
        lobby = self.lobby = Lobby(self.sockets, self._hand_off, config.head_timeout(), room,
                                   socket_class=gevent.socket.socket,
                                   max_accept=1 if shared else 1024)
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
        if self.pool.full():
            return False
        self.pool.spawn(self._serve, listener, client)
        return True

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

    def _stop(self, lobby: Lobby, pool: Pool) -> None:
        lobby.stop_accepting()
        started = time.monotonic()
        while lobby.waiting and time.monotonic() - started < STOP_LINGER:
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
