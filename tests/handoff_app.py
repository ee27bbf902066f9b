"""The app the handoff tests reload: the demo's routes, plus routes whose
bytes show which version of the code framed them.

The tests copy this file and change ``VERSION`` between the old worker and
the new one (a deploy), then check that what follows a reload is framed by
the new code.

- ``/tagged?channel=C``: a plain stream whose messages are ``VERSION id data``
  lines (the app's own protocol, a ``PlainStream`` subclass);
- ``/echo``: a WebSocket that answers each message with ``VERSION: message``;
- ``/fixed``: a stream with an own protocol that is not movable: it says
  goodbye when the worker leaves;
- ``/_stats``: this worker's pid and the reactor's counts;
- everything else: the demo app (``/events``, ``/stream``, ``/poll``, ``/ws``,
  ``/publish``).

With ``HANDOFF_TICKS`` set to a directory, the first request starts an OS
thread that publishes ``tick N`` on channel ``tick`` ten times a second and
appends each id it got, and the data, to ``<dir>/ticks-<pid>``; a publish refused (the
worker handed its bus over) is not written.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs

from gevent import monkey

from wsgi_hijack import HijackMiddleware, PlainStream, get_reactor, partial_hijack
from wsgi_hijack.bus import BusUnavailable, publish
from wsgi_hijack.demo import demo_app
from wsgi_hijack.protocols.base import Protocol
from wsgi_hijack.websocket import websocket_response

VERSION = "v1"
_start_new_thread = monkey.get_original("_thread", "start_new_thread")
_sleep = monkey.get_original("time", "sleep")
_ticking = False


class Tagged(PlainStream):
    """Each message as one line that names the code that framed it."""

    def frame(self, message) -> bytes:
        return f"{VERSION} {message.id} {message.data}\n".encode()


class Fixed(Protocol):
    """An own protocol that keeps state of its own and does not say how to move it."""

    name = "fixed"
    heartbeat = b"tick\n"
    goodbye = b"bye\n"


TAGGED = Tagged(b"BEAT\n")
FIXED = Fixed()


def _ticks(directory: str) -> None:
    path = os.path.join(directory, f"ticks-{os.getpid()}")
    n = 0
    while True:
        n += 1
        try:
            message_id = publish("tick", f"tick {n}")
        except BusUnavailable:
            return  # handed over: the successor's thread goes on
        with open(path, "a") as out:
            out.write(f"{message_id} tick {n}\n")
        _sleep(0.1)


def _start_ticks() -> None:
    global _ticking
    directory = os.environ.get("HANDOFF_TICKS")
    if directory and not _ticking:
        _ticking = True
        _start_new_thread(_ticks, (directory,))


def _echo(ws, message) -> None:
    ws.send(f"{VERSION}: {message}")


def router(environ, start_response):
    _start_ticks()
    path = environ.get("PATH_INFO")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/tagged":
        reactor = get_reactor()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
        return partial_hijack(environ, lambda sock: reactor.hold(
            sock, TAGGED, channels=query.get("channel", ["news"]),
            last_id=int(query.get("since", ["0"])[0])))
    if path == "/echo":
        return websocket_response(environ, start_response, query.get("channel", []),
                                  on_message=_echo, subprotocols=["v"])
    if path == "/fixed":
        reactor = get_reactor()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close")])
        return partial_hijack(environ, lambda sock: reactor.hold(sock, FIXED))
    if path == "/_stats":
        body = json.dumps({"pid": os.getpid(), "version": VERSION, "held": len(get_reactor()),
                           "fds": len(os.listdir("/proc/self/fd")), "time": time.time(),
                           **get_reactor().stats}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return demo_app(environ, start_response)


app = HijackMiddleware(router)
