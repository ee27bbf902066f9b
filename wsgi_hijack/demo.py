"""The demo: the seed, done right. ``gunicorn -k gevent wsgi_hijack:app``.

``GET /`` answers ``200 text/plain`` with ``Connection: close`` (so the
stream is valid HTTP/1.1 and HTTP/1.0: it ends when the connection does),
hands the connection to the reactor and returns at once; the reactor then
writes ``BEEP\\n`` to every held connection each heartbeat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from . import config
from .hijack import HijackMiddleware, partial_hijack
from .protocols.plain import HEAD_HEADERS, PlainStream
from .reactor import get_reactor

BEEP = PlainStream(b"BEEP\n")


def _plain(start_response, status: str, text: str, extra: list | None = None) -> list[bytes]:
    body = text.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"),
               ("Content-Length", str(len(body)))] + (extra or [])
    start_response(status, headers)
    return [body]


def demo_app(environ: dict, start_response) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    method = environ.get("REQUEST_METHOD", "GET")
    if path != "/":
        return _plain(start_response, "404 Not Found", f"no route for {path}\n")
    if method == "HEAD":
        start_response("200 OK", list(HEAD_HEADERS))
        return []
    if method != "GET":
        return _plain(start_response, "405 Method Not Allowed",
                      f"{method} not allowed on /; use GET\n", [("Allow", "GET, HEAD")])
    if not environ.get("wsgi_hijack.hijackable"):
        logging.getLogger("wsgi_hijack").warning(
            "GET / needs a server that can hijack (gunicorn -k gevent, gevent.pywsgi)")
        return _plain(start_response, "501 Not Implemented",
                      "this server cannot hand connections to the reactor; "
                      "run under gunicorn -k gevent or gevent.pywsgi\n")
    reactor = get_reactor()
    start_response("200 OK", list(HEAD_HEADERS))
    return partial_hijack(environ, lambda sock: reactor.hold(sock, BEEP))


app = HijackMiddleware(demo_app)


def _default_logging() -> None:
    # The seed prints every round; so do we, unless the host configured logging.
    logger = logging.getLogger("wsgi_hijack")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] [%(process)d] [%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(config.log_level())


_default_logging()
