"""gunicorn's gthread worker, within the fd budget and with a head deadline.

``-k wsgi_hijack.workers.gthread.ThreadWorker`` (what
:mod:`wsgi_hijack.gunicorn_conf` selects for ``gthread``). The differences
from ``gunicorn.workers.gthread.ThreadWorker``:

- **accepting within the fd budget.** gunicorn's gthread accepts while
  fewer than ``worker_connections`` connections are open, and an ``EMFILE``
  from ``accept`` ends the worker. Held connections leave ``nr_conns`` at
  the hijack, so at the fd limit it would meet ``EMFILE``. Here it accepts
  only while one more fd fits (:class:`~wsgi_hijack.admission.FdBudget`);
  otherwise the connection waits in the listen queue, and accepting is
  looked at again on the main loop's next turn (at most a second).
- **the first head's deadline** is ``WSGI_HIJACK_HEAD_TIMEOUT`` from the
  accept, not ``keepalive``, and a connection that passes it gets ``408``.

What stays gunicorn's: a new connection still occupies a thread for up to
five seconds while gthread waits for its first bytes, and then waits in
gthread's own poller; the gevent worker (:mod:`.ggevent`) waits for heads
without a thread or a greenlet (both under a storm:
benchmarks/results/storm.md; at the fd limit: benchmarks/results/arrival.md).
"""

from __future__ import annotations

import time
from typing import Any

from gunicorn.workers import gthread

from .. import config
from ..admission import FdBudget
from ..lobby import PAUSE_ERRNOS, TIMEOUT_RESPONSE, PauseWarning
from ..reactor import current_reactor, get_reactor
from . import checks

#: fds a request thread may hold besides its connection (see _in_threads).
PER_THREAD = 6


class ThreadWorker(gthread.ThreadWorker):
    budget: FdBudget | None = None
    _warn_paused = PauseWarning()

    def run(self) -> None:
        self.head_timeout = config.head_timeout()
        self.budget = FdBudget()
        checks.run_checks(self.cfg, own_lobby=True, logger=self.log, budget=self.budget,
                          admission=get_reactor().admission, in_flight=self._in_threads())
        super().run()

    def _held(self) -> int:
        reactor = current_reactor()
        return reactor.holding if reactor is not None else 0

    def _room(self) -> int:
        if self.budget is None:
            return 1
        # A connection being served counts twice: once hijacked, its fd moves
        # to the reactor (held) while gthread keeps a stand-in fd until its
        # main thread finishes the request, which may be seconds later (it
        # closes refused connections gracefully, one at a time). Those kept
        # alive or waiting for their first bytes sit in gthread's poller.
        waiting = len(self.keepalived_conns) + len(self.pending_conns)
        served = max(0, self.nr_conns - waiting)
        return self.budget.room(self._held(), self.nr_conns + served + self._in_threads())

    def _in_threads(self) -> int:
        # What each request thread may open for a moment beside its
        # connection: a hijack moves the connection to a new fd and leaves a
        # stand-in (adapters.base.swap_out: 3 at the peak), gthread's wait for
        # the first bytes opens a selector, a /metrics scrape reads files.
        return PER_THREAD * self.cfg.threads

    def set_accept_enabled(self, enabled: bool) -> None:
        # gthread's loop turns accepting on whenever nr_conns allows; the fd
        # budget has the last word.
        super().set_accept_enabled(enabled and self._room() > 0)

    def accept(self, listener: Any) -> None:
        if self._room() <= 0:
            self.set_accept_enabled(False)
            return
        try:
            super().accept(listener)
        except OSError as exc:
            if exc.errno not in PAUSE_ERRNOS:
                raise
            self.set_accept_enabled(False)
            self._warn_paused(exc, self.log)

    def enqueue_req(self, conn: Any) -> None:
        if not hasattr(conn, "accepted_at"):
            conn.accepted_at = time.monotonic()
        super().enqueue_req(conn)

    def finish_request(self, conn: Any, fs: Any) -> None:
        super().finish_request(conn, fs)
        if conn in self.pending_conns:  # no head yet: its deadline is the head's own
            conn.timeout = conn.accepted_at + self.head_timeout

    def murder_pending(self) -> None:
        # As gunicorn's, from the oldest, but with an answer: 408.
        now = time.monotonic()
        while self.pending_conns:
            conn = self.pending_conns[0]
            if conn.timeout > now:
                break
            self.pending_conns.popleft()
            try:
                self.poller.unregister(conn.sock)
            except (OSError, KeyError, ValueError):
                pass
            self.nr_conns -= 1
            try:
                conn.sock.send(TIMEOUT_RESPONSE)
            except OSError:
                pass
            conn.close()
