"""What a test does as a client of a running server: publish on the channel
endpoints of the demo and the test apps (``POST /publish``, ``GET /events``),
and wait until the server (``/_stats``) or anything else gets where it should.

``server`` is anything with a ``port`` (and, for the waits, ``stats()``):
a :class:`harness.servers.Server`. ``context``, where a helper takes one: the
server speaks TLS (``servers.start(..., tls=...)``), and the request goes
over https, trusting what that ``ssl.SSLContext`` trusts.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import subprocess
import threading
import time

import httpx

from . import wire


def _base(server, context: ssl.SSLContext | None) -> str:
    return f"{'http' if context is None else 'https'}://{wire.HOST}:{server.port}"


def publish(server, channel: str, data: str | bytes, event: str | None = None,
            headers: dict | None = None,
            context: ssl.SSLContext | None = None) -> httpx.Response:
    """``POST /publish?channel=...`` with ``data`` as the body; the response as is."""
    params = {"channel": channel}
    if event is not None:
        params["event"] = event
    return httpx.post(f"{_base(server, context)}/publish", params=params, content=data,
                      headers=headers or {}, timeout=10,
                      verify=True if context is None else context)


def published_id(server, channel: str, data: str, event: str | None = None,
                 context: ssl.SSLContext | None = None) -> int:
    """Publish, insist on ``202 Accepted``, and return the message's id."""
    resp = publish(server, channel, data, event, context=context)
    assert resp.status_code == 202, (resp.status_code, resp.text)
    return resp.json()["id"]


def stats(server, context: ssl.SSLContext | None = None) -> dict:
    """The test app's ``/_stats`` (``server.stats()``), over TLS with ``context``."""
    if context is None:
        return server.stats()
    resp = httpx.get(f"{_base(server, context)}/_stats", verify=context, timeout=10)
    assert resp.status_code == 200, (resp.status_code, resp.text)
    return resp.json()


def open_sse(server, channel: str, count: int, headers: str = "") -> list[socket.socket]:
    """``count`` raw SSE subscribers of ``channel``, each past its ``retry:`` hint
    (so each is held by the time this returns)."""
    socks = [wire.request(server.port, f"/events?channel={channel}", headers)
             for _ in range(count)]
    for s in socks:
        wire.read_until(s, b"retry: 2000\n\n")
    return socks


def wait_held(server, held: int, timeout: float = 10,
              context: ssl.SSLContext | None = None) -> None:
    """Wait until the worker holds exactly ``held`` connections."""
    deadline = time.monotonic() + timeout
    while (now := stats(server, context))["held"] != held:
        assert time.monotonic() < deadline, (held, now["held"], now)
        time.sleep(0.02)


def wait_total_held(server, workers: int, total: int, timeout: float = 10) -> dict:
    """Ask ``/_stats`` until all ``workers`` (told apart by pid: SO_REUSEPORT
    picks one per connection) have answered and hold ``total`` or more in all;
    returns held per worker pid."""
    deadline = time.monotonic() + timeout
    seen: dict[int, int] = {}
    while time.monotonic() < deadline:
        stats = server.stats()
        seen[stats["pid"]] = stats["held"]
        if len(seen) == workers and sum(seen.values()) >= total:
            return seen
    raise AssertionError(f"held {seen}, wanted {total} over {workers} workers")


def wait_for(condition, what: str, timeout: float = 10):
    """Poll ``condition()`` every 50 ms until it is truthy, and return its value;
    an ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_pipe_until(proc: subprocess.Popen, needle: bytes, got: bytes = b"",
                    timeout: float = 10) -> bytes:
    """What ``proc`` (started with ``stdout=PIPE``: curl, ``openssl s_client``)
    has written to its stdout, ``got`` included, read until ``needle`` is in
    it; an ``AssertionError`` after ``timeout`` seconds or if it ends first."""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while needle not in got:
        left = deadline - time.monotonic()
        assert left > 0, f"no {needle!r} from {proc.args[:2]} in {timeout:g} s; got {got[-2000:]!r}"
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 65536)
            assert data, f"{proc.args[:2]} ended before {needle!r}: {got[-2000:]!r}"
            got += data
    return got


class Publisher:
    """``POST /publish`` on each of ``channels`` in turn, 20 times a second
    once started (``"<channel> <n>"`` each), keeping every answer: what was
    accepted and when, what was refused (status, ``Retry-After``), and what
    hung past ``TIMEOUT``."""

    TIMEOUT = 15.0

    def __init__(self, port: int, channels: list[str]) -> None:
        self.port, self.channels = port, channels
        self.accepted: dict[tuple[str, int], str] = {}
        self.answered_at: dict[tuple[str, int], float] = {}
        self.refused: list[tuple[int, str | None]] = []
        self.hung: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def publish(self, channel: str, data: str) -> int | None:
        """One publish; its id if accepted."""
        started = time.monotonic()
        try:
            resp = httpx.post(f"http://{wire.HOST}:{self.port}/publish",
                              params={"channel": channel}, content=data, timeout=self.TIMEOUT)
        except httpx.TimeoutException as exc:
            self.hung.append(f"{data}: {exc!r}")
            return None
        self.slowest = max(self.slowest, time.monotonic() - started)
        if resp.status_code != 202:
            self.refused.append((resp.status_code, resp.headers.get("retry-after")))
            return None
        key = (channel, resp.json()["id"])
        self.accepted[key] = data
        self.answered_at[key] = time.monotonic()
        return key[1]

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            channel = self.channels[n % len(self.channels)]
            n += 1
            self.publish(channel, f"{channel} {n}")
            self._stop.wait(0.05)

    def acknowledged_after(self, when: float) -> list[tuple[str, int]]:
        return [key for key, t in list(self.answered_at.items()) if t > when]

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

