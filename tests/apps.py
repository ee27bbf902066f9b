"""WSGI apps the tests run under real servers (gunicorn, gevent.pywsgi, wsgiref).

Each route exercises one part of the hijack API the way an app would use it.
``/_stats`` reports the worker's own view (pid, held connections, greenlets,
fds) so tests can check what the server process holds.
"""

from __future__ import annotations

import gc
import json
import os

import gevent
import greenlet
from gevent import monkey

from wsgi_hijack import HijackMiddleware, PlainStream, full_hijack, get_reactor, partial_hijack
from wsgi_hijack.bus import publish
from wsgi_hijack.demo import demo_app

BEEP = PlainStream(b"BEEP\n")
# 1 MiB per beat: a client that stops reading fills the kernel buffers (4 MiB
# at most here) and its outbuf within a few rounds.
BIG = PlainStream(b"X" * ((1 << 20) - 1) + b"\n")
_start_new_thread = monkey.get_original("_thread", "start_new_thread")


def _json(start_response, data: dict) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def stats(environ, start_response):
    reactor = get_reactor()
    greenlets = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet))
    return _json(start_response, {
        "pid": os.getpid(),
        "held": len(reactor),
        "greenlets": greenlets,
        "fds": len(os.listdir(f"/proc/{os.getpid()}/fd")),
        "hijackable": environ["wsgi_hijack.hijackable"],
        **reactor.stats,
    })


def _echo(sock) -> None:
    with sock:
        while data := sock.recv(4096):
            sock.sendall(data)


def echo_full(environ, start_response):
    """Full hijack: write our own response, then echo what the client sends."""
    sock = full_hijack(environ)

    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Connection: close\r\n\r\n")
    gevent.spawn(_echo, sock)
    return []


def echo_partial(environ, start_response):
    """Partial hijack: the library writes our head, the callback echoes."""
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Connection", "close"), ("X-Partial", "yes")])

    return partial_hijack(environ, lambda sock: gevent.spawn(_echo, sock))


def thread_handover(environ, start_response):
    """Partial hijack whose socket reaches the reactor from a real OS thread."""
    reactor = get_reactor()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])

    def in_thread(sock):
        # A real OS thread, not a greenlet: hold() must wake the hub by itself.
        reactor.hold(sock, BEEP, initial=b"from-thread\n")

    def callback(sock):
        _start_new_thread(in_thread, (sock,))

    return partial_hijack(environ, callback)


def big(environ, start_response):
    reactor = get_reactor()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
    return partial_hijack(environ, lambda sock: reactor.hold(sock, BIG))


class InnerMiddleware:
    """An ordinary middleware that wraps start_response and the body."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        environ["PATH_INFO"] = "/"  # mounted under a prefix, as such middleware often is

        def wrapped_start_response(status, headers, exc_info=None):
            return start_response(status, headers + [("X-Inner", "1")], exc_info)

        body = self.app(environ, wrapped_start_response)

        def wrapped_body():
            try:
                yield from body
            finally:
                close = getattr(body, "close", None)
                if close:
                    close()
        return wrapped_body()


def partial_without_head(environ, start_response):
    """A partial hijack that never calls start_response: an app bug."""
    return partial_hijack(environ, lambda sock: sock.close())


def framework_style(environ, start_response):
    """Register the partial hijack first; start_response comes when the
    'framework' turns the view's return value into a response."""
    reactor = get_reactor()
    partial_hijack(environ, lambda sock: reactor.hold(sock, BEEP))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
    return [b"this body is never sent"]


def publish_burst(environ, start_response):
    """Publish n messages on a channel from a real OS thread, paced by sleep_ms."""
    from urllib.parse import parse_qs

    q = parse_qs(environ["QUERY_STRING"])
    channel, n, pause = q["channel"][0], int(q["n"][0]), float(q.get("sleep_ms", ["1"])[0])

    def run():
        import time

        for i in range(n):
            publish(channel, f"burst {i}")
            time.sleep(pause / 1000)

    _start_new_thread(run, ())
    return _json(start_response, {"started": n})


def publish_batch(environ, start_response):
    """Publish n messages without yielding: the reactor finds them all waiting."""
    from urllib.parse import parse_qs

    q = parse_qs(environ["QUERY_STRING"])
    ids = [publish(q["channel"][0], f"batch {i}") for i in range(int(q["n"][0]))]
    return _json(start_response, {"ids": ids})


