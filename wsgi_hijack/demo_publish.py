"""Who may publish in the demo: one rule for ``POST /publish``
(:mod:`wsgi_hijack.demo`) and for text sent on the WebSocket chat
(:mod:`wsgi_hijack.demo_ws`), which both import it from here.
"""

from __future__ import annotations

import hmac
import ipaddress
import os


def may_publish(environ: dict) -> tuple[bool, str, str]:
    """The demo's publish rule: (allowed, status if not, reason if not).

    With ``WSGI_HIJACK_PUBLISH_TOKEN`` set, a matching bearer token is needed
    (compared in constant time). Without it, only loopback clients may publish,
    so a demo left running on a public address is not an open relay.
    """
    token = os.environ.get("WSGI_HIJACK_PUBLISH_TOKEN")
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
