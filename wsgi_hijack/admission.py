"""Admission: whether one more connection may be held, and whether one more
may be accepted.

A worker that runs out of file descriptors cannot accept anything -- not
even the request that would tell it to shed load. So the fds are split in
two. Held connections may take ``RLIMIT_NOFILE`` minus
``WSGI_HIJACK_FD_RESERVE`` (default 100), or ``WSGI_HIJACK_MAX_CONNECTIONS``
if that is lower; past that, new hijacks are refused with ``503`` and
``Retry-After`` (:class:`Admission`), and ordinary requests keep working.
The reserve is for everything else: the worker's own files (log, listeners,
the bus) and the connections on their way in (accepted and waiting for
their head, or being answered). :class:`FdBudget` is what the worker's
accept loop asks before it accepts: it accepts only while one more fd fits,
so a storm at the fd limit is answered (``503`` from the app once full), not
met with ``EMFILE`` (benchmarks/results/arrival.md).

``WSGI_HIJACK_MAX_PER_IP`` caps held connections per client address (``429``).
It is off by default: many users share one address behind NAT or a proxy,
and load tests come from a few addresses. Turn it on when clients reach the
server directly and one address holding thousands of streams means abuse.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

from . import config


@dataclass(frozen=True)
class Refusal:
    status: str
    reason: str
    retry_after: int

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after))]


class Admission:
    def __init__(self, reserve: int | None = None, max_connections: int | None = None,
                 max_per_ip: int | None = None) -> None:
        self.reserve = reserve if reserve is not None else config.fd_reserve()
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = soft - self.reserve if soft != resource.RLIM_INFINITY else 1 << 30
        if max_connections is None:
            max_connections = config.max_connections()
        #: The most connections this process holds at once.
        self.max_held = max(0, min(limit, max_connections) if max_connections else limit)
        self.max_per_ip = max_per_ip if max_per_ip is not None else config.max_per_ip()

    def check(self, held: int, ip_count: int) -> Refusal | None:
        """``held``: connections held or on their way; ``ip_count``: those of this client."""
        if held >= self.max_held:
            return Refusal("503 Service Unavailable",
                           f"this worker holds its maximum of {self.max_held} connections; "
                           "retry shortly (another worker or host may have room)", 2)
        if self.max_per_ip and ip_count >= self.max_per_ip:
            return Refusal("429 Too Many Requests",
                           f"at most {self.max_per_ip} held connections per client address",
                           10)
        return None


def soft_fd_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 30


def open_fds() -> int:
    """This process's open fds, counted in /proc: a listing of every fd, so
    once when a worker starts (:class:`FdBudget`), never per accept."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError:
        return 64  # no /proc: a guess of what a worker opens for itself


class FdBudget:
    """How many more connections a worker may accept now without ``EMFILE``.

    The worker's own fds are counted once, when it starts serving
    (``base``); after that the budget follows the connections themselves
    (held, and on their way in), which the worker counts for free. ``margin``
    covers files opened later (a log reopened, a bus reconnecting, metrics
    files).
    """

    MARGIN = 16

    def __init__(self, base: int | None = None, limit: int | None = None,
                 margin: int = MARGIN) -> None:
        self.limit = limit if limit is not None else soft_fd_limit()
        self.base = base if base is not None else open_fds()
        self.margin = margin

    def room(self, held: int, arriving: int) -> int:
        """Connections that may still be accepted, with ``held`` held and
        ``arriving`` accepted but not yet held or closed."""
        return self.limit - self.margin - self.base - held - arriving

    def arrival_room(self, admission: Admission) -> int:
        """fds left for arriving connections once ``admission`` holds its maximum:
        what a storm at the limit is answered through."""
        return self.room(admission.max_held, 0)
