"""Admission and the fd budget, in-process: the arithmetic that keeps a
worker from ``EMFILE``, exact admission across threads, and the start-up
checks' words."""

from __future__ import annotations

import resource
import threading

import pytest

from wsgi_hijack.admission import Admission, FdBudget
from wsgi_hijack.reactor import Reactor
from wsgi_hijack.workers import checks

pytestmark = pytest.mark.unit


def test_fd_budget_counts_held_arriving_base_and_margin():
    budget = FdBudget(base=20, limit=1000, margin=16)
    assert budget.room(held=900, arriving=10) == 1000 - 16 - 20 - 900 - 10
    assert budget.room(held=964, arriving=0) == 0  # full: accept nothing more
    admission = Admission(reserve=100, max_connections=None)
    full = FdBudget(base=20, limit=admission.max_held + 100, margin=16)
    assert full.arrival_room(admission) == 100 - 16 - 20


def test_admission_is_exact_when_threads_race():
    reactor = Reactor(heartbeat=3600)  # not started: admission needs no loop
    reactor.admission.max_held = 50
    admitted = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        mine = sum(reactor.admit() is None for _ in range(100))
        with lock:
            admitted.append(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(admitted) == 50
    assert reactor.stats["refused"] == 8 * 100 - 50
    for _ in range(50):
        reactor.admitted_done()
    assert reactor.admit() is None  # room again once the admitted hijacks ended


def test_checks_name_the_setting_and_the_fix(monkeypatch):
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 20000))
    nofile = checks.nofile_limit()
    assert "soft limit 1024 is below the hard limit 20000" in nofile
    assert "ulimit -n 20000" in nofile and checks.CONF_HINT in nofile
    monkeypatch.setattr(checks, "somaxconn", lambda: 4096)
    assert checks.backlog(4096) is None
    assert "sysctl -w net.core.somaxconn=8192" in checks.backlog(8192)
    assert checks.head_deadline(10, "X", "fix") is None
    assert "within 5 s" in checks.head_deadline(5, "X", "fix it") and "Fix: fix it" in \
        checks.head_deadline(5, "X", "fix it")


def test_a_reserve_that_leaves_no_room_for_arrivals_is_named():
    admission = Admission(reserve=30, max_connections=None)
    budget = FdBudget(base=25, limit=admission.max_held + 30, margin=16)
    problem = checks.fd_reserve(budget, admission)
    assert problem is not None and "WSGI_HIJACK_FD_RESERVE=30" in problem
    want = 30 + checks.MIN_ARRIVAL_ROOM - budget.arrival_room(admission)
    assert f"Fix: WSGI_HIJACK_FD_RESERVE={want}" in problem
    roomy = Admission(reserve=200, max_connections=None)
    assert checks.fd_reserve(FdBudget(base=25, limit=roomy.max_held + 200), roomy) is None
