"""A Bottle app with a live feed: ``gunicorn -k sync examples.bottle_app:app``.

- ``GET /events?channel=NAME``: Server-Sent Events, held by the reactor;
- ``POST /publish`` with form fields ``channel`` and ``data``: ``202`` and
  ``{"id": N}`` (loopback clients only, or a bearer token with
  ``WSGI_HIJACK_PUBLISH_TOKEN``).

The change to an existing Bottle app is one line: serve the wrapped app::

    app = HijackMiddleware(bottle_app)
"""

from __future__ import annotations

import json

from bottle import Bottle, HTTPResponse, request

from wsgi_hijack import HijackMiddleware
from wsgi_hijack.streams import framework_response, sse_response

from ._publish import publish_message

bottle_app = Bottle()


@bottle_app.get("/events")
def events():
    if request.method != "GET":  # Bottle routes HEAD to GET views; never hold a HEAD
        return HTTPResponse(status=405, headers={"Allow": "GET"})
    status, headers, body = framework_response(
        sse_response, request.environ, request.query.getall("channel"))
    if status.startswith("200"):
        # Bottle gives an empty body a "Content-Length: 0", which would end
        # the event stream at once; a non-empty iterator keeps it a stream.
        # The middleware never sends this body: the reactor writes the stream.
        body = iter([b"\n"])
    return HTTPResponse(body, status=status, headers=headers)


@bottle_app.post("/publish")
def publish_view():
    status, body, extra = publish_message(
        request.environ, request.forms.getunicode("channel", ""),
        request.forms.getunicode("data", ""))
    return HTTPResponse(json.dumps(body), status=status,
                        headers={"Content-Type": "application/json", **extra})


app = HijackMiddleware(bottle_app)
