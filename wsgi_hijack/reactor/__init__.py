"""The reactor: one per worker process, holding every hijacked connection.

- :mod:`.core`: :class:`Reactor`, the life of a held connection (handed
  over, stored, written, drained, dropped, closed);
- :mod:`.messages`: published messages on their way, from the bus to the writes;
- :mod:`.routing`: who gets which message, exactly once (sans-IO);
- :mod:`.heartbeats`: the heartbeat groups and the liveness checks;
- :mod:`.fanout`: the same bytes to many connections, in C where built, and
  the OS threads that may share a fan-out;
- :mod:`.timers`, :mod:`.entry`, :mod:`.occupancy`: the loop's timer heap,
  the way in from other threads, the exact count of what is held;
- :mod:`.process`: this process's reactor (:func:`get_reactor`,
  :func:`current_reactor`), started after any fork, in the right thread.
"""

from .core import Reactor
from .process import current_reactor, get_reactor

__all__ = ["Reactor", "current_reactor", "get_reactor"]
