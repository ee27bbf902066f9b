"""The demo app: ``gunicorn -k gevent wsgi_hijack:app``.

Routes:

- ``GET /``: ``200 text/plain`` with ``Connection: close`` (valid HTTP/1.1
  and 1.0; the stream ends when the connection does), then ``BEEP\\n`` each
  heartbeat.
- ``GET /events?channel=C``: Server-Sent Events (``Last-Event-ID`` replays).
- ``GET /poll?channel=C&since=ID``: long-poll, answered with JSON.
- ``GET /stream?channel=C``: an HTTP/1.1 chunked stream.
- ``GET /ws?channel=C``: a WebSocket chat (:mod:`wsgi_hijack.demo_ws`).
- ``GET /metrics``: Prometheus metrics, summed over the workers.
- ``POST /publish?channel=C[&event=E]``: the body is the message; ``202``
  and ``{"id": N}``. Never from another site's page (``Origin``,
  ``Sec-Fetch-Site``). With ``WSGI_HIJACK_PUBLISH_TOKEN`` set, it needs
  ``Authorization: Bearer <token>``; without it, only loopback clients may
  publish, and not in a form or text content type
  (:mod:`wsgi_hijack.demo_publish`, whose rule the WebSocket chat applies too).

``channel`` may be repeated on the subscribing routes to listen to several.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import parse_qs

from . import config
from .bus import BusUnavailable, PublishError, publish
from .demo_publish import may_post_message
from .demo_publish import may_publish as may_publish  # the examples' views import it from here
from .demo_ws import ws_route
from .hijack import HijackMiddleware, is_hijackable, partial_hijack
from .protocols.plain import HEAD_HEADERS, PlainStream
from .reactor import get_reactor
from .streams import (
    _unhijackable,
    chunked_response,
    json_response,
    long_poll_response,
    plain_response,
    sse_response,
)

BEEP = PlainStream(b"BEEP\n")


def _publish(environ: dict, start_response, query: dict) -> Iterable[bytes]:
    allowed, status, reason = may_post_message(environ)
    if not allowed:
        extra = [("WWW-Authenticate", "Bearer")] if status.startswith("401") else []
        return plain_response(start_response, status, reason + "\n", extra)
    channels = query.get("channel", [])
    if len(channels) != 1:
        return plain_response(start_response, "400 Bad Request",
                              "give exactly one ?channel=NAME to publish to\n")
    limit = config.max_message()
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return plain_response(start_response, "400 Bad Request", "bad Content-Length\n")
    if length > limit:
        return plain_response(start_response, "413 Content Too Large",
                              f"message is {length} bytes, over the limit of {limit}\n")
    body = environ["wsgi.input"].read(limit + 1) if length or _chunked(environ) else b""
    if len(body) > limit:
        return plain_response(start_response, "413 Content Too Large",
                              f"message is over the limit of {limit} bytes\n")
    event = query.get("event", [None])[0]
    try:
        message_id = publish(channels[0], body, event)
    except PublishError as exc:
        return plain_response(start_response, "400 Bad Request", f"{exc}\n")
    except BusUnavailable as exc:
        logging.getLogger("wsgi_hijack").error("publish failed: %s", exc)
        return plain_response(start_response, "503 Service Unavailable",
                              f"{exc}\nNot acknowledged; retry later.\n",
                              [("Retry-After", "1")])
    return json_response(start_response, "202 Accepted", {"id": message_id})


def _chunked(environ: dict) -> bool:
    return environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"


def _beep(environ: dict, start_response) -> Iterable[bytes]:
    if not is_hijackable(environ):  # the 501 of every stream, with the server's reason
        return _unhijackable(environ, start_response, "GET / (the BEEP stream)")
    reactor = get_reactor()
    start_response("200 OK", list(HEAD_HEADERS))
    return partial_hijack(environ, lambda sock: reactor.hold(sock, BEEP))


def _metrics(environ: dict, start_response) -> Iterable[bytes]:
    from .metrics import exposition

    get_reactor()  # so that this worker's values exist
    found = exposition()
    if found is None:
        return plain_response(start_response, "501 Not Implemented",
                              "metrics need prometheus-client: "
                              "pip install 'wsgi_hijack[metrics]'\n")
    body, content_type = found
    start_response("200 OK", [("Content-Type", content_type),
                              ("Content-Length", str(len(body)))])
    return [body]


# path -> (allowed methods, handler(environ, start_response, query))
ROUTES = {
    "/": ("GET", lambda e, s, q: _beep(e, s)),
    "/events": ("GET", lambda e, s, q: sse_response(e, s, q.get("channel", []))),
    "/stream": ("GET", lambda e, s, q: chunked_response(e, s, q.get("channel", []))),
    "/poll": ("GET", lambda e, s, q: long_poll_response(
        e, s, q.get("channel", []), q.get("since", [""])[0])),
    "/publish": ("POST", _publish),
    "/ws": ("GET", ws_route),
    "/metrics": ("GET", lambda e, s, q: _metrics(e, s)),
}


def demo_app(environ: dict, start_response) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    method = environ.get("REQUEST_METHOD", "GET")
    route = ROUTES.get(path)
    if route is None:
        return plain_response(start_response, "404 Not Found", f"no route for {path}\n")
    allowed, handler = route
    if method == "HEAD" and allowed == "GET" and path == "/":
        start_response("200 OK", list(HEAD_HEADERS))
        return []
    if method != allowed:
        allow = "GET, HEAD" if path == "/" else allowed
        return plain_response(start_response, "405 Method Not Allowed",
                              f"{method} not allowed on {path}; use {allow}\n", [("Allow", allow)])
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    return handler(environ, start_response, query)


app = HijackMiddleware(demo_app)


def _default_logging() -> None:
    # Each heartbeat round is logged at INFO, so that a terminal running the demo
    # shows it beating, unless the host configured logging itself.
    logger = logging.getLogger("wsgi_hijack")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] [%(process)d] [%(name)s] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(config.log_level())


_default_logging()