def _ws_echo(ws, message):
    """Echo each message back; "boom" raises (contained), "slow" sleeps 2 s first,
    "close" closes with 4000."""
    if message == "boom":
        raise RuntimeError("boom from on_message")
    if message == "slow":
        gevent.sleep(2)
    if message == "close":
        ws.close(4000, "asked to")
        assert not ws.send("after close")  # refused: the connection is closing
        return
    ws.send(message)


def ws_echo(environ, start_response):
    """A WebSocket with subprotocol choice and an echo callback, on ?channel=
    (from ?last_id=, if given)."""
    from urllib.parse import parse_qs

    from wsgi_hijack.websocket import websocket_response

    q = parse_qs(environ.get("QUERY_STRING", ""))
    return websocket_response(environ, start_response, q.get("channel", []),
                              on_message=_ws_echo, subprotocols=["chat.v2", "chat.v1"],
                              allowed_origins=["http://allowed.example"],
                              last_id=q.get("last_id", [None])[0])


WS_PAGE = b"""<!doctype html><meta charset="utf-8"><title>ws chat</title>
<ul id="feed"></ul><p id="state">connecting</p>
<script>
const ws = new WebSocket(`ws://${location.host}/ws?channel=browser`);
ws.onopen = () => { document.getElementById("state").textContent = "open"; };
ws.onclose = (e) => { document.getElementById("state").textContent = "closed " + e.code; };
ws.onmessage = (e) => {
  const li = document.createElement("li"); li.textContent = e.data;
  document.getElementById("feed").appendChild(li);
};
window.say = (text) => ws.send(text);
</script>"""


def html_page(page: bytes):
    """A WSGI app that serves ``page`` as HTML."""
    def serve(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                  ("Content-Length", str(len(page)))])
        return [page]
    return serve


ws_page = html_page(WS_PAGE)


STREAMS_PAGE = b"""<!doctype html><meta charset="utf-8"><title>streams</title>
<p>EventSource: <span id="sse-state">connecting</span>;
WebSocket: <span id="ws-state">connecting</span></p>
<ul id="sse"></ul><ul id="ws"></ul>
<script>
// ?channel=C: an EventSource and a WebSocket on it, over this page's scheme
// (https: wss:). Each list shows "id data" per message.
const channel = new URLSearchParams(location.search).get("channel");
const show = (list, id, data) => {
  const li = document.createElement("li"); li.textContent = id + " " + data;
  document.getElementById(list).appendChild(li);
};
const state = (id, text) => { document.getElementById(id).textContent = text; };
const es = new EventSource(`/events?channel=${channel}`);
es.onopen = () => state("sse-state", "open");
es.onerror = () => state("sse-state", "error");
es.onmessage = (e) => show("sse", e.lastEventId, e.data);
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const ws = new WebSocket(`${scheme}//${location.host}/ws?channel=${channel}`);
ws.onopen = () => state("ws-state", "open");
ws.onclose = (e) => state("ws-state", "closed " + e.code);
ws.onmessage = (e) => { const m = JSON.parse(e.data); show("ws", m.id, m.data); };
window.say = (text) => ws.send(text);
</script>"""

streams_page = html_page(STREAMS_PAGE)


class Buggy(PlainStream):
    """A protocol with a bug: it raises on any input."""

    name = "buggy"

    def receive_data(self, data: bytes) -> bytes | None:
        raise RuntimeError("bug in a protocol")


BUGGY = Buggy(b"beat\n")


def buggy(environ, start_response):
    reactor = get_reactor()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
    return partial_hijack(environ, lambda sock: reactor.hold(sock, BUGGY))


ROUTES = {
    "/_buggy": buggy,
    "/ws-echo": ws_echo,
    "/ws-page": ws_page,
    "/streams-page": streams_page,
    "/_burst": publish_burst,
    "/_batch": publish_batch,
    "/no-head": partial_without_head,
    "/framework": framework_style,
    "/_stats": stats,
    "/echo-full": echo_full,
    "/echo-partial": echo_partial,
    "/thread": thread_handover,
    "/big": big,
    "/wrapped": InnerMiddleware(demo_app),
}


def router(environ, start_response):
    route = ROUTES.get(environ.get("PATH_INFO", "/"))
    if route is not None:
        return route(environ, start_response)
    return demo_app(environ, start_response)


app = HijackMiddleware(router)

