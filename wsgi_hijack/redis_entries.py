"""What the Redis buses read from Redis, checked at the edge.

Anything on the buses' pub/sub channels or in their streams may have been
written by someone else sharing the server: a ``PUBLISH`` of garbage, a
well-formed message with an id no publish handed out, an ``XADD`` with
fields or ids of its own. None of it may stop a listener or a replay, or
move a position. So each message and stream entry goes through the pure
functions here before it is a :class:`~wsgi_hijack.bus.Message`:

- :func:`live_message` parses a pub/sub payload (``id\\nevent\\ntime\\ndata``,
  as the publish script writes it), :func:`stream_message` a stream entry
  (id ``<id>-0``, fields ``d``, ``e``, ``t``); both raise :class:`Rejected`,
  saying why, for anything the script would not have written.
- :class:`LiveIds` checks that a live message's id is one the bus handed
  out. Ids are at least the publishing server's clock in microseconds, and
  the counter is set to each id before it is published, so a real id is at
  most our clock (servers kept in step by NTP) or, when it is not, at most
  the counter, which is then read. An id above both (``9000000000000000000``)
  would make the reactor take every later real message for one it already
  delivered: it is skipped.
- :class:`Skipped` logs what was skipped, at most once per ``interval`` per
  kind of source, with the count of those it did not log.

A replay reads a stream only up to the counter (``XRANGE ... max``), so an
entry with an id above it is never read; one below it that does not parse is
skipped, and the rest of the replay goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from .bus.base import CHANNEL_RE, EVENT_RE, Message

log = logging.getLogger("wsgi_hijack.bus")

#: Ids fit a signed 64-bit integer (Redis's INCR, and the positions clients send).
MAX_ID = (1 << 63) - 1
_MAX_DIGITS = 19
_FIELDS = frozenset((b"d", b"e", b"t"))


class Rejected(ValueError):
    """Not something the publish script wrote; the text says why."""


def parse_id(text: Any) -> int:
    """A message id as the script writes it: 1 to 19 ASCII digits, 1 to MAX_ID."""
    if not isinstance(text, bytes) or not 0 < len(text) <= _MAX_DIGITS or not text.isdigit():
        raise Rejected(f"id {_short(text)} is not 1 to {_MAX_DIGITS} digits")
    value = int(text)
    if not 0 < value <= MAX_ID:
        raise Rejected(f"id {value} is out of range")
    return value


def _event(raw: Any) -> str | None:
    if raw is None or raw == b"":
        return None
    try:
        event = raw.decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        raise Rejected(f"event {_short(raw)} is not UTF-8") from None
    if not EVENT_RE.fullmatch(event):
        raise Rejected(f"event {_short(raw)} is not a valid event name")
    return event


def _stamp(raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise Rejected(f"time {_short(raw)} is not a number") from None
    if not math.isfinite(value):
        raise Rejected(f"time {_short(raw)} is not finite")
    return value


def _data(raw: Any) -> str:
    try:
        return raw.decode("utf-8")
    except (AttributeError, UnicodeDecodeError):
        raise Rejected("data is not UTF-8") from None


def live_message(channel: str, payload: Any) -> Message:
    """A pub/sub payload ``id\\nevent\\ntime\\ndata`` on ``channel``."""
    if not isinstance(payload, bytes):
        raise Rejected(f"payload is {type(payload).__name__}, not bytes")
    parts = payload.split(b"\n", 3)
    if len(parts) != 4:
        raise Rejected(f"payload {_short(payload)} has {len(parts)} of 4 parts")
    id_, event, stamp, data = parts
    return Message(parse_id(id_), channel, _data(data), _event(event), _stamp(stamp))


def stream_message(channel: str, raw_id: Any, fields: Any) -> Message:
    """A stream entry: id ``<id>-0``, fields ``d`` (data), ``t`` (time), ``e`` (event)."""
    if not isinstance(raw_id, bytes):
        raise Rejected(f"entry id {_short(raw_id)} is not bytes")
    ms, dash, seq = raw_id.partition(b"-")
    if not dash or seq != b"0":
        raise Rejected(f"entry id {_short(raw_id)} is not <id>-0")
    if not isinstance(fields, dict) or not fields.keys() <= _FIELDS or \
            b"d" not in fields or b"t" not in fields:
        keys = sorted(map(_short, fields)) if isinstance(fields, dict) else _short(fields)
        raise Rejected(f"entry {_short(raw_id)} has fields {keys}, not d, e, t")
    return Message(parse_id(ms), channel, _data(fields[b"d"]), _event(fields.get(b"e")),
                   _stamp(fields[b"t"]))


def channel_name(raw: Any) -> str:
    """A channel name taken from a pub/sub channel's name."""
    try:
        channel = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise Rejected(f"channel {_short(raw)} is not ASCII") from None
    if not isinstance(channel, str) or not CHANNEL_RE.fullmatch(channel):
        raise Rejected(f"channel {_short(raw)} is not a channel name")
    return channel


