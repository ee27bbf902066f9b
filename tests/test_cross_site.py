"""Another site's page cannot publish or open a WebSocket through a visitor's
browser (issue 22): the demo's publish rule (``wsgi_hijack/demo_publish.py``)
and the WebSocket Origin check, on real gunicorn.

A browser on the same machine as a demo on loopback would carry out what
any page it shows asks: a form or a ``fetch`` to ``http://127.0.0.1:8000``
(its Origin is the page's), or a page whose own name was pointed at
127.0.0.1 after it loaded (DNS rebinding: its Origin and Host then agree).
"""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from harness.servers import assert_clean_log
from harness.wire import read_head

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def post(server, headers: dict, data: bytes = b"hello", channel: str = "xs") -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{server.port}/publish", params={"channel": channel},
                      content=data, headers=headers, timeout=10)


def published(server, channel: str = "xs") -> list[str]:
    """The data of every message in the channel's history."""
    resp = httpx.get(f"http://127.0.0.1:{server.port}/poll",
                     params={"channel": channel, "since": "0"}, timeout=10)
    assert resp.status_code == 200, resp.text
    return [m["data"] for m in resp.json()["messages"]]


def handshake(server, host: str, origin: str | None) -> int:
    """A WebSocket handshake to the demo's chat with this Host and Origin; the status."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        extra = f"Origin: {origin}\r\n" if origin is not None else ""
        s.sendall((f"GET /ws?channel=xs HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
                   f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode())
        head, _ = read_head(s)
        return int(head.split()[1])


def test_publish_refuses_other_sites_pages_and_their_content_types(start_server):
    server = start_server("gunicorn", app="wsgi_hijack:app")
    port = server.port
    own = f"http://127.0.0.1:{port}"
    refused = [
        # A page on another site (its form, its fetch), or with an opaque origin.
        ({"Origin": "http://evil.example", "Content-Type": "application/octet-stream"}, 403),
        ({"Origin": "null"}, 403),
        # DNS rebinding: the page's name now points here; Origin equals Host.
        ({"Origin": f"http://rebind.example:{port}", "Host": f"rebind.example:{port}"}, 403),
        # Another port on loopback is another origin.
        ({"Origin": "http://127.0.0.1:1"}, 403),
        # No Origin, but the browser says where the request comes from.
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        # What a page may send anywhere without asking, even from our own origin.
        ({"Content-Type": "text/plain;charset=UTF-8"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": "Multipart/Form-Data; boundary=x"}, 415),
        ({"Origin": own, "Content-Type": "text/plain"}, 415),
    ]
    for headers, status in refused:
        resp = post(server, headers, data=json.dumps(headers).encode())
        assert resp.status_code == status, (headers, resp.status_code, resp.text)
    assert "WSGI_HIJACK_PUBLISH_TOKEN" in post(server, {"Content-Type": "text/plain"}).text
    taken = [
        {},  # curl --data-binary, httpx, http.client: no type, no Origin
        {"Content-Type": "application/octet-stream"},
        {"Content-Type": "application/json", "Origin": own, "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
        {"Sec-Fetch-Site": "none"},  # typed in the address bar, not a page's doing
    ]
    for i, headers in enumerate(taken):
        resp = post(server, headers, data=f"taken {i}".encode())
        assert resp.status_code == 202, (headers, resp.status_code, resp.text)
    assert published(server) == [f"taken {i}" for i in range(len(taken))]
    assert_clean_log(server)


def test_with_a_token_any_content_type_but_never_another_sites_page(start_server):
    server = start_server("gunicorn", app="wsgi_hijack:app",
                          env={"WSGI_HIJACK_PUBLISH_TOKEN": "s3cret"})
    bearer = {"Authorization": "Bearer s3cret"}
    assert post(server, {"Content-Type": "text/plain"}).status_code == 401
    assert post(server, {**bearer, "Content-Type": "text/plain"}, b"one").status_code == 202
    assert post(server, {**bearer, "Content-Type": "application/x-www-form-urlencoded"},
                b"two").status_code == 202
    assert post(server, {**bearer, "Origin": "http://evil.example"}).status_code == 403
    assert published(server) == ["one", "two"]


def test_websocket_origin_equal_to_host_is_not_enough(start_server):
    server = start_server("gunicorn", app="wsgi_hijack:app")
    port = server.port
    # DNS rebinding: a page at rebind.example whose name now points here.
    assert handshake(server, f"rebind.example:{port}", f"http://rebind.example:{port}") == 403
    assert handshake(server, f"rebind.example:{port}", None) == 101  # not a browser
    for name in ("127.0.0.1", "localhost", "127.0.0.2"):
        assert handshake(server, f"{name}:{port}", f"http://{name}:{port}") == 101, name
    assert handshake(server, f"127.0.0.1:{port}", f"http://localhost:{port}") == 403
    assert "WebSocket refused (403): origin 'http://rebind.example:" in server.log()


def test_allowed_origins_setting_lets_listed_pages_in(start_server):
    listed = "https://chat.example.com, http://rebind.example:8000"
    server = start_server("gunicorn", app="wsgi_hijack:app",
                          env={"WSGI_HIJACK_ALLOWED_ORIGINS": listed})
    port = server.port
    assert handshake(server, "chat.example.com", "https://chat.example.com") == 101
    assert handshake(server, f"127.0.0.1:{port}", "https://Chat.Example.com/") == 101
    assert handshake(server, "rebind.example:8000", "http://rebind.example:8000") == 101
    assert handshake(server, "other.example", "http://other.example") == 403
    assert handshake(server, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == 101
    assert post(server, {"Origin": "https://chat.example.com"}).status_code == 202
    assert post(server, {"Origin": "http://other.example"}).status_code == 403


@pytest.mark.unit
@pytest.mark.parametrize("raw, origins", [
    ("", ()),
    ("https://a.example", ("https://a.example",)),
    ("https://A.example/, http://b.example:81  *", ("https://a.example", "http://b.example:81",
                                                    "*")),
])
def test_allowed_origins_setting(monkeypatch, raw, origins):
    from wsgi_hijack import config

    monkeypatch.setenv("WSGI_HIJACK_ALLOWED_ORIGINS", raw)
    assert config.allowed_origins() == origins


@pytest.mark.unit
@pytest.mark.parametrize("raw", ["a.example", "https://a.example/path", "http:/x"])
def test_allowed_origins_setting_refuses_what_is_no_origin(monkeypatch, raw):
    from wsgi_hijack import config

    monkeypatch.setenv("WSGI_HIJACK_ALLOWED_ORIGINS", raw)
    with pytest.raises(ValueError, match="WSGI_HIJACK_ALLOWED_ORIGINS"):
        config.allowed_origins()


@pytest.mark.unit
@pytest.mark.parametrize("host, origin, allowed", [
    ("127.0.0.1:8000", "http://127.0.0.1:8000", True),
    ("[::1]:8000", "http://[::1]:8000", True),
    ("localhost:8000", "http://LOCALHOST:8000/", True),
    ("app.example:8000", "http://app.example:8000", False),  # DNS rebinding
    ("10.0.0.5:8000", "http://10.0.0.5:8000", False),  # a private address is no loopback
    ("127.0.0.1:8000", "http://127.0.0.1:8001", False),
    ("", "http://127.0.0.1:8000", False),
    ("127.0.0.1:8000", "http://[bad", False),
])
def test_origin_rule(monkeypatch, host, origin, allowed):
    from wsgi_hijack.websocket import origin_allowed

    monkeypatch.delenv("WSGI_HIJACK_ALLOWED_ORIGINS", raising=False)
    assert origin_allowed({"HTTP_HOST": host, "HTTP_ORIGIN": origin}) is allowed
