"""Channels: publish from anywhere in the worker, with a bounded replay history.

:func:`publish` may be called from any greenlet or OS thread of the worker.
It gives the message an id, keeps it in the channel's history, and hands it
to the reactor, which frames it once per protocol and writes the same bytes
object to every subscriber.

- :mod:`.base`: the :class:`Bus` interface, :class:`Message`,
  :class:`Replay`, the events a bus dispatches, the checks of what is
  published;
- :mod:`.memory`: :class:`InProcessBus`, the default (one worker);
- :mod:`.process`: this process's bus (:func:`get_bus`, :func:`publish`);
- :mod:`wsgi_hijack.redis_bus`: the bus across workers and hosts.
"""

from .base import (
    CHANNEL_RE,
    EVENT_RE,
    Bus,
    BusUnavailable,
    Counters,
    Dispatch,
    Event,
    Live,
    Message,
    PublishError,
    Replay,
    Resync,
    check_channel,
    check_data,
    check_event,
)
from .memory import InProcessBus
from .process import get_bus, make_bus, publish

__all__ = ["CHANNEL_RE", "EVENT_RE", "Bus", "BusUnavailable", "Counters", "Dispatch", "Event",
           "InProcessBus", "Live", "Message", "PublishError", "Replay", "Resync",
           "check_channel", "check_data", "check_event", "get_bus", "make_bus", "publish"]
