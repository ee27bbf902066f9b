"""The baseline: what people write today, one greenlet per streaming response.

``gunicorn -k gevent --worker-connections 25000 --pythonpath benchmarks greenlet_baseline:app``

Each ``GET /`` returns a generator that sleeps and yields ``BEEP\\n`` every
heartbeat (``WSGI_HIJACK_HEARTBEAT`` seconds); gunicorn's gevent worker keeps
the request's greenlet, its socket object and its libev watcher alive for as
long as the client stays.

The only addition is measurement, so that the benchmark reads this server the
same way as the reactor: every generator sleeps until the same tick (a
multiple of the heartbeat on the monotonic clock), notes when it is resumed
after gunicorn has written its beat, and a ticker greenlet logs, one tick
later, "Number of clients connected: N, time for entire write run: S s" where
S is the time from the tick to the last beat written. That costs two clock
reads and a compare per beat, well under 1 % of what the rest costs.
"""

from __future__ import annotations

import math
import os
import sys
import time

import gevent

HEARTBEAT = float(os.environ.get("WSGI_HIJACK_HEARTBEAT", "10"))
# Each beat's text (a newline is added): BEEP, or what a benchmark sets
# (benchmarks/kernel_memory.py: a 200-byte message, to measure buffers in use).
BEEP = os.environ.get("GREENLET_BASELINE_BEAT", "BEEP").encode() + b"\n"
_monotonic = time.monotonic


class _Rounds:
    active = 0
    worst: dict[float, float] = {}
    ticker = None


def _next_tick() -> float:
    return (math.floor(_monotonic() / HEARTBEAT) + 1) * HEARTBEAT


def _ticker() -> None:
    while True:
        tick = _next_tick()
        gevent.sleep(tick - _monotonic())
        done = _Rounds.worst.pop(tick - HEARTBEAT, None)
        if done is not None:
            print(f"Number of clients connected: {_Rounds.active}, "
                  f"time for entire write run: {done:.6f} s", file=sys.stderr, flush=True)
        for stale in [t for t in _Rounds.worst if t < tick - HEARTBEAT]:
            del _Rounds.worst[stale]


def beats():
    _Rounds.active += 1
    worst = _Rounds.worst
    try:
        yield b""  # gunicorn writes the head with the first chunk; an empty one sends it now
        while True:
            tick = _next_tick()
            gevent.sleep(tick - _monotonic())
            yield BEEP
            # Resumed by gunicorn once it has written the beat.
            took = _monotonic() - tick
            if took > worst.get(tick, -1.0):
                worst[tick] = took
    finally:
        _Rounds.active -= 1


def app(environ, start_response):
    if _Rounds.ticker is None:
        _Rounds.ticker = gevent.spawn(_ticker)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Cache-Control", "no-cache")])
    return beats()
