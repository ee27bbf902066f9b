"""Who may publish in the demo: one rule for ``POST /publish``
(:mod:`wsgi_hijack.demo`), for text sent on the WebSocket chat
(:mod:`wsgi_hijack.demo_ws`) and for the examples' publish views, which all
import it from here.

- **Not from another site's page.** A request with an ``Origin`` must come
  from an allowed origin, by the WebSocket handshake's rule
  (:func:`wsgi_hijack.websocket.origin_allowed`: the server's own origin on
  a loopback name, or one ``WSGI_HIJACK_ALLOWED_ORIGINS`` lists; an Origin
  equal to ``Host`` alone is not enough, as DNS rebinding sends that). A
  request without one but with ``Sec-Fetch-Site: cross-site`` or
  ``same-site`` is refused too. Else ``403``.
- **Who.** With ``WSGI_HIJACK_PUBLISH_TOKEN`` set, a matching bearer token
  (``401`` without); unset, loopback clients only (``403``).
- **What** (``POST /publish``, whose body is the message: :func:`may_post_message`).
  Without a token, the content types a page on any site may send without
  asking (the CORS "simple" ones: ``application/x-www-form-urlencoded``,
  ``multipart/form-data``, ``text/plain``) are refused with ``415``: a
  browser that sends no Origin could otherwise publish for a page it shows.
  Any other type, or none, is taken. A token is the protection where one is
  set: a page cannot add ``Authorization`` to a cross-site request without
  asking first, and the demo answers no such request.
"""

from __future__ import annotations

import hmac
import ipaddress

from . import config
from .websocket import origin_allowed

#: The content types a page on another site may send without a CORS preflight.
SIMPLE_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data",
                                  "text/plain"})


def cross_site(environ: dict) -> str | None:
    """Why the request comes from another site's page, or None."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None:
        if origin_allowed(environ):
            return None
        return (f"origin {origin!r} may not publish (the server's own origin on a loopback "
                "name may; WSGI_HIJACK_ALLOWED_ORIGINS lists others)")
    site = environ.get("HTTP_SEC_FETCH_SITE", "").strip().lower()
    if site in ("cross-site", "same-site"):
        return f"a request from another site's page (Sec-Fetch-Site: {site}) may not publish"
    return None


def may_publish(environ: dict) -> tuple[bool, str, str]:
    """The demo's publish rule: (allowed, status if not, reason if not); see
    the module docstring.

    With ``WSGI_HIJACK_PUBLISH_TOKEN`` set, a matching bearer token is needed
    (compared in constant time). Without it, only loopback clients may publish,
    so a demo left running on a public address is not an open relay.
    """
    refused = cross_site(environ)
    if refused is not None:
        return False, "403 Forbidden", refused
    token = config.publish_token()
    if token:
        given = environ.get("HTTP_AUTHORIZATION", "")
        if given.startswith("Bearer ") and hmac.compare_digest(
                given[7:].strip().encode(), token.encode()):
            return True, "", ""
        return False, "401 Unauthorized", "publishing needs Authorization: Bearer <token>"
    try:
        loopback = ipaddress.ip_address(environ.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return True, "", ""
    return False, "403 Forbidden", ("only loopback clients may publish; set "
                                    "WSGI_HIJACK_PUBLISH_TOKEN to allow others with a token")


def may_post_message(environ: dict) -> tuple[bool, str, str]:
    """:func:`may_publish` for a request whose body is the message (the
    demo's ``POST /publish``): without a token, not in a content type a page
    on any site may send (``415``)."""
    allowed, status, reason = may_publish(environ)
    if not allowed or config.publish_token():
        return allowed, status, reason
    media_type = environ.get("CONTENT_TYPE", "").partition(";")[0].strip().lower()
    if media_type in SIMPLE_CONTENT_TYPES:
        return False, "415 Unsupported Media Type", (
            f"{media_type} is refused: a page on any site can send it; send the message "
            "as application/octet-stream (or any other type, or none), or set "
            "WSGI_HIJACK_PUBLISH_TOKEN and send the token")
    return True, "", ""
