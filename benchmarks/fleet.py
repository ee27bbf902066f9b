"""Client processes of the load client, read as they report.

What the benchmarks that drive their own clients (``handoff.py``,
``kernel_memory.py``) share: each process is a ``_WorkerProc`` of
:mod:`wsgi_hijack.loadclient` (or a subclass running another worker), and
reports JSON lines; this keeps the last of each kind per process.
"""

from __future__ import annotations

import selectors
import time
from collections.abc import Callable
from typing import Any


class Fleet:
    #: Seconds each pump waits for reports.
    poll = 0.05

    def __init__(self, procs: list[Any]) -> None:
        self.procs = procs
        self.sel = selectors.DefaultSelector()
        for p in self.procs:
            self.sel.register(p.proc.stdout, selectors.EVENT_READ, p)
        self.live = set(self.procs)

    def total(self, key: str) -> int:
        return sum(p.last.get(key, 0) for p in self.procs)

    def latest(self, key: str) -> float:
        return max((p.last.get(key, 0) for p in self.procs), default=0)

    def pump(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            p = key.data
            for msg in p.feed():
                kind = msg["type"]
                if kind == "eof":
                    self.sel.unregister(p.proc.stdout)
                    self.live.discard(p)
                    continue
                if kind in ("progress", "ready", "final", "mode"):
                    p.last = msg
                if kind == "ready":
                    p.ready = msg
                elif kind == "final":
                    p.final = msg
                elif kind == "marked":
                    p.marked = msg["t"]
        self.pumped()

    def pumped(self) -> None:
        """After each pump (progress lines)."""

    def until(self, done: Callable[[], bool], timeout: float,
              tick: Callable[[], None] | None = None) -> bool:
        """Pump until ``done()``, the timeout, or every process gone; ``tick()``
        every pump."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or not self.live:
                return False
            self.pump(self.poll)
            if tick:
                tick()
        return True

    def send(self, cmd: str) -> None:
        for p in self.procs:
            p.send(cmd)

    def stop(self) -> list[dict]:
        """Each process's final report (or its last), once all have stopped."""
        self.send("stop")
        self.until(lambda: all(p.final for p in self.procs), 120)
        for p in self.procs:
            try:
                p.proc.stdin.close()
                p.proc.wait(timeout=30)
            except (OSError, ValueError):
                pass
            except Exception:
                p.proc.kill()
                p.proc.wait()
        self.sel.close()
        return [p.final or p.last for p in self.procs]
