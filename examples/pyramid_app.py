"""A Pyramid app with a live feed: ``gunicorn -k gthread examples.pyramid_app:app``.

- ``GET /events?channel=NAME``: Server-Sent Events, held by the reactor;
- ``POST /publish`` with form fields ``channel`` and ``data``: ``202`` and
  ``{"id": N}`` (loopback clients only, or a bearer token with
  ``WSGI_HIJACK_PUBLISH_TOKEN``).

The change to an existing Pyramid app is one line, around the app that
``Configurator.make_wsgi_app()`` returns::

    app = HijackMiddleware(config.make_wsgi_app())
"""

from __future__ import annotations

from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPMethodNotAllowed
from pyramid.response import Response

from wsgi_hijack import HijackMiddleware
from wsgi_hijack.streams import framework_response, sse_response

from ._publish import publish_message


def events(request):
    if request.method != "GET":  # Pyramid routes HEAD to GET views; never hold a HEAD
        raise HTTPMethodNotAllowed(headers={"Allow": "GET"})
    status, headers, body = framework_response(
        sse_response, request.environ, request.GET.getall("channel"))
    # app_iter, not body=: WebOb then sends the headers as given, without a
    # Content-Length of its own.
    return Response(status=status, headerlist=headers, app_iter=body)


def publish_view(request):
    status, body, extra = publish_message(
        request.environ, request.POST.get("channel", ""), request.POST.get("data", ""))
    response = Response(json_body=body, status=status)
    response.headers.update(extra)
    return response


def make_app():
    with Configurator() as config:
        config.add_route("events", "/events")
        config.add_view(events, route_name="events")
        config.add_route("publish", "/publish", request_method="POST")
        config.add_view(publish_view, route_name="publish")
        return config.make_wsgi_app()


app = HijackMiddleware(make_app())
