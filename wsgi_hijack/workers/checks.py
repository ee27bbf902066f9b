"""Settings that lose clients, said once when a worker starts.

Each check returns the WARNING to log (naming the setting and the exact
fix), or None. They run in every worker of ours (:mod:`.ggevent`,
:mod:`.gthread`) and, for gunicorn's own worker classes, from the
``post_worker_init`` hook of :mod:`wsgi_hijack.gunicorn_conf`.
"""

from __future__ import annotations

import logging
import resource
from typing import Any

from .. import config
from ..admission import Admission, FdBudget

#: Below this a head deadline cuts clients whose first segments are
#: retransmitted: TCP retries after 1, 3 and 7 s.
MIN_HEAD_DEADLINE = 10.0
#: fds a worker should keep for connections on their way in when full.
MIN_ARRIVAL_ROOM = 32
CONF_HINT = "-c python:wsgi_hijack.gunicorn_conf"

log = logging.getLogger("wsgi_hijack.workers")

#: Set by the worker classes of this package once they serve: the first
#: request head then waits in the lobby, not under gunicorn's keep-alive timer.
lobby_active = False
_stock_warned = False


def nofile_limit() -> str | None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return None
    return (f"RLIMIT_NOFILE: soft limit {soft} is below the hard limit {hard}; each held "
            f"connection is one fd, so this worker holds at most about {soft} connections. "
            f"Fix: run gunicorn with {CONF_HINT} (it raises the soft limit), or "
            f"`ulimit -n {hard}` before starting it")


def head_deadline(seconds: float, setting: str, fix: str) -> str | None:
    if seconds >= MIN_HEAD_DEADLINE:
        return None
    return (f"{setting}: a request head must arrive within {seconds:g} s, shorter than "
            f"{MIN_HEAD_DEADLINE:g} s: clients whose first segments are retransmitted "
            f"(after 1, 3 and 7 s, as in a connect storm) are cut. Fix: {fix}")


def somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def backlog(value: int) -> str | None:
    cap = somaxconn()
    if cap is None or value <= cap:
        return None
    return (f"backlog = {value} is above net.core.somaxconn = {cap}: the kernel silently "
            f"uses {cap}, and a storm overflows it. Fix: `sysctl -w net.core.somaxconn="
            f"{value}` (and in /etc/sysctl.d/), or backlog = {cap}")


def fd_reserve(budget: FdBudget, admission: Admission, in_flight: int = 0) -> str | None:
    """``in_flight``: fds the worker's request handlers may hold at once
    besides their connections (thread workers)."""
    room = budget.arrival_room(admission) - in_flight
    if room >= MIN_ARRIVAL_ROOM or admission.max_held <= 0:
        return None
    want = admission.reserve + MIN_ARRIVAL_ROOM - room
    return (f"WSGI_HIJACK_FD_RESERVE={admission.reserve}: once full, this worker has "
            f"{max(room, 0)} fds left for arriving connections (it uses {budget.base} "
            f"for itself), so new clients wait unanswered. Fix: WSGI_HIJACK_FD_RESERVE={want}")


def run_checks(cfg: Any, own_lobby: bool, logger: Any = None, budget: FdBudget | None = None,
               admission: Admission | None = None, in_flight: int = 0) -> list[str]:
    """Check a worker's settings; log each problem as one WARNING; return them.

    ``own_lobby``: the worker waits for heads itself (:mod:`wsgi_hijack.lobby`),
    bounded by ``WSGI_HIJACK_HEAD_TIMEOUT``; otherwise gunicorn's
    ``keepalive`` bounds the first head. With ``budget`` and ``admission``,
    the fds left for arriving connections are checked too (:func:`fd_reserve`).
    """
    problems = [nofile_limit(), backlog(int(getattr(cfg, "backlog", 0) or 0))]
    if budget is not None and admission is not None:
        problems.append(fd_reserve(budget, admission, in_flight))
    if own_lobby:
        problems.append(head_deadline(config.head_timeout(), "WSGI_HIJACK_HEAD_TIMEOUT",
                                      "WSGI_HIJACK_HEAD_TIMEOUT=30 (the default)"))
    else:
        problems.append(head_deadline(
            float(getattr(cfg, "keepalive", 2) or 0) or float("inf"),
            f"keepalive = {getattr(cfg, 'keepalive', 2)} on gunicorn's own worker class "
            "(it bounds the first request head)",
            f"run gunicorn with {CONF_HINT}, or -k wsgi_hijack.workers.ggevent.GeventWorker "
            "(it waits for heads for WSGI_HIJACK_HEAD_TIMEOUT, 30 s)"))
    found = [p for p in problems if p]
    for problem in found:
        (logger or log).warning("wsgi_hijack: %s", problem)
    return found


def stock_gevent_worker() -> None:
    """Once per process, on the first hijack under gunicorn's own gevent worker
    (``gunicorn -k gevent wsgi_hijack:app``, no config): none of this
    package's hooks ran, so this is the one place left to say it."""
    global _stock_warned
    if lobby_active or _stock_warned:
        return
    _stock_warned = True
    log.warning("wsgi_hijack: worker_class: gunicorn's own gevent worker bounds the first "
                "request head with its keepalive timer (2 s by default): clients whose first "
                "segments are retransmitted, as in a connect storm, are cut. Fix: run "
                "gunicorn with %s, or -k wsgi_hijack.workers.ggevent.GeventWorker", CONF_HINT)
