"""Admission: whether one more connection may be held, decided before the hijack.

A worker that runs out of file descriptors cannot accept anything -- not
even the request that would tell it to shed load -- and gevent's accept loop
backs off on ``EMFILE``. So the reactor keeps a reserve: once held
connections reach ``RLIMIT_NOFILE`` minus ``WSGI_HIJACK_FD_RESERVE`` (default
100, for requests being served, log files, the bus), or
``WSGI_HIJACK_MAX_CONNECTIONS`` if that is lower, new hijacks are refused with
``503`` and ``Retry-After``, and ordinary requests keep working.

``WSGI_HIJACK_MAX_PER_IP`` caps held connections per client address (``429``).
It is off by default: many users share one address behind NAT or a proxy,
and load tests come from a few addresses. Turn it on when clients reach the
server directly and one address holding thousands of streams means abuse.
"""

from __future__ import annotations

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
