"""What gunicorn's workers share, whichever runs the request: the parser's
read-ahead bytes and the worker's ``Response`` object.

- bytes read past the head sit in the request parser's ``Unreader`` (reached
  through ``environ["wsgi.input"]``, a ``gunicorn.http.body.Body``) and, if the
  app read part of a body, in that ``Body``'s own buffer;
- the worker's ``Response`` is ``start_response.__self__`` when our middleware
  is the outermost app. Marked as sent and closing, it makes any worker write
  nothing, log the request in its access log, and end its keep-alive loop.
"""

from __future__ import annotations

from typing import Any

from .base import ServerConnection

try:  # gunicorn is a dependency, but the adapters must not break an import without it
    from gunicorn.http.wsgi import Response as _GunicornResponse
except ImportError:  # pragma: no cover
    _GunicornResponse = None

try:  # gunicorn 25+: HTTP/2 streams share one connection; never hijackable
    from gunicorn.http2.response import HTTP2Response as _HTTP2Response
except ImportError:  # pragma: no cover
    _HTTP2Response = None


def is_http1(environ: dict, response: Any) -> bool:
    """Whether the request is HTTP/1.x on its own connection (not an HTTP/2 stream)."""
    if _HTTP2Response is not None and isinstance(response, _HTTP2Response):
        return False
    return environ.get("HTTP_VERSION") != "2" and environ.get(
        "SERVER_PROTOCOL", "HTTP/1.1") in ("HTTP/1.0", "HTTP/1.1")


def worker_response(start_response: Any) -> Any:
    """The worker's own Response, or None when another layer hides it."""
    response = getattr(start_response, "__self__", None)
    if _GunicornResponse is None or not isinstance(response, _GunicornResponse):
        return None
    return response


def take_read_ahead(environ: dict) -> bytes:
    """The bytes gunicorn read past what the app consumed, taken out of its buffers."""
    pending = b""
    body = environ.get("wsgi.input")
    buf = getattr(body, "buf", None)
    if buf is not None:  # what the app's reads pulled in but did not return
        pending += buf.getvalue()
    unreader = getattr(getattr(body, "reader", None), "unreader", None)
    if unreader is not None:
        pending += unreader.take_buffered()
    return pending


def step_back(response: Any, status: str | None) -> list[bytes]:
    """End gunicorn's handling of a hijacked request: nothing written, the
    request in the access log, the keep-alive loop over. Without the worker's
    Response, ``StopIteration``: every worker treats it as "close this
    connection" and logs it at debug level only."""
    if response is None:
        raise StopIteration("connection hijacked")
    response.status = status or "-"  # access log: "-" for a full hijack
    response.headers_sent = True  # nothing more to write, and close() writes nothing
    response.chunked = False
    response.force_close()  # ends gunicorn's keep-alive loop for this socket
    return []


class GunicornConnection(ServerConnection):
    """One request on any gunicorn worker; subclasses say which sockets are
    theirs (:meth:`owns`) and how the fd leaves the socket object (``take``)."""

    __slots__ = ("environ", "sock", "response")

    def __init__(self, environ: dict, sock: Any, response: Any) -> None:
        self.environ = environ
        self.sock = sock
        self.response = response

    @classmethod
    def owns(cls, sock: Any) -> bool:
        raise NotImplementedError

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> GunicornConnection | None:
        sock = environ.get("gunicorn.socket")
        if not cls.owns(sock) or "gunicorn" not in environ.get("SERVER_SOFTWARE", "gunicorn"):
            return None
        response = worker_response(start_response)
        if not is_http1(environ, response):
            return None
        return cls(environ, sock, response)

    def finish(self, status: str | None) -> Any:
        return step_back(self.response, status)

    def close_after_response(self) -> list[tuple[str, str]]:
        # gunicorn drops the app's Connection header; its Response decides,
        # and then writes "Connection: close" itself.
        if self.response is not None:
            self.response.force_close()
            return []
        return [("Connection", "close")]
