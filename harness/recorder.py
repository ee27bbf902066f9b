"""Many raw client connections read at once, each byte kept with its time.

For tests that watch streams through an event (a reload, a restart): a
thread reads every socket as bytes arrive and records ``(time, bytes)``
chunks and whether the server closed, so a test can then ask what each
client saw and when: the longest silence, every close, every response head.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time


class Stream:
    """What one client received."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.chunks: list[tuple[float, bytes]] = []
        self.closed_at: float | None = None

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)

    def longest_silence(self, start: float, end: float) -> float:
        """The longest time between ``start``, the chunks, and ``end``."""
        times = [start] + [t for t, _ in self.chunks if start <= t <= end] + [end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    def heads(self) -> int:
        return self.data.count(b"HTTP/1.1 ") + self.data.count(b"HTTP/1.0 ")


class Recorder:
    """Reads every added socket in one thread until :meth:`stop`."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, name: str) -> Stream:
        stream = Stream(sock, name)
        sock.setblocking(False)
        with self._lock:
            self.streams.append(stream)
            self._selector.register(sock, selectors.EVENT_READ, stream)
        return stream

    def _run(self) -> None:
        while self._running:
            with self._lock:
                events = self._selector.select(0.02) if self._selector.get_map() else []
            if not events:
                time.sleep(0.005)
            for key, _ in events:
                stream: Stream = key.data
                try:
                    data = stream.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    stream.chunks.append((time.monotonic(), data))
                else:
                    stream.closed_at = time.monotonic()
                    with self._lock:
                        self._selector.unregister(stream.sock)

    def wait_for(self, stream: Stream, needle: bytes, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in stream.data:
            if time.monotonic() > deadline:
                raise AssertionError(f"{stream.name}: no {needle!r} in {timeout:g} s; got "
                                     f"{stream.data[-500:]!r}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._running = False
        self._thread.join(5)
        for stream in self.streams:
            try:
                stream.sock.close()
            except OSError:
                pass
