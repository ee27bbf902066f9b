"""How many connections the reactor holds, counted exactly from any thread.

Thread servers run several hijacks at once, and each asks whether one more
connection may be held before it answers its client. So the connections
admitted and not yet handed over, those handed over and not yet dropped, and
(with a per-address cap) those of each client address are counted under one
real OS lock: two threads can never both take the last place.
"""

from __future__ import annotations

from gevent import monkey

from ..admission import Admission, Refusal

_Lock = monkey.get_original("threading", "Lock")


class Occupancy:
    __slots__ = ("admission", "refused", "_admitting", "_holding", "_per_ip", "_lock")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        #: Hijacks refused by :meth:`admit`.
        self.refused = 0
        self._admitting = 0
        self._holding = 0
        # client address -> held connections, only with a per-address cap
        self._per_ip: dict[str, int] = {}
        self._lock = _Lock()

    @property
    def holding(self) -> int:
        """Connections handed over and not yet dropped (each an fd)."""
        return self._holding

    def admit(self, ip: str | None) -> Refusal | None:
        """May one more be held? None means yes, and :meth:`admitted_done`
        must then follow once the hijack has ended."""
        with self._lock:
            refusal = self.admission.check(self._holding + self._admitting,
                                           self._per_ip.get(ip, 0) if ip else 0)
            if refusal is None:
                self._admitting += 1
            else:
                self.refused += 1
        return refusal

    def admitted_done(self) -> None:
        with self._lock:
            self._admitting = max(0, self._admitting - 1)

    def handed_over(self, ip: str | None) -> str | None:
        """One more held; returns the address to remember for it (None when
        addresses are not counted)."""
        counted = ip if ip and self.admission.max_per_ip else None
        with self._lock:
            self._holding += 1
            if counted:
                self._per_ip[counted] = self._per_ip.get(counted, 0) + 1
        return counted

    def released(self, ip: str | None) -> None:
        """One fewer held (``ip``: what :meth:`handed_over` returned)."""
        with self._lock:
            self._holding -= 1
            if ip is not None:
                left = self._per_ip.get(ip, 1) - 1
                if left > 0:
                    self._per_ip[ip] = left
                else:
                    self._per_ip.pop(ip, None)
