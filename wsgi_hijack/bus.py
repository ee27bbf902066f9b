"""Channels: publish from anywhere in the worker, with a bounded replay history.

:func:`publish` may be called from any greenlet or OS thread of the worker.
It gives the message an id, keeps it in the channel's history, and hands it
to the reactor, which frames it once per protocol and writes the same bytes
object to every subscriber.

Ids are one counter for the whole bus, not one per channel. SSE carries a
single ``Last-Event-ID`` per connection, and a connection may listen to
several channels: with one counter, "everything after id N" means the same
thing on every channel, and replay over several channels is one merge in id
order. Ids are positive integers, increasing in publish order.

The history of a channel is bounded by count and age. When messages leave it,
the channel remembers the highest id it let go (``evicted``): a client asking
for messages after an id lower than that has missed some, and is told so
(:class:`Replay.gap`) instead of being silently skipped ahead.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gevent import monkey

from . import config

# A real OS lock even under monkeypatching: publish() may run in OS threads,
# and a gevent lock is not safe across threads. It is held for microseconds.
_Lock = monkey.get_original("threading", "Lock")

CHANNEL_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
EVENT_RE = re.compile(r"[^\r\n\x00]{1,128}")


class PublishError(ValueError):
    """A message that cannot be published as given; the text says why."""


class BusUnavailable(RuntimeError):
    """The bus cannot take messages now (e.g. its server is down); retry later."""


class Message:
    """One published message. Frames are cached per protocol: framed once."""

    __slots__ = ("id", "channel", "data", "event", "time", "frames")

    def __init__(self, id: int, channel: str, data: str, event: str | None,
                 time: float) -> None:
        self.id = id
        self.channel = channel
        self.data = data
        self.event = event
        self.time = time
        #: protocol -> bytes, filled by the reactor the first time it is needed.
        self.frames: dict[Any, bytes] = {}

    def as_dict(self) -> dict:
        return {"id": self.id, "channel": self.channel, "event": self.event, "data": self.data}

    def __repr__(self) -> str:
        return f"<Message {self.id} {self.channel} {self.event!r} {len(self.data)} chars>"


@dataclass
class Replay:
    """What a client that last saw ``after`` has missed on its channels."""

    messages: list[Message] = field(default_factory=list)
    #: True when some of what it missed is no longer in the history.
    gap: bool = False
    #: The highest id this replay covers: continue after it.
    last_id: int = 0


def check_channel(channel: Any) -> str:
    if not isinstance(channel, str) or not CHANNEL_RE.fullmatch(channel):
        raise PublishError(f"invalid channel name {channel!r}: use 1 to 128 characters "
                           "from A-Z a-z 0-9 _ . : -")
    return channel


def check_event(event: Any) -> str | None:
    if event is None:
        return None
    if not isinstance(event, str) or not EVENT_RE.fullmatch(event):
        raise PublishError(f"invalid event name {event!r}: 1 to 128 characters, "
                           "no CR, LF or NUL (they would inject SSE fields)")
    return event


def check_data(data: Any, limit: int) -> str:
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PublishError(f"message is not valid UTF-8: {exc}") from None
    if not isinstance(data, str):
        raise PublishError(f"message data must be str or UTF-8 bytes, not {type(data).__name__}")
    try:
        size = len(data.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise PublishError(f"message cannot be encoded as UTF-8: {exc}") from None
    if size > limit:
        raise PublishError(f"message is {size} bytes, over the limit of {limit} "
                           "(WSGI_HIJACK_MAX_MESSAGE)")
    return data


class _History:
    __slots__ = ("messages", "evicted")

    def __init__(self) -> None:
        self.messages: deque[Message] = deque()
        self.evicted = 0


class InProcessBus:
    """The default bus: one worker, no dependency.

    Messages reach the subscribers of this process only. With several
    workers, use a cross-worker bus (the Redis bus), or publishes would reach
    one worker's clients only.
    """

    def __init__(self, history_size: int | None = None, history_age: float | None = None,
                 max_message: int | None = None) -> None:
        self.history_size = history_size or config.history_size()
        self.history_age = history_age or config.history_age()
        self.max_message = max_message or config.max_message()
        self._lock = _Lock()
        self._last_id = 0
        self._channels: dict[str, _History] = {}

    def publish(self, channel: str, data: str | bytes, event: str | None = None) -> int:
        """Publish ``data`` on ``channel``; returns the message id. Any thread."""
        check_channel(channel)
        event = check_event(event)
        data = check_data(data, self.max_message)
        from .reactor import current_reactor

        reactor = current_reactor()
        with self._lock:
            self._last_id += 1
            message = Message(self._last_id, channel, data, event, time.time())
            history = self._channels.get(channel)
            if history is None:
                history = self._channels[channel] = _History()
            history.messages.append(message)
            self._trim(history, message.time)
            # Inside the lock, so the reactor receives messages in id order.
            if reactor is not None:
                reactor.dispatch(message)
                reactor.stats["published"] += 1
        return message.id

    def _trim(self, history: _History, now: float) -> None:
        messages = history.messages
        oldest = now - self.history_age
        while messages and (len(messages) > self.history_size or messages[0].time < oldest):
            history.evicted = messages.popleft().id

    def last_id(self) -> int:
        return self._last_id

    # One process: every channel is live at once, nothing to subscribe to.
    def subscribe(self, channel: str) -> bool:
        return True

    def unsubscribe(self, channel: str) -> None:
        pass

    def replay(self, channels: Iterable[str], after: int | None,
               upto: int | None = None) -> Replay:
        """Messages on ``channels`` with ``after < id <= upto``, in id order.

        ``after=None`` means "nothing missed": an empty replay at the current id.
        """
        with self._lock:
            last = self._last_id
            upto = last if upto is None else min(upto, last)
            if after is None:
                return Replay([], False, upto)
            now = time.time()
            found: list[Message] = []
            gap = after > last  # an id from the future: from another bus or made up
            for channel in channels:
                history = self._channels.get(channel)
                if history is None:
                    continue
                self._trim(history, now)
                if after < history.evicted:
                    gap = True
                found.extend(m for m in history.messages if after < m.id <= upto)
        found.sort(key=lambda m: m.id)
        return Replay(found, gap, upto)


_bus: Any = None
_bus_pid = 0
_bus_lock = threading.Lock()


def make_bus() -> Any:
    """The bus the configuration asks for: Redis when ``WSGI_HIJACK_REDIS_URL``
    is set, else the in-process bus."""
    url = config.redis_url()
    if url:
        from .redis_bus import RedisBus

        return RedisBus(url)
    return InProcessBus()


def get_bus() -> Any:
    """This process's bus, made on first use (and again after a fork)."""
    global _bus, _bus_pid
    if _bus is None or _bus_pid != os.getpid():
        with _bus_lock:
            if _bus is None or _bus_pid != os.getpid():
                _bus, _bus_pid = make_bus(), os.getpid()
    return _bus


def publish(channel: str, data: str | bytes, event: str | None = None) -> int:
    """Publish on this process's bus; returns the message id. Any greenlet or thread."""
    return get_bus().publish(channel, data, event)
