"""WebSocket for WSGI apps: the RFC 6455 handshake, then the reactor holds it.

From a WSGI app inside :class:`~wsgi_hijack.HijackMiddleware`::

    from wsgi_hijack.websocket import websocket_response

    def on_message(ws, message):          # runs in a greenlet, never the reactor's
        ws.send(f"you said {message}")    # to this client only

    def app(environ, start_response):
        return websocket_response(environ, start_response, channels=["chat"],
                                  on_message=on_message)

What it does, in order:

1. **Checks the handshake** (RFC 6455 section 4.2.1): ``GET``, HTTP/1.1,
   ``Upgrade: websocket``, ``Connection: upgrade``, a ``Sec-WebSocket-Key``
   that is 16 bytes in base64, and the channels. Anything wrong is answered
   ``400`` with the reason. A missing ``Sec-WebSocket-Version`` is a ``400``;
   a version other than 13 is a ``426 Upgrade Required`` with
   ``Sec-WebSocket-Version: 13``, as the RFC asks.
2. **Checks the Origin** before upgrading; refused with ``403``. Allowed:
   the origins ``allowed_origins`` and ``WSGI_HIJACK_ALLOWED_ORIGINS`` list
   (``"https://app.example.com"``, compared case-insensitively; ``"*"`` for
   any), and the server's own origin on a loopback name (the Origin's
   ``host[:port]`` equals the request's ``Host`` and is ``localhost``,
   ``127.x.x.x`` or ``[::1]``). An Origin equal to ``Host`` is not enough
   elsewhere: a page can send its own name in both (DNS rebinding), so a
   public deployment lists its origins. A request without an Origin (not a
   browser: curl, a server, the ``websockets`` library) is allowed: Origin
   protects browsers' users from other sites' pages, and any other client can
   send whatever Origin it likes.
3. **Chooses a subprotocol**: ``select_subprotocol(offered)`` if given (it
   returns one of the client's offers, or None), else the first of the app's
   ``subprotocols`` that the client offered (server preference). No match: no
   ``Sec-WebSocket-Protocol`` header, and the client decides whether to go on.
4. **Upgrades**: ``101 Switching Protocols`` with ``Sec-WebSocket-Accept``
   (``wsproto.utilities.generate_accept_token``), written by a partial
   hijack. No extension is accepted (no permessage-deflate), so a published
   message is framed once for all subscribers.
5. **Holds** the socket in the reactor with a :class:`WebSocket` protocol
   object, subscribed to ``channels`` (after the messages it missed since
   ``last_id``, if given). From then on see :mod:`wsgi_hijack.protocols.websocket`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import gevent
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import generate_accept_token

from . import config
from .adapters.resume import RESUME
from .connection import Connection
from .hijack import is_hijackable, partial_hijack
from .protocols.websocket import (
    JSON_FRAMER,
    TEXT_FRAMER,
    Endpoint,
    OnMessage,
    WebSocketFramer,
    WebSocketProtocol,
    binary_frame,
    close_frame,
    text_frame,
)
from .reactor import current_reactor, get_reactor
from .streams import BadRequest, _bad, _unhijackable, check_channels, parse_id, plain_response

__all__ = ["JSON_FRAMER", "TEXT_FRAMER", "Endpoint", "WebSocket", "WebSocketFramer",
           "WebSocketProtocol", "binary_frame", "close_frame", "is_websocket_request", "send",
           "text_frame", "websocket_response"]

WS_VERSION = "13"

log = logging.getLogger("wsgi_hijack.websocket")


class WebSocket(WebSocketProtocol):
    """One WebSocket connection, as the app's callback sees it.

    :meth:`send` replies to this client only, :meth:`close` ends the
    conversation, :attr:`channels`, :attr:`subprotocol` and :attr:`data`
    (whatever the app passed) describe it. The framing and parsing are
    :class:`~wsgi_hijack.protocols.websocket.WebSocketProtocol`'s; this
    subclass adds what touches gevent and the reactor, so one object per
    connection serves both.

    ``on_message(ws, message)`` runs in a greenlet, never in the reactor's
    loop: the reactor only queues the message. One greenlet per connection
    runs while it has messages waiting, in order, and exits when none are
    left, so an idle connection has no greenlet. An exception in the
    callback is logged and the connection goes on.
    """

    __slots__ = ("conn", "data", "_queue")

    def __init__(self, endpoint: Endpoint, subprotocol: str | None = None,
                 data: Any = None) -> None:
        super().__init__(endpoint, subprotocol)
        #: The reactor's record of this connection (set when it is stored,
        #: before any of the client's input).
        self.conn: Connection | None = None
        self.data = data
        self._queue: deque | None = None  # messages waiting for the callback

    def held(self, conn: Connection) -> None:
        self.conn = conn
        if self._queue:  # messages moved here with the connection, for this code's callback
            gevent.spawn(self._run_callbacks)

    def handoff_state(self, now: float) -> tuple[dict, bytes]:
        """The protocol's state, and the messages its callback has not taken
        yet: they move (out of this queue) and run in the successor's code.
        :attr:`data` moves too when it is JSON (what the app decided at the
        handshake, from headers the resumed request no longer has); else the
        successor's route gives it again."""
        state, input_ = super().handoff_state(now)
        try:
            json.dumps(self.data)
        except (TypeError, ValueError):
            pass
        else:
            state["data"] = self.data
        queue = self._queue
        if queue:
            state["queued"] = [m if isinstance(m, str) else
                               {"base64": base64.b64encode(m).decode("ascii")} for m in queue]
            queue.clear()
        return state, input_

    def resume(self, state: dict, now: float) -> None:
        state = dict(state)
        if "data" in state:
            self.data = state.pop("data")
        queued = state.pop("queued", [])
        if not isinstance(queued, list):
            raise ValueError("queued must be a list of messages")
        super().resume(state, now)
        messages: deque = deque()
        for item in queued:
            if isinstance(item, str):
                messages.append(item)
            elif isinstance(item, dict) and isinstance(item.get("base64"), str):
                messages.append(base64.b64decode(item["base64"], validate=True))
            else:
                raise ValueError(f"a queued message must be text or {{'base64': ...}}, "
                                 f"not {item!r}")
        if messages:
            self._queue = messages  # their greenlet starts once held()

    def message_received(self, message: str | bytes) -> bool:
        if self.endpoint.on_message is None:
            return True
        queue = self._queue
        if queue is None:
            self._queue = deque([message])
            gevent.spawn(self._run_callbacks)  # a greenlet only while messages wait
        elif len(queue) >= self.endpoint.max_queue:
            return False
        else:
            queue.append(message)
        return True

    def _run_callbacks(self) -> None:
        queue = self._queue
        on_message = self.endpoint.on_message
        try:
            while queue:
                message = queue.popleft()
                try:
                    on_message(self, message)
                except Exception:
                    log.exception("websocket on_message callback failed (fd %s)",
                                  self.conn.fd if self.conn is not None else "?")
        finally:
            self._queue = None

    def queued_messages(self) -> list[str | bytes]:
        """The messages received and not yet taken by the callback greenlet, oldest
        first; a copy, the queue is left as it is. The message whose callback is
        running now was taken: it is not among them."""
        queue = self._queue
        return list(queue) if queue is not None else []

    @property
    def channels(self) -> tuple[str, ...]:
        return self.conn.channels if self.conn is not None else ()

    @property
    def closed(self) -> bool:
        conn = self.conn
        return conn is None or conn.fd < 0 or conn.closing

    def send(self, message: str | bytes) -> bool:
        """Send ``message`` to this client only (text frame for ``str``, binary
        for ``bytes``). Call from the reactor's thread: callbacks run there.
        Returns False when the connection is already closed or closing."""
        if self.closed:
            return False
        data = text_frame(message) if isinstance(message, str) else binary_frame(message)
        _reactor().write(self.conn, data)
        return True

    def close(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the close handshake: send a close frame, then close the connection
        once it is flushed. Call from the reactor's thread."""
        if not self.closed:
            _reactor().close_connection(self.conn, close_frame(code, reason))

    def __repr__(self) -> str:
        return f"<WebSocket {self.conn!r} subprotocol={self.subprotocol!r}>"


def _reactor():
    reactor = current_reactor()
    if reactor is None:
        raise RuntimeError("no running reactor in this process")
    return reactor


def send(ws: WebSocket, message: str | bytes) -> bool:
    """``ws.send(message)``: reply to one WebSocket client from a callback."""
    return ws.send(message)


def _tokens(value: str) -> set[str]:
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def is_websocket_request(environ: dict) -> bool:
    """The request asks for a WebSocket upgrade (``Upgrade: websocket``)."""
    return "websocket" in _tokens(environ.get("HTTP_UPGRADE", ""))


def check_handshake(environ: dict) -> str:
    """The checked ``Sec-WebSocket-Key``; raises BadRequest with the reason."""
    if environ.get("REQUEST_METHOD") != "GET":
        raise BadRequest("a WebSocket handshake must be a GET")
    if environ.get("SERVER_PROTOCOL") not in ("HTTP/1.1", "HTTP/2", "HTTP/2.0"):
        raise BadRequest("a WebSocket handshake needs HTTP/1.1")
    if not is_websocket_request(environ):
        raise BadRequest("this is a WebSocket endpoint: send Upgrade: websocket")
    if "upgrade" not in _tokens(environ.get("HTTP_CONNECTION", "")):
        raise BadRequest("a WebSocket handshake needs Connection: Upgrade")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64")
    return key


def origin_allowed(environ: dict, allowed_origins: Iterable[str] | None = None) -> bool:
    """Is the request's Origin allowed? See the module docstring."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    allowed = set(config.allowed_origins())
    if allowed_origins is not None:
        allowed.update(o.strip().lower().rstrip("/") for o in allowed_origins)
    if "*" in allowed or origin in allowed:
        return True
    # The server's own origin, on a loopback name only: a page anywhere can
    # make its Origin equal Host (DNS rebinding: its name, then our address),
    # never make its name a loopback one.
    host = environ.get("HTTP_HOST", "").strip().lower()
    try:
        parts = urlsplit(origin)
        name = parts.hostname
    except ValueError:
        return False
    return bool(host) and parts.netloc == host and _loopback_name(name)


def _loopback_name(name: str | None) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name or "").is_loopback
    except ValueError:
        return False


def choose_subprotocol(environ: dict, subprotocols: Sequence[str] | None,
                       select: Callable[[list[str]], str | None] | None) -> str | None:
    offered = [p.strip() for p in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",")
               if p.strip()]
    if select is not None:
        chosen = select(offered)
        if chosen is not None and chosen not in offered:
            raise ValueError(f"select_subprotocol chose {chosen!r}, which the client did "
                             f"not offer ({offered!r})")
        return chosen
    for name in subprotocols or ():
        if name in offered:
            return name
    return None


# One Endpoint per distinct setting, shared by every connection that uses it.
_endpoints: dict[tuple, Endpoint] = {}
_ENDPOINTS_MAX = 256


def _endpoint(on_message: OnMessage | None, max_message: int | None,
              pong_timeout: float | None, envelope: bool) -> Endpoint:
    key = (on_message, max_message, pong_timeout, envelope)
    try:
        endpoint = _endpoints.get(key)
    except TypeError:  # an unhashable callable: not shared
        return Endpoint(on_message, max_message, pong_timeout, envelope=envelope)
    if endpoint is None:
        if len(_endpoints) >= _ENDPOINTS_MAX:  # per-request closures: keep the cache bounded
            _endpoints.pop(next(iter(_endpoints)))
        endpoint = _endpoints[key] = Endpoint(on_message, max_message, pong_timeout,
                                              envelope=envelope)
    return endpoint


def websocket_response(environ: dict, start_response, channels: Iterable[str] = (),
                       on_message: OnMessage | None = None,
                       subprotocols: Sequence[str] | None = None,
                       select_subprotocol: Callable[[list[str]], str | None] | None = None,
                       allowed_origins: Iterable[str] | None = None,
                       last_id: int | str | None = None, data: Any = None,
                       envelope: bool = True, max_message: int | None = None,
                       pong_timeout: float | None = None) -> list[bytes]:
    """Upgrade the request to a WebSocket held by the reactor; see the module docstring.

    ``on_message(ws, message)`` gets each message the client sends (``str`` or
    ``bytes``) in a greenlet; ``ws`` is the :class:`WebSocket` (``ws.send``,
    ``ws.close``, ``ws.data`` is ``data``). ``channels`` are subscribed;
    published messages reach the client as text frames, a JSON object
    ``{"id", "channel", "event", "data"}`` each (``envelope=False``: the data
    alone). ``max_message`` and ``pong_timeout`` default to
    ``WSGI_HIJACK_WS_MAX_MESSAGE`` and ``WSGI_HIJACK_WS_PONG_TIMEOUT``.
    """
    if environ.get(RESUME) is not None:
        return _resume(environ, start_response, channels, on_message, data, envelope,
                       max_message, pong_timeout)
    try:
        key = check_handshake(environ)
        channels = check_channels(channels) if channels else ()
        if isinstance(last_id, str):
            last_id = parse_id(last_id, "last_id")
    except BadRequest as exc:
        return _bad(start_response, exc)
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    if not version:
        return _bad(start_response, BadRequest("a WebSocket handshake needs "
                                               "Sec-WebSocket-Version: 13"))
    if version != WS_VERSION:
        return plain_response(start_response, "426 Upgrade Required",
                              f"unsupported Sec-WebSocket-Version {version!r}; use 13\n",
                              [("Sec-WebSocket-Version", WS_VERSION)])
    if not origin_allowed(environ, allowed_origins):
        log.info("WebSocket refused (403): origin %r is not allowed for host %r",
                 environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"))
        return plain_response(start_response, "403 Forbidden",
                              f"origin {environ.get('HTTP_ORIGIN')!r} is not allowed\n")
    subprotocol = choose_subprotocol(environ, subprotocols, select_subprotocol)
    if not is_hijackable(environ):
        return _unhijackable(environ, start_response, "WebSocket")
    endpoint = _endpoint(on_message, max_message, pong_timeout, envelope)
    reactor = get_reactor()
    accept = generate_accept_token(key.encode("ascii")).decode("ascii")
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Accept", accept)]
    if subprotocol is not None:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    start_response("101 Switching Protocols", headers)

    def hold(sock) -> None:
        reactor.hold(sock, WebSocket(endpoint, subprotocol, data), channels=channels,
                     last_id=last_id)

    return partial_hijack(environ, hold)


def _resume(environ: dict, start_response, channels: Iterable[str],
            on_message: OnMessage | None, data: Any, envelope: bool,
            max_message: int | None, pong_timeout: float | None) -> list[bytes]:
    """A WebSocket moved here from another worker: its handshake was done
    there (and its subprotocol travels in its state), so it is held again
    with this code's ``on_message`` and settings."""
    channels = check_channels(channels) if channels else ()
    endpoint = _endpoint(on_message, max_message, pong_timeout, envelope)
    reactor = get_reactor()
    start_response("101 Switching Protocols", [])
    return partial_hijack(environ, lambda sock: reactor.hold(
        sock, WebSocket(endpoint, None, data), channels=channels))
