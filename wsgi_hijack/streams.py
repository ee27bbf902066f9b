"""Subscribe a request's connection to channels: SSE, chunked, or long-poll.

Each function is called from a WSGI app (inside :class:`HijackMiddleware`)
with the app's ``environ`` and ``start_response``, and returns what the app
returns. It checks the request, hijacks the connection and hands it to the
reactor, subscribed to ``channels``; or, when the request is bad, answers a
``400`` with the reason and takes nothing. On a server that cannot hijack it
answers ``501`` and logs why.

A framework view (Flask, Django...) has no ``start_response``: it calls
:func:`framework_response` with one of these functions and returns the
status, headers and body it gets, in the framework's own response object.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

from .adapters.base import WHY_NOT
from .bus import PublishError, check_channel, get_bus
from .bus.positions import Position, parse_position
from .hijack import full_hijack, is_hijackable, partial_hijack
from .protocols.chunked import HEAD_HEADERS as CHUNKED_HEAD
from .protocols.chunked import ChunkedStream
from .protocols.longpoll import LongPoll
from .protocols.sse import HEAD_HEADERS as SSE_HEAD
from .protocols.sse import ServerSentEvents
from .reactor import get_reactor

log = logging.getLogger("wsgi_hijack")

#: Where hijack works (see the compatibility matrix in the README).
HIJACK_SERVERS = ("gunicorn (gevent, gthread or sync workers), gevent.pywsgi, Werkzeug, "
                  "uWSGI --http-socket")

SSE = ServerSentEvents()
CHUNKED = ChunkedStream()
LONG_POLL = LongPoll()


class BadRequest(ValueError):
    """The request cannot be served as sent; the text says why (answered as 400)."""


def plain_response(start_response, status: str, text: str,
                   headers: Sequence[tuple[str, str]] = ()) -> list[bytes]:
    body = text.encode("utf-8")
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]


def json_response(start_response, status: str, data: object) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def parse_id(value: str | None, what: str) -> Position | None:
    """A position from a client: a non-negative message id, or absent; on a
    bus whose channels count their own ids (Redis Cluster), also one id per
    channel, ``channel=id,channel=id`` (:mod:`wsgi_hijack.bus.positions`)."""
    if value is None or value == "":
        return None
    if value.isascii() and value.isdigit() and len(value) <= 19:
        return int(value)
    if not get_bus().ids_per_channel:
        raise BadRequest(f"{what} must be a non-negative integer message id, got {value!r}")
    try:
        return parse_position(value)
    except ValueError as exc:
        raise BadRequest(f"{what} must be a message id or channel=id,... positions "
                         f"({exc}), got {value!r}") from None


def check_channels(channels: Iterable[str]) -> tuple[str, ...]:
    channels = tuple(channels)
    if not channels:
        raise BadRequest("no channel given: add ?channel=NAME")
    try:
        return tuple(dict.fromkeys(check_channel(c) for c in channels))
    except PublishError as exc:
        raise BadRequest(str(exc)) from None


def why_not_hijackable(environ: dict) -> str:
    """Why this request's connection cannot go to the reactor, for the client
    and the log: the reason of the adapter that knew the server (a TLS
    connection, uWSGI without threads...) says what to change; else no
    adapter knows this server, and the answer names those that work."""
    return environ.get(WHY_NOT) or (
        f"it cannot hand connections to the reactor; run under {HIJACK_SERVERS}")


def _unhijackable(environ: dict, start_response, what: str) -> list[bytes]:
    """The ``501`` for a stream on a connection that cannot be hijacked, with
    the reason in the body: an ordinary response, which the server writes
    through its own socket (encrypted on a TLS connection)."""
    reason = why_not_hijackable(environ)
    log.warning("%s needs a server that can hijack: %s", what, reason)
    return plain_response(start_response, "501 Not Implemented",
                          f"{what} is not available on this server: {reason}\n")


def _bad(start_response, exc: BadRequest) -> list[bytes]:
    return plain_response(start_response, "400 Bad Request", f"{exc}\n")


def sse_response(environ: dict, start_response, channels: Iterable[str],
                 last_id: int | str | None = None) -> list[bytes]:
    """Stream ``channels`` as Server-Sent Events.

    ``last_id`` defaults to the request's ``Last-Event-ID`` header, which
    EventSource sends when it reconnects: the client first gets what it
    missed, or a ``gap`` event when some of it is gone from the history.
    """
    try:
        channels = check_channels(channels)
        last_id = _last_id(environ, last_id)
    except BadRequest as exc:
        return _bad(start_response, exc)
    return _hold_stream(environ, start_response, "Server-Sent Events", SSE, SSE_HEAD,
                        channels, last_id)


def _last_id(environ: dict, last_id: int | str | None) -> Position | None:
    """The given id, else the request's ``Last-Event-ID`` header; checked."""
    if last_id is None:
        return parse_id(environ.get("HTTP_LAST_EVENT_ID"), "Last-Event-ID")
    if isinstance(last_id, str):
        return parse_id(last_id, "last_id")
    return last_id


