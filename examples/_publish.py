"""The publish view's logic, shared by the Django, Pyramid and Bottle examples:
each framework only turns the result into its own response.

The demo's rule applies (:func:`wsgi_hijack.demo.may_publish`): loopback
clients only, unless ``WSGI_HIJACK_PUBLISH_TOKEN`` is set, and then a bearer
token is needed.
"""

from __future__ import annotations

import logging

from wsgi_hijack import publish
from wsgi_hijack.bus import BusUnavailable, PublishError
from wsgi_hijack.demo import may_publish


def publish_message(environ: dict, channel: str, data: str) -> tuple[int, dict, dict]:
    """Publish ``data`` on ``channel``; returns (status code, JSON body, extra headers)."""
    allowed, status, reason = may_publish(environ)
    if not allowed:
        extra = {"WWW-Authenticate": "Bearer"} if status.startswith("401") else {}
        return int(status[:3]), {"error": reason}, extra
    try:
        return 202, {"id": publish(channel, data)}, {}
    except PublishError as exc:
        return 400, {"error": str(exc)}, {}
    except BusUnavailable as exc:
        logging.getLogger("wsgi_hijack").error("publish failed: %s", exc)
        return 503, {"error": f"{exc}; nothing was published, retry later"}, {"Retry-After": "1"}
