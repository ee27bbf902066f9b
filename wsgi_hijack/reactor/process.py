"""The process's reactor: started on first use, after any fork, in the right thread."""

from __future__ import annotations

import logging
import os
from typing import Any

import greenlet
from gevent import monkey
from gevent._hub_local import get_hub_if_exists

from .core import Reactor

log = logging.getLogger("wsgi_hijack.reactor")

_reactor: Reactor | None = None
# A real lock even under monkeypatching: OS threads may race to start it.
_reactor_lock = monkey.get_original("threading", "Lock")()


def get_reactor(own_thread: bool | None = None) -> Reactor:
    """This process's reactor, started on first use.

    Where it runs: in the calling thread's gevent hub when the caller is part
    of a gevent server (a request greenlet, or gunicorn's gevent worker in
    ``post_worker_init``); otherwise -- servers whose handlers are OS threads,
    like gunicorn's sync and gthread workers, Werkzeug or wsgiref -- in a
    gevent hub of its own, in a daemon thread, so that nothing in the app needs
    monkeypatching. ``own_thread`` forces the choice.

    A reactor inherited across ``fork`` is abandoned and a new one started:
    the reactor always starts after the fork, never before.
    """
    global _reactor
    reactor = _reactor
    if reactor is not None and reactor.pid == os.getpid() and reactor.running:
        return reactor
    with _reactor_lock:
        if _reactor is not None and _reactor.pid != os.getpid():
            _abandon(_reactor)
            _reactor = None
        if _reactor is None or not _reactor.running:
            if own_thread is None:
                own_thread = not _in_gevent_server()
            _reactor = _start_in_own_thread() if own_thread else Reactor().start()
        return _reactor


def _in_gevent_server() -> bool:
    hub = get_hub_if_exists()
    if hub is None:
        return False
    return monkey.is_module_patched("socket") or greenlet.getcurrent().parent is hub


def _start_in_own_thread() -> Reactor:
    started = monkey.get_original("threading", "Event")()
    box: list[Any] = []

    def run() -> None:
        try:
            reactor = Reactor().start()
        except BaseException as exc:
            box.append(exc)
            started.set()
            raise
        box.append(reactor)
        started.set()
        reactor._greenlet.join()  # runs this thread's hub for as long as it lives

    thread_class = monkey.get_original("threading", "Thread")
    thread_class(target=run, name="wsgi_hijack-reactor", daemon=True).start()
    started.wait()
    if isinstance(box[0], BaseException):
        raise RuntimeError("the reactor thread failed to start") from box[0]
    log.debug("reactor runs in its own thread")
    return box[0]


def current_reactor() -> Reactor | None:
    """This process's running reactor, or None; from any thread, never starts one."""
    reactor = _reactor
    if reactor is not None and reactor.pid == os.getpid() and reactor.running:
        return reactor
    return None


def _abandon(reactor: Reactor) -> None:
    # The parent's connections are the parent's: close only our copy of its epoll fd.
    try:
        if reactor._wire.epoll is not None:
            reactor._wire.close()
    except OSError:
        pass
