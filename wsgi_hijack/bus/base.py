"""What every bus is: the :class:`Bus` interface, messages, replays and events.

A bus gives each published message an id, keeps a bounded history of each
channel for replay, and hands messages to the reactor through the
``dispatch`` callable it is given at :meth:`Bus.start`. It knows nothing of
the reactor beyond that callable.

Ids are one counter for the whole bus, not one per channel. SSE carries a
single ``Last-Event-ID`` per connection, and a connection may listen to
several channels: with one counter, "everything after id N" means the same
thing on every channel, and replay over several channels is one merge in id
order. Ids are positive integers, increasing in publish order.

When messages leave a channel's history, the bus remembers the highest id it
let go: a client asking for messages after an id lower than that has missed
some, and is told so (:attr:`Replay.gap`) instead of being silently skipped
ahead.

Besides messages, a bus whose subscriptions are confirmed later (a bus
across processes) dispatches two events, in order with its messages:
:class:`Live` when a channel's subscription is confirmed, and
:class:`Resync` after it reconnected and may have missed messages.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gevent import monkey

# A real OS lock even under monkeypatching: publish() may run in OS threads,
# and a gevent lock is not safe across threads. It is held for microseconds.
Lock = monkey.get_original("threading", "Lock")

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
    #: True when the history could not be read at all (the bus went away
    #: mid-read): nothing is known, so the reader sends the client back to
    #: reconnect from its own position rather than skip ahead.
    failed: bool = False


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


@dataclass(frozen=True, slots=True)
class Live:
    """The bus confirmed its subscription to ``channel``: from here on, every
    message published on it arrives through dispatch."""

    channel: str


@dataclass(frozen=True, slots=True)
class Resync:
    """The bus reconnected: it subscribes every channel again (a :class:`Live`
    each follows), and messages published meanwhile are only in the history.
    ``channels``: only these lost their subscription (one shard of a
    cluster); None: all of them."""

    channels: tuple[str, ...] | None = None


Event = Live | Resync
#: What a bus calls, from any thread, with each message and event, in id order.
Dispatch = Callable[["Message | Event"], None]


class Counters:
    """A bus's own counts (published, bus_errors), safe from any thread."""

    NAMES = ("published", "bus_errors")

    def __init__(self) -> None:
        self._lock = Lock()
        self._counts = dict.fromkeys(self.NAMES, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


@runtime_checkable
class Bus(Protocol):
    """The interface the reactor and the app use; see the module docstring."""

    #: True when a subscription is live only once a :class:`Live` event
    #: confirms it; False when subscribing is immediate (one process).
    confirms_subscriptions: bool
    #: True when each channel counts its own ids (Redis Cluster): positions
    #: are then per channel (:mod:`.positions`); False: one counter for all.
    ids_per_channel: bool

    def publish(self, channel: str, data: str | bytes, event: str | None = None) -> int:
        """Publish; returns the id. Any thread. Raises PublishError, BusUnavailable."""
        ...

    def last_id(self, channel: str | None = None) -> int:
        """The id of the last message published, on any channel (on
        ``channel``, for a bus whose channels count their own ids)."""
        ...

    def replay(self, channels: Iterable[str], after: int | None,
               upto: int | None = None) -> Replay:
        """Messages on ``channels`` with ``after < id <= upto``, in id order;
        ``after=None``: nothing missed, an empty replay at the current id."""
        ...

    def subscribe(self, channel: str) -> None:
        """This process wants ``channel``'s messages dispatched."""
        ...

    def unsubscribe(self, channel: str) -> None:
        """This process no longer needs ``channel``."""
        ...

    def start(self, dispatch: Dispatch) -> None:
        """Dispatch messages and events to ``dispatch`` from now on."""
        ...

    def close(self) -> None:
        """Stop dispatching (the reactor is closing)."""
        ...

    def counters(self) -> dict[str, int]:
        """A snapshot of this bus's :class:`Counters`."""
        ...
