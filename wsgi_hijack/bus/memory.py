"""The in-process bus: one worker, no dependency.

The history of a channel is bounded by count (``WSGI_HIJACK_HISTORY``) and
age (``WSGI_HIJACK_HISTORY_AGE``); both are trimmed as messages arrive and
when a replay reads them.

Ids never go back, even when the bus is lost (a SIGKILL of the worker, a
full stop and start, a reload with the handoff turned off): each id is at
least the wall clock in microseconds, as on Redis (``wsgi_hijack.redis_bus``),
and a new bus starts above the clock of its creation (its *floor*). Every id
an earlier bus handed out was at most that bus's clock, so it is below the
floor: a client coming back with it gets every message of the new bus,
none skipped as "already seen". Why the clock and not an epoch kept on disk:
it needs no file (no path to share, pre-create or lock between deployments),
costs one ``time_ns()`` per publish, and gives the same ids on both buses. It
needs what the Redis bus needs: a clock that does not step back across a
restart (NTP slews), and fewer than a million publishes a second, which
Python's publish cannot reach.

What a lost bus published is gone with it, and a new bus cannot know
whether it published anything after a client's id: a client whose id is
below the floor gets no ``gap`` for that (only for what this bus, or the
predecessor it took the history from, let go).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from .. import config
from .base import (
    BusUnavailable,
    Counters,
    Dispatch,
    Lock,
    Message,
    PublishError,
    Replay,
    check_channel,
    check_data,
    check_event,
)


class _History:
    __slots__ = ("messages", "evicted")

    def __init__(self) -> None:
        self.messages: deque[Message] = deque()
        self.evicted = 0


def clock_us() -> int:
    """The wall clock in microseconds: the floor of every id."""
    return time.time_ns() // 1000


class InProcessBus:
    """The default bus: one worker, no dependency.

    Messages reach the subscribers of this process only. With several
    workers, use a cross-worker bus (the Redis bus), or publishes would reach
    one worker's clients only.
    """

    def __init__(self, history_size: int | None = None, history_age: float | None = None,
                 max_message: int | None = None,
                 clock: Callable[[], int] = clock_us) -> None:
        self.history_size = history_size or config.history_size()
        self.history_age = history_age or config.history_age()
        self.max_message = max_message or config.max_message()
        self._lock = Lock()
        #: Microseconds now (a test gives its own, to get small ids).
        self._clock = clock
        #: The last id this bus (or the predecessor it took over) handed out; 0: none.
        self._last_id = 0
        #: Every id handed out before this bus was made is at most this.
        self._floor = clock()
        self._channels: dict[str, _History] = {}
        self._dispatch: Dispatch | None = None
        self._counters = Counters()
        self._handed_over = False

    def publish(self, channel: str, data: str | bytes, event: str | None = None) -> int:
        """Publish ``data`` on ``channel``; returns the message id. Any thread."""
        check_channel(channel)
        event = check_event(event)
        data = check_data(data, self.max_message)
        with self._lock:
            if self._handed_over:
                raise BusUnavailable("this worker handed its bus to its successor; "
                                     "publish in the new worker")
            self._last_id = max(self._last_id + 1, self._floor + 1, self._clock())
            message = Message(self._last_id, channel, data, event, time.time())
            history = self._channels.get(channel)
            if history is None:
                history = self._channels[channel] = _History()
            history.messages.append(message)
            self._trim(history, message.time)
            # Inside the lock, so the reactor receives messages in id order.
            dispatch = self._dispatch
            if dispatch is not None:
                dispatch(message)
        self._counters.add("published")
        return message.id

    def _trim(self, history: _History, now: float) -> None:
        messages = history.messages
        oldest = now - self.history_age
        while messages and (len(messages) > self.history_size or messages[0].time < oldest):
            history.evicted = messages.popleft().id

    # -- moving to a successor worker (wsgi_hijack.handoff) ---------------------

    def hand_over(self) -> dict:
        """Take no more publishes, and return the id counter and the history as
        JSON-safe data for the successor, so that ids go on increasing there
        and a moved connection replays what it missed. A publish after this
        raises BusUnavailable (nothing is published that nobody would get)."""
        with self._lock:
            self._handed_over = True
            return {"last_id": self._last_id, "channels": {
                name: {"evicted": history.evicted,
                       "messages": [[m.id, m.data, m.event, m.time] for m in history.messages]}
                for name, history in self._channels.items()}}

    def restore(self, state: dict) -> None:
        """Take over a predecessor's :meth:`hand_over`; before the first publish.
        Raises ValueError, saying what, for a state that cannot be trusted."""
        try:
            last_id = state["last_id"]
            channels = {}
            for name, item in state["channels"].items():
                history = channels[check_channel(name)] = _History()
                history.evicted = int(item["evicted"])
                for id_, data, event, when in item["messages"]:
                    if type(id_) is not int or not history.evicted < id_ <= last_id:
                        raise ValueError(f"message id {id_!r} out of order on {name!r}")
                    history.messages.append(Message(id_, channel=name, data=str(data),
                                                    event=check_event(event), time=float(when)))
        except ValueError:
            raise
        except (KeyError, TypeError, AttributeError, PublishError) as exc:
            raise ValueError(f"bus state is malformed: {exc!r}") from None
        if type(last_id) is not int or last_id < 0:
            raise ValueError(f"bus state's last_id must be an int >= 0, not {last_id!r}")
        with self._lock:
            if self._last_id:
                raise ValueError(f"this bus already published (up to id {self._last_id}); "
                                 "its successor's state comes too late")
            self._last_id, self._channels = last_id, channels

    def last_id(self, channel: str | None = None) -> int:
        """The last id handed out; before the first, the floor: every id of
        an earlier bus is at most that, and everything after it is this bus's."""
        return max(self._last_id, self._floor)

    # One process: every channel is live at once, nothing to subscribe to.
    confirms_subscriptions = False
    ids_per_channel = False

    def subscribe(self, channel: str) -> None:
        pass

    def unsubscribe(self, channel: str) -> None:
        pass

    def start(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch

    def close(self) -> None:
        self._dispatch = None

    def counters(self) -> dict[str, int]:
        return self._counters.snapshot()

    def replay(self, channels: Iterable[str], after: int | None,
               upto: int | None = None) -> Replay:
        """Messages on ``channels`` with ``after < id <= upto``, in id order.

        ``after=None`` means "nothing missed": an empty replay at the current id.
        """
        with self._lock:
            last = max(self._last_id, self._floor)
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


