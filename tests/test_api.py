"""The hijack API's contract and errors, and the capability flag where hijack is impossible."""

from __future__ import annotations

import json
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

from wsgi_hijack import HijackedSocket, HijackError, HijackMiddleware, full_hijack, partial_hijack
from wsgi_hijack.config import heartbeat_interval, max_buffer
from wsgi_hijack.hijack import encode_head

# Start no subprocess, need no redis, chromium or uWSGI: `pytest -m unit`.
pytestmark = pytest.mark.unit


def test_encode_head_is_exact():
    assert encode_head("200 OK", [("Content-Type", "text/plain"), ("X-A", "b")]) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-A: b\r\n\r\n")


@pytest.mark.parametrize("status, headers", [
    ("200 OK", [("X-A", "b\r\nSet-Cookie: evil=1")]),  # header injection
    ("200 OK", [("X-A\n", "b")]),
    ("200 OK", [("X:A", "b")]),
    ("200 OK", [("", "b")]),
    ("200 OK", [("X-A", 1)]),
    ("OK", []),
    (200, []),
])
def test_encode_head_refuses_what_would_break_http(status, headers):
    with pytest.raises(HijackError):
        encode_head(status, headers)


def test_hijacked_socket_returns_pending_bytes_first():
    a, b = socket.socketpair()
    with a, b:
        hs = HijackedSocket(a, b"abcdef")
        assert hs.recv(2) == b"ab"
        buf = bytearray(3)
        assert hs.recv_into(buf) == 3 and bytes(buf) == b"cde"
        assert hs.pending == b"f"
        assert hs.take_pending() == b"f"
        b.sendall(b"live")
        assert hs.recv(10) == b"live"
        hs.sendall(b"out")  # everything else is the socket's own
        assert b.recv(10) == b"out"
        assert hs.fileno() == a.fileno()


@pytest.mark.parametrize("name, value", [
    ("WSGI_HIJACK_HEARTBEAT", "abc"), ("WSGI_HIJACK_HEARTBEAT", "0"),
    ("WSGI_HIJACK_HEARTBEAT", "-1"), ("WSGI_HIJACK_MAX_BUFFER", "1.5"),
    ("WSGI_HIJACK_SEND_THREADS", "two"), ("WSGI_HIJACK_SEND_THREADS", "0"),
])
def test_bad_settings_say_what_to_fix(monkeypatch, name, value):
    from wsgi_hijack import config

    monkeypatch.setenv(name, value)
    read = {"WSGI_HIJACK_HEARTBEAT": heartbeat_interval, "WSGI_HIJACK_MAX_BUFFER": max_buffer,
            "WSGI_HIJACK_SEND_THREADS": config.send_threads}[name]
    with pytest.raises(ValueError, match=name):
        read()


def test_settings_defaults_and_values(monkeypatch):
    monkeypatch.delenv("WSGI_HIJACK_HEARTBEAT", raising=False)
    assert heartbeat_interval() == 10.0
    monkeypatch.setenv("WSGI_HIJACK_HEARTBEAT", "0.25")
    assert heartbeat_interval() == 0.25


def test_helpers_without_the_middleware_explain_themselves():
    with pytest.raises(HijackError, match="HijackMiddleware"):
        full_hijack({})
    with pytest.raises(HijackError, match="HijackMiddleware"):
        partial_hijack({}, print)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


def test_wsgiref_is_not_hijackable_and_nothing_breaks():
    """On a server with no adapter, the flag is False, the demo answers 501,
    and a hijack attempt raises a HijackError the app can catch."""
    from wsgi_hijack.demo import demo_app

    seen = {}

    def app(environ, start_response):
        seen["flag"] = environ["wsgi_hijack.hijackable"]
        if environ["PATH_INFO"] == "/try":
            try:
                full_hijack(environ)
            except HijackError as exc:
                body = json.dumps({"error": str(exc)}).encode()
                start_response("200 OK", [("Content-Type", "application/json")])
                return [body]
        return demo_app(environ, start_response)

    server = make_server("127.0.0.1", 0, HijackMiddleware(app), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for path, expect in (("/", b"501"), ("/try", b"200")):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            assert data.split(b" ", 2)[1] == expect, data
            assert seen["flag"] is False
        assert b"cannot hijack" in data
    finally:
        server.shutdown()
        server.server_close()


def test_partial_hijack_rejects_a_non_callable():
    from wsgi_hijack.hijack import _Request

    class PresentServer:  # only whether a server adapter exists matters here
        def take(self):
            raise AssertionError("must not be taken")

    req = _Request({}, lambda *a: None, PresentServer())
    with pytest.raises(HijackError, match="callable"):
        req.partial_hijack("not callable")
