"""Prometheus metrics, correct under several gunicorn workers.

The reactor counts in a plain dict on its hot paths (an int increment per
event) and this module turns the counts into prometheus-client metrics once a
second, as deltas: no message or heartbeat calls into prometheus-client.

Several workers: prometheus-client's multiprocess mode. :mod:`wsgi_hijack.gunicorn_conf`
points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers
start (unless it is set already), each worker writes its values there, and
``/metrics`` on any worker sums them (held connections: the live workers'
sum). Without prometheus-client installed (``pip install
'wsgi_hijack[metrics]'``), metrics are off and ``/metrics`` says so.
"""

from __future__ import annotations

import os
from typing import Any


def _client() -> Any:
    """prometheus_client, imported on first use, or None without the extra.

    Not at import: prometheus-client chooses multiprocess mode when it is
    imported, from ``PROMETHEUS_MULTIPROC_DIR``, which
    :mod:`wsgi_hijack.gunicorn_conf` sets after this package is imported.
    """
    try:
        import prometheus_client
    except ImportError:  # pragma: no cover - only without the [metrics] extra
        return None
    return prometheus_client

# stats key -> (counter attribute, label value)
_DROPS = {"dropped_closed": "closed", "dropped_slow": "slow",
          "dropped_protocol": "protocol", "dropped_dead": "dead"}


class _Instruments:
    """The metric objects: one set per process, since a registry takes each
    name once. A reactor started after another closed (get_reactor() again)
    reuses them; counters go on from where they were."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.held = Gauge("wsgi_hijack_held_connections", "Connections held by the reactor",
                          ["protocol"], multiprocess_mode="livesum")
        self.hijacks = Counter("wsgi_hijack_hijacks", "Connections offered to the reactor",
                               ["result"])
        self.dropped = Counter("wsgi_hijack_dropped", "Held connections dropped", ["reason"])
        self.completed = Counter("wsgi_hijack_completed",
                                 "One-shot responses (long-poll) completed")
        self.write_run = Histogram("wsgi_hijack_write_run_seconds",
                                   "Seconds of one heartbeat write run over all connections",
                                   buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25,
                                            .5, 1, 2.5))
        self.published = Counter("wsgi_hijack_messages_published",
                                 "Messages published through this worker")
        self.delivered = Counter("wsgi_hijack_messages_delivered",
                                 "Message frames written to subscribers")
        self.bus_errors = Counter("wsgi_hijack_bus_errors", "Bus operations that failed")
        self.heads = Counter("wsgi_hijack_request_heads",
                             "Accepted connections by how their wait for a request head "
                             "ended (wsgi_hijack.lobby)", ["result"])
        self.waiting_heads = Gauge("wsgi_hijack_waiting_heads",
                                   "Accepted connections waiting for their request head",
                                   multiprocess_mode="livesum")
        #: protocol labels the held gauge has been set for
        self.protocols: set[str] = set()


_instruments: _Instruments | None = None


class ReactorMetrics:
    def __init__(self) -> None:
        global _instruments
        if _instruments is None:
            _instruments = _Instruments()
        m = _instruments
        self.held, self.hijacks, self.dropped = m.held, m.hijacks, m.dropped
        self.completed, self.write_run = m.completed, m.write_run
        self.published, self.delivered, self.bus_errors = m.published, m.delivered, m.bus_errors
        # The held connections of a reactor closed before this one went with it.
        for name in m.protocols:
            self.held.labels(name).set(0)
        self._protocols = m.protocols
        self._last: dict[str, float] = {}

    def _delta(self, stats: dict, key: str) -> float:
        value = stats.get(key, 0)
        delta = value - self._last.get(key, 0)
        self._last[key] = value
        return delta

    def sync(self, stats: dict, held_by_protocol: dict[str, int],
             write_runs: list[float]) -> None:
        for name in self._protocols - set(held_by_protocol):
            self.held.labels(name).set(0)
        for name, count in held_by_protocol.items():
            self.held.labels(name).set(count)
        self._protocols.update(held_by_protocol)
        for key, counter, label in (("adopted", self.hijacks, "accepted"),
                                    ("refused", self.hijacks, "refused")):
            delta = self._delta(stats, key)
            if delta:
                counter.labels(label).inc(delta)
        for key, reason in _DROPS.items():
            delta = self._delta(stats, key)
            if delta:
                self.dropped.labels(reason).inc(delta)
        for key, counter in (("completed", self.completed), ("published", self.published),
                             ("deliveries", self.delivered), ("bus_errors", self.bus_errors)):
            delta = self._delta(stats, key)
            if delta:
                counter.inc(delta)
        for seconds in write_runs:
            self.write_run.observe(seconds)


class LobbyMetrics:
    """The lobby's counts, turned into metrics as deltas (like the reactor's)."""

    RESULTS = ("handed_over", "timed_out", "too_large", "half_closed", "gone", "not_tls")

    def __init__(self) -> None:
        global _instruments
        if _instruments is None:
            _instruments = _Instruments()
        self.heads, self.waiting = _instruments.heads, _instruments.waiting_heads
        self._last: dict[str, int] = {}

    def sync(self, stats: dict, waiting: int) -> None:
        self.waiting.set(waiting)
        for result in self.RESULTS:
            value = stats.get(result, 0)
            delta = value - self._last.get(result, 0)
            if delta:
                self.heads.labels(result).inc(delta)
            self._last[result] = value


def create_lobby() -> LobbyMetrics | None:
    return LobbyMetrics() if _client() is not None else None


def create() -> ReactorMetrics | None:
    return ReactorMetrics() if _client() is not None else None


def exposition() -> tuple[bytes, str] | None:
    """The text to answer a scrape with, and its content type; None when off."""
    prometheus_client = _client()
    if prometheus_client is None:
        return None
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry: Any = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST
