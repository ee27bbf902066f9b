"""Cross-thread entry: work handed to the reactor's hub thread.

The reactor's state belongs to one OS thread, the one whose gevent hub runs
it. Another thread (a request thread of gunicorn's gthread worker, a
publisher, a test) that must act on that state hands a function over and,
where it needs the result, waits for it; the hub's loop runs the function
between two of its own steps, so no lock guards the reactor's structures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from gevent import monkey

T = TypeVar("T")

# The real thread id and event even under monkeypatching (where threading's
# are per greenlet).
_thread_ident = monkey.get_original("_thread", "get_ident")
_Event = monkey.get_original("threading", "Event")


class HubEntry:
    """The one way into a hub's thread from any other."""

    __slots__ = ("_loop", "thread")

    def __init__(self, hub: Any) -> None:
        self._loop = hub.loop
        #: The OS thread the hub runs in (made from within it).
        self.thread = _thread_ident()

    def in_hub(self) -> bool:
        return _thread_ident() == self.thread

    def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the hub's thread soon; from any thread, never waits."""
        self._loop.run_callback_threadsafe(fn, *args)

    def call_and_wait(self, fn: Callable[[], T], timeout: float, default: T) -> T:
        """``fn()`` in the hub's thread and its result; in that thread, at once.

        From another thread, waits at most ``timeout`` seconds and then gives
        ``default`` (the hub may be stopping or blocked: the caller must not
        hang with it).
        """
        if self.in_hub():
            return fn()
        done, box = _Event(), []

        def run() -> None:
            try:
                box.append(fn())
            finally:
                done.set()

        self.call_soon_threadsafe(run)
        done.wait(timeout)
        return box[0] if box else default
