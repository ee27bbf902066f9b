"""Issue 21, item 1: no server kind but our gevent worker can hand a TLS
connection to the reactor, and none of them may put plaintext on it.

Each test starts one real server kind on loopback with TLS on, asks for the
demo's BEEP stream (``GET /``) and its SSE, chunked, long-poll and WebSocket
streams over :class:`harness.tls.WireTLSClient`, and checks both ways a
refusal can go wrong: the decrypted answer must be the ``501`` that says why and what to
do, and the raw bytes received after the handshake must hold none of the
response's plaintext (what the reactor would have written on the bare fd).
"""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import pytest

from harness import servers
from harness.tls import WireTLSClient, assert_no_plaintext, make_certificate
from harness.wire import HOST

# What a response to these requests carries in clear, head or stream. Not the
# bare b"501" of a status code: three bytes turn up in random ciphertext about
# once in 16 million positions, enough for a rare false failure over a run.
PLAINTEXT = [b"HTTP/1.1", b"501 Not Implemented", b"BEEP", b"retry:", b": ping",
             b"text/event-stream", b"Sec-WebSocket-Accept"]
_WS = ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")
# The demo's BEEP stream, then SSE, chunked, long-poll and WebSocket: (target, headers).
REQUESTS = [("/", ""), ("/events?channel=x", ""), ("/stream?channel=x", ""),
            ("/poll?channel=x", ""), ("/ws?channel=x", _WS)]
# What every refusal's reason says, whichever server: the two ways to TLS streams.
ADVICE = ["this is a TLS connection on", "wsgi_hijack.workers.ggevent.GeventWorker",
          "terminate TLS at a proxy"]

# id -> (kind for harness.servers.start, its arguments, the server the reason names)
SERVERS = {
    # gunicorn.conf.py maps -k gthread to wsgi_hijack.workers.gthread.ThreadWorker.
    "gunicorn-gthread-ours": ("gunicorn", ("-w", "1", "-k", "gthread", "--threads", "4"),
                              "gunicorn's gthread worker"),
    "gunicorn-gthread": ("gunicorn-plain", ("-k", "gthread", "--threads", "4"),
                         "gunicorn's gthread worker"),
    "gunicorn-sync": ("gunicorn-plain", ("-k", "sync"), "gunicorn's sync worker"),
    "gunicorn-gevent-pywsgi": ("gunicorn-plain", ("-k", "gevent_pywsgi"), "gevent.pywsgi"),
    "pywsgi": ("pywsgi", (), "gevent.pywsgi"),
    "werkzeug": ("werkzeug", (), "Werkzeug's development server"),
    "uwsgi": ("uwsgi", (), "uWSGI's --https-socket"),
    # gunicorn's own gevent worker, without the package's settings.
    "gunicorn-gevent-stock": ("gunicorn-plain", (), "gunicorn's own gevent worker"),
}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


def ask(port: int, cafile: Path, target: str, headers: str) -> tuple[bytes, bytes, WireTLSClient]:
    """``GET target`` over TLS; the decrypted head and body of the answer
    (its ``Content-Length``), and the client with the raw wire. If the
    server breaks TLS (plaintext where a record should be), the failure
    shows the plaintext."""
    client = WireTLSClient(HOST, port, cafile=cafile)
    try:
        client.handshake()
        client.send(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
        try:
            head = client.read_until(b"\r\n\r\n", timeout=10)
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            body = client.read_exactly(int(length.group(1)), timeout=10) if length else b""
        except ssl.SSLError:
            assert_no_plaintext(client.wire_after_handshake, PLAINTEXT)
            raise
        return head, body, client
    finally:
        client.close()


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.uwsgi) if name == "uwsgi" else name
    for name in SERVERS])
def test_a_stream_on_a_tls_connection_is_refused_encrypted(tmp_path, certificate, name):
    kind, args, server_name = SERVERS[name]
    cert, _key = certificate
    # uWSGI looks the callable up in the module's dict, where the package's
    # lazy ``app`` is not: it gets the demo from its own module.
    app = "wsgi_hijack.demo:app" if kind == "uwsgi" else "wsgi_hijack:app"
    srv = servers.start(kind, tmp_path, app=app, args=args, heartbeat=0.3, tls=certificate)
    try:
        if name == "gunicorn-gthread-ours":
            assert "worker class wsgi_hijack.workers.gthread.ThreadWorker" in srv.log()
        for target, headers in REQUESTS:
            head, body, client = ask(srv.port, cert, target, headers)
            assert_no_plaintext(client.wire_after_handshake, PLAINTEXT)
            assert head.startswith(b"HTTP/1.1 501 "), (target, head, body)
            text = body.decode()
            assert "is not available on this server: " in text, (target, text)
            for part in [server_name, *ADVICE]:
                assert part in text, (part, text)
        # The operator's log says it too, once per reason.
        deadline = time.monotonic() + 5
        while (found := srv.log().count(f"cannot be hijacked here: this is a TLS connection "
                                        f"on {server_name}")) == 0:
            assert time.monotonic() < deadline, srv.log()
            time.sleep(0.05)
        assert found == 1, srv.log()
        assert "Traceback" not in srv.log(), srv.log()
    finally:
        srv.stop()
