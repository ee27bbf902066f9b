"""The demo's WebSocket chat: ``GET /ws?channel=C`` (part of :mod:`wsgi_hijack.demo`).

The connection joins channel ``C`` (exactly one; ``last_id=N`` replays what
came after message ``N``): every message published there reaches it as a
text frame holding a JSON object ``{"id", "channel", "event", "data"}``.

Text the client sends is published to ``C``, under the same rule as
``POST /publish`` (:func:`wsgi_hijack.demo_publish.may_publish`: a bearer token when
``WSGI_HIJACK_PUBLISH_TOKEN`` is set -- browsers cannot set headers on a
WebSocket, so a token-protected demo chat is read-only for them -- else
loopback clients only). The rule is decided once, at the handshake. A client
that may not publish keeps its connection and still receives; each text it
sends is answered, to it alone, with ``{"error": "<status>: <reason>"}`` and
nothing is published. Binary messages are never published (the bus carries
text); they get an error reply too, as does a message the bus refuses.
Other sites' pages are refused with 403 before the upgrade (the Origin rule
of :func:`wsgi_hijack.websocket.origin_allowed`: the server's own origin on a
loopback name, or one ``WSGI_HIJACK_ALLOWED_ORIGINS`` lists).
"""

from __future__ import annotations

import json
import logging

from .bus import BusUnavailable, PublishError, publish
from .demo_publish import may_publish
from .streams import plain_response
from .websocket import WebSocket, websocket_response

log = logging.getLogger("wsgi_hijack")


def chat_message(ws: WebSocket, message: str | bytes) -> None:
    """on_message for the demo: publish the client's text to its channel."""
    refusal = ws.data  # None when the client may publish, else why not (at the handshake)
    if refusal is not None:
        ws.send(json.dumps({"error": refusal}))
        return
    if isinstance(message, bytes):
        ws.send(json.dumps({"error": "binary messages are not published; send text"}))
        return
    try:
        publish(ws.channels[0], message)
    except PublishError as exc:
        ws.send(json.dumps({"error": str(exc)}))
    except BusUnavailable as exc:
        log.error("publish from a WebSocket failed: %s", exc)
        ws.send(json.dumps({"error": f"nothing was published, retry later: {exc}"}))


_refusals: dict[str, str] = {}  # one string per refusal, shared by all its connections


def ws_route(environ: dict, start_response, query: dict) -> list[bytes]:
    channels = query.get("channel", [])
    if len(channels) != 1:
        return plain_response(start_response, "400 Bad Request",
                              "give exactly one ?channel=NAME to chat on\n")
    allowed, status, reason = may_publish(environ)
    refusal = None
    if not allowed:
        text = f"{status}: {reason}"
        refusal = _refusals.setdefault(text, text)
    return websocket_response(environ, start_response, channels, on_message=chat_message,
                              last_id=query.get("last_id", [None])[0], data=refusal)