def evicted_id(raw: Any) -> int | None:
    """The newest id a stream let go (the ``ev`` marker: ``<id>-0``); None
    when there is none, or what is there is not one (logged by the caller)."""
    if raw is None:
        return None
    return parse_id(raw.split(b"-")[0] if isinstance(raw, bytes) else raw)


def clock_us() -> int:
    return time.time_ns() // 1000


class LiveIds:
    """Whether a live message's id was handed out by the bus; see the module
    docstring. ``key``: the counter it comes from (one for the bus, or the
    channel's on a cluster)."""

    def __init__(self, clock: Callable[[], int] = clock_us) -> None:
        self._clock = clock
        # counter key -> the highest value read from it
        self._top: dict[str, int] = {}

    def handed_out(self, key: str, id_: int, read_counter: Callable[[], Any]) -> bool:
        """True if ``id_`` is at most our clock or the counter. Reads the
        counter (``read_counter()``, its raw value) only for an id above both
        the clock and the last value read; what reading raises goes to the
        caller (a listener that loses Redis reconnects and catches up)."""
        if id_ <= self._top.get(key, 0) or id_ <= self._clock():
            return True
        raw = read_counter()
        try:
            top = parse_id(raw) if raw is not None else 0
        except Rejected:
            top = 0
        self._top[key] = max(self._top.get(key, 0), top)
        return id_ <= top


class Skipped:
    """Logs skipped entries, at most once per ``interval`` seconds for each
    ``where`` (a kind of source), with how many were not logged since."""

    def __init__(self, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        # where -> (when last logged, skipped since without a line)
        self._last: dict[str, tuple[float, int]] = {}
        #: skipped entries in all, logged or not
        self.count = 0

    def skip(self, where: str, reason: object) -> None:
        self.count += 1
        now = self._clock()
        last = self._last.get(where)
        if last is not None and now - last[0] < self.interval:
            self._last[where] = (last[0], last[1] + 1)
            return
        more = last[1] if last is not None else 0
        self._last[where] = (now, 0)
        log.warning("Redis bus: skipped %s: %s%s", where, reason,
                    f" ({more} more skipped since the last such line)" if more else "")


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class CheckedReading:
    """What both Redis buses read, checked: a live message (:meth:`_live`), a
    stream entry (:meth:`_entry`), the evicted marker (:meth:`_evicted`).
    Each returns None for what it skipped, and logs it (rate-limited). The
    bus gives ``_client``, ``_keys(channel)`` (its publish script's keys: the
    id counter first) and, from its ``__init__``, ``_live_ids = LiveIds()``
    and ``_skipped = Skipped()``."""

    _client: Any
    _live_ids: LiveIds
    _skipped: Skipped

    def _keys(self, channel: str) -> tuple[str, ...]:
        raise NotImplementedError

    def _live(self, raw_channel: Any, payload: Any) -> Message | None:
        """A pub/sub message on ``raw_channel`` (the channel's name, without
        the bus's own prefix and suffix). Reading the counter may raise what
        the client raises: the listener then reconnects and catches up."""
        try:
            message = live_message(channel_name(raw_channel), payload)
        except Rejected as exc:
            self._skipped.skip("a pub/sub message", exc)
            return None
        counter = self._keys(message.channel)[0]
        if not self._live_ids.handed_out(counter, message.id,
                                         lambda: self._client.get(counter)):
            self._skipped.skip("a pub/sub message", f"id {message.id} on {message.channel!r} "
                               "was never handed out (above the clock and the counter)")
            return None
        return message

    def _entry(self, channel: str, raw_id: Any, fields: Any) -> Message | None:
        """A stream entry read for a replay."""
        try:
            return stream_message(channel, raw_id, fields)
        except Rejected as exc:
            self._skipped.skip("a stream entry", f"on {channel!r}: {exc}")
            return None

    def _evicted(self, channel: str, raw: Any) -> int | None:
        """The evicted marker of ``channel``; None if it has none or it is not an id."""
        try:
            return evicted_id(raw)
        except Rejected as exc:
            self._skipped.skip("an evicted marker", f"on {channel!r}: {exc}")
            return None
