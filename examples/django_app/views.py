"""Two ordinary Django views: one hands its connection to the reactor as an
SSE stream, the other publishes to it."""

from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from wsgi_hijack.streams import framework_response, sse_response

from .._publish import publish_message


@require_GET  # not HEAD: a HEAD must not be held as a stream
def events(request):
    # The view returns the status and headers; when the connection can be
    # taken, the middleware writes exactly what Django passes on (with its
    # own middleware's headers) and the reactor holds the connection. On a
    # server that cannot hijack, this is a 501 with the reason.
    status, headers, body = framework_response(
        sse_response, request.environ, request.GET.getlist("channel"))
    response = StreamingHttpResponse(body, status=int(status[:3]))
    for name, value in headers:
        response[name] = value
    return response


@csrf_exempt  # an API for scripts: the publish rule is the loopback/token check
@require_POST
def publish_view(request):
    status, body, extra = publish_message(
        request.environ, request.POST.get("channel", ""), request.POST.get("data", ""))
    return JsonResponse(body, status=status, headers=extra)