def _hold_stream(environ: dict, start_response, what: str, protocol, head: list,
                 channels: tuple[str, ...], last_id: Position | None) -> list[bytes]:
    if not is_hijackable(environ):
        return _unhijackable(environ, start_response, what)
    reactor = get_reactor()
    start_response("200 OK", list(head))
    return partial_hijack(environ, lambda sock: reactor.hold(
        sock, protocol, channels=channels, last_id=last_id))


def chunked_response(environ: dict, start_response, channels: Iterable[str],
                     last_id: int | str | None = None) -> list[bytes]:
    """Stream ``channels`` as an HTTP/1.1 chunked response, one chunk per message."""
    try:
        channels = check_channels(channels)
        last_id = _last_id(environ, last_id)
        if environ.get("SERVER_PROTOCOL") == "HTTP/1.0":
            raise BadRequest("a chunked stream needs HTTP/1.1; use /events or /poll")
    except BadRequest as exc:
        return _bad(start_response, exc)
    return _hold_stream(environ, start_response, "chunked streams", CHUNKED, CHUNKED_HEAD,
                        channels, last_id)


def long_poll_response(environ: dict, start_response, channels: Iterable[str],
                       since: int | str | None, timeout: float | None = None) -> list[bytes]:
    """Answer with messages after ``since`` as soon as there are any, or ``[]``
    after ``timeout`` seconds (``WSGI_HIJACK_POLL_TIMEOUT``, default 25).

    Without ``since``, the client has seen nothing it cares about: it waits
    for the next message.
    """
    from . import config

    try:
        channels = check_channels(channels)
        if isinstance(since, str):
            since = parse_id(since, "since")
    except BadRequest as exc:
        return _bad(start_response, exc)
    if not is_hijackable(environ):
        return _unhijackable(environ, start_response, "long-poll")
    reactor = get_reactor()
    sock = full_hijack(environ)  # the head is written with the answer, not before
    reactor.hold(sock, LONG_POLL, channels=channels, last_id=since,
                 timeout=timeout if timeout is not None else config.poll_timeout())
    return []


def framework_response(stream: Callable[..., Iterable[bytes]], environ: dict, *args: object,
                       **kwargs: object) -> tuple[str, list[tuple[str, str]], Iterator[bytes]]:
    """Call ``stream`` (:func:`sse_response`, :func:`chunked_response`,
    :func:`long_poll_response`) from a framework view, which has no
    ``start_response``; returns ``(status, headers, body)`` for the view to
    send as the framework's response. In Flask::

        status, headers, body = framework_response(sse_response, request.environ, ["news"])
        return Response(body, status=status, headers=headers)

    When the connection was taken, the middleware writes the status and the
    headers as the framework passes them on (with any it adds) and never sends
    the body. The body is an iterator, not a list, so that the framework sees
    a stream and does not add a ``Content-Length: 0`` that would end the event
    stream at once. A bad request gets its ``400`` as usual: status, headers
    (with ``Content-Length``) and the reason in the body.
    """
    head: list = []

    def start_response(status: str, headers: list, exc_info: object = None):
        head[:] = [status, list(headers)]
        return _no_write

    result = stream(environ, start_response, *args, **kwargs)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    if not head:  # a full hijack (long-poll): whatever the framework sends is dropped
        return "200 OK", [], iter(())
    return head[0], head[1], iter([body] if body else [])


def _no_write(data: bytes) -> None:
    raise RuntimeError("framework_response: the stream functions do not use write()")
