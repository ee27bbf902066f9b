"""Issue 21: a restart of a gunicorn that holds TLS streams.

Plain streams move to the new worker at a reload (tests/test_handoff.py); a
TLS stream cannot: its TLS state (keys, record sequence numbers) lives in
the old worker's OpenSSL, which gives no way to export it. So each TLS
connection gets its goodbye, encrypted, then the server's close_notify, and
its client reconnects with ``Last-Event-ID`` and replays what it missed.

gunicorn's ``certfile`` applies to every bind of a server (no mixed TLS and
plain listeners), so the server here is TLS only, with the package's
settings (``gunicorn.conf.py``, handoff on): its log shows that the old
worker gave no connection to the park (0 moved) while the clients got their
goodbye.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import time
from pathlib import Path

import httpx

from harness import servers
from harness.clients import publish, wait_for, wait_held
from harness.tls import WireTLSClient, assert_no_plaintext, make_certificate
from harness.wire import HOST, Closed

from .test_handoff import Publisher, sse_events
from .test_tls_session import ALERT, records

HEARTBEAT = 1.0
WAIT = 30.0  # the longest any one awaited thing may take (a restart included)
RETRY = b"retry: 2000\n\n"
GOODBYE = b"retry: 1000\n\n"  # WSGI_HIJACK_SSE_RESTART_RETRY's default
PLAINTEXT = [b"HTTP/1.1", b"retry:", b": ping", b"data:", b"text/event-stream", b"news "]
# The streams' TLS versions: TLS 1.2 shows the close_notify's alert record on the wire.
VERSIONS = [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2]


class Stream:
    """An SSE stream over TLS, keeping all the plain text it received."""

    def __init__(self, port: int, cafile: Path, version: ssl.TLSVersion,
                 last_id: int | None = None) -> None:
        self.client = WireTLSClient(HOST, port, cafile=cafile, maximum_version=version,
                                    timeout=WAIT)
        self.client.handshake()
        since = "" if last_id is None else f"Last-Event-ID: {last_id}\r\n"
        self.client.send(f"GET /events?channel=news HTTP/1.1\r\nHost: localhost\r\n{since}\r\n"
                         .encode())
        self.plain = b""
        self.read_until(lambda: RETRY in self.plain)
        assert self.plain.startswith(b"HTTP/1.1 200 OK\r\n"), self.plain

    def read_until(self, done) -> None:
        deadline = time.monotonic() + WAIT
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; got {self.plain[-500:]!r}"
            data = self.client.recv(left)
            if not data:
                raise Closed(f"closed; got {self.plain[-500:]!r}")
            self.plain += data

    def read_to_close(self) -> None:
        self.plain += self.client.read_to_close()

    def events(self) -> list[tuple[int, str]]:
        return sse_events(self.plain)


class TLSPublishing:
    """What tests/test_handoff.py's ``Publisher`` publishes through, over
    TLS: every attempt is kept; a restart may refuse some (their id: None)."""

    def __init__(self, server: servers.Server, context: ssl.SSLContext) -> None:
        self.server, self.context = server, context
        self.attempted: set[str] = set()

    def publish(self, channel: str, data: str) -> int | None:
        self.attempted.add(data)
        try:
            resp = publish(self.server, channel, data, context=self.context)
        except httpx.HTTPError:  # the restart: reset, or no answer
            return None
        return resp.json()["id"] if resp.status_code == 202 else None


def accepted_after(publisher: Publisher, after: int) -> list[tuple[int, str]]:
    return sorted((i, text) for i, text in list(publisher.accepted.items()) if i > after)


def reconnect(port: int, cafile: Path, version: ssl.TLSVersion, last_id: int) -> Stream:
    """As ``EventSource`` does after the goodbye: again, with ``Last-Event-ID``,
    until the new worker answers."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return Stream(port, cafile, version, last_id)
        except (OSError, ssl.SSLError) as exc:  # Closed is an OSError
            assert time.monotonic() < deadline, f"no new worker answered: {exc!r}"
            time.sleep(0.1)


