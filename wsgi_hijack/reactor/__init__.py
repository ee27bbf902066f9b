"""The reactor: one per worker process, holding every hijacked connection.

- :mod:`.core`: :class:`Reactor`, the life of a held connection (handed
  over, stored, written, drained, dropped, closed);
- :mod:`.fanout`: the same bytes to many connections, in C where built, and
  the OS threads that may share a fan-out;
- :mod:`.process`: this process's reactor (:func:`get_reactor`,
  :func:`current_reactor`), started after any fork, in the right thread.
"""

from .core import BUS_LIVE, BUS_RESYNC, Reactor
from .process import current_reactor, get_reactor

__all__ = ["BUS_LIVE", "BUS_RESYNC", "Reactor", "current_reactor", "get_reactor"]