def test_a_reload_says_goodbye_to_tls_streams_and_they_replay_what_they_missed(tmp_path):
    """``kill -HUP`` to the master with three TLS SSE streams held (two TLS
    1.3, one TLS 1.2) while messages are published over TLS ten times a
    second. Each stream gets the SSE goodbye (``retry: 1000``), then the
    server's close_notify (on TLS 1.2 an alert record is the last on the
    wire), then the TCP close; the old worker logs that it gave 0
    connections to the park. Each client reconnects with ``Last-Event-ID``
    and gets every message accepted after it, once and in order: nothing
    lost. No plaintext on any wire; no traceback in the log."""
    cert, key = make_certificate(tmp_path / "tls")
    context = ssl.create_default_context(cafile=str(cert))
    server = servers.start("gunicorn", tmp_path, app="tests.apps:app", heartbeat=HEARTBEAT,
                           tls=(cert, key))
    publisher = None
    streams: list[Stream] = []
    try:
        old_worker, = server.workers()
        streams = [Stream(server.port, cert, version) for version in VERSIONS]
        wait_held(server, len(streams), WAIT, context)
        publishing = TLSPublishing(server, context)
        publisher = Publisher(publishing)
        for stream in streams:  # each is in the middle of the stream: messages came
            stream.read_until(lambda s=stream: len(s.events()) >= 2)

        os.kill(server.proc.pid, signal.SIGHUP)
        for stream, version in zip(streams, VERSIONS, strict=True):
            stream.read_to_close()
            assert stream.client.closed_cleanly, stream.plain[-200:]
            assert stream.plain.endswith(GOODBYE), stream.plain[-200:]
            if version == ssl.TLSVersion.TLSv1_2:  # the close_notify's record, last
                assert records(bytes(stream.client.wire))[-1][0] == ALERT
            assert_no_plaintext(stream.client.wire_after_handshake, PLAINTEXT)
            stream.client.sock.settimeout(WAIT)
            assert stream.client.sock.recv(1) == b""  # then the TCP close
            stream.client.close()
        wait_for(lambda: f"[{old_worker}] [INFO] Worker exiting" in server.log(),
                 "the old worker's exit", WAIT)
        log = server.log()
        assert re.findall(r"gave (\d+) held connections to the park", log) == ["0"], log

        # Back, each from the last id it got.
        last_ids = [stream.events()[-1][0] for stream in streams]
        again = [reconnect(server.port, cert, version, last_id)
                 for version, last_id in zip(VERSIONS, last_ids, strict=True)]
        streams += again
        new_worker, = wait_for(lambda: [p for p in server.workers() if p != old_worker],
                               "the new worker", WAIT)
        wait_held(server, len(again), WAIT, context)
        # A few more after the reconnects, then stop: the last accepted is the end.
        wait_for(lambda: len(accepted_after(publisher, max(last_ids))) >= 20,
                 "messages published after the reload", WAIT)
        publisher.stop()
        last = max(publisher.accepted)
        for stream, last_id in zip(again, last_ids, strict=True):
            stream.read_until(lambda s=stream: s.events() and s.events()[-1][0] >= last)
            got = stream.events()
            assert [i for i, _ in got] == sorted({i for i, _ in got}), got  # once, in order
            expected = accepted_after(publisher, last_id)
            assert set(expected) <= set(got), sorted(set(expected) - set(got))  # none lost
            # Anything else it got was published (an answer lost in the restart).
            assert {text for _, text in got} <= publishing.attempted, got
            assert_no_plaintext(stream.client.wire_after_handshake, PLAINTEXT)
        assert new_worker != old_worker
        servers.assert_clean_log(server)
    finally:
        if publisher is not None:
            publisher.stop()
        for stream in streams:
            stream.client.close()
        server.stop()

