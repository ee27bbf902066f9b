"""The hijack API in the WSGI environ: Rack's ``rack.hijack`` for WSGI.

:class:`HijackMiddleware` wraps any WSGI app. For each request it asks the
server adapters (:mod:`wsgi_hijack.adapters`) whether this server's
connection can be taken, and puts three keys in the environ:

``wsgi_hijack.hijackable``
    ``True`` when the connection can be hijacked (Rack's ``rack.hijack?``).
``wsgi_hijack.hijack``
    Full hijack: call it, get a :class:`HijackedSocket`, own the connection.
    The server writes nothing more to it and closes nothing.
``wsgi_hijack.partial_hijack``
    Partial hijack: the app calls ``environ["wsgi_hijack.partial_hijack"](callback)``
    and gives status and headers through ``start_response`` as usual (before
    or after; a framework calls it when the view returns). When the app
    returns, the library writes the status line and headers once, then calls
    ``callback(sock)``. The body the app returns is closed, never sent.

The middleware must be the outermost layer the server calls (that is the one
line a legacy app changes), because it alone decides what the server sees
when a request was hijacked. Middleware *inside* it may wrap
``start_response`` and the body freely: a hijack is recorded on the request,
not signalled through the body, and the status and headers written for a
partial hijack are the ones that reached the middleware through the app's
``start_response`` chain.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from . import adapters
from .adapters.base import ServerConnection
from .handoff.codec import REQUEST_LINE as _REQUEST_LINE

log = logging.getLogger("wsgi_hijack")

HIJACKABLE = "wsgi_hijack.hijackable"
HIJACK = "wsgi_hijack.hijack"
PARTIAL_HIJACK = "wsgi_hijack.partial_hijack"

StartResponse = Callable[..., Callable[[bytes], Any]]
WSGIApp = Callable[[dict, StartResponse], Iterable[bytes]]


class HijackError(RuntimeError):
    """A hijack that cannot be done as asked; the message says what to change."""


class HijackRefused(HijackError):
    """No room for one more held connection (see wsgi_hijack.admission). If the
    app lets it propagate, or answers anything else, the middleware answers
    the refusal's 503 or 429 with Retry-After."""

    def __init__(self, refusal: Any) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class HijackedSocket:
    """The raw client connection, as a socket, after a hijack.

    Bytes the server had already read past the request head (a client may send
    them right behind it) are returned first by :meth:`recv` and
    :meth:`recv_into`, so nothing the client sent is lost. Everything else is
    the wrapped socket's own method.
    """

    __slots__ = ("_sock", "_pending", "peer_ip", "request", "resumed")

    def __init__(self, sock: socket.socket, pending: bytes = b"",
                 peer_ip: str | None = None, request: str | None = None,
                 resumed: Any = None) -> None:
        self._sock = sock
        self._pending = pending
        #: The client's address as the server saw it (REMOTE_ADDR).
        self.peer_ip = peer_ip
        #: The request line it was hijacked for (see :func:`request_line`).
        self.request = request
        #: When the connection was moved here from another worker, its
        #: :class:`~wsgi_hijack.handoff.codec.ConnectionState`: the reactor
        #: resumes it where it was, rather than starting a response.
        self.resumed = resumed

    @property
    def pending(self) -> bytes:
        """Bytes received before the hijack and not yet returned by recv()."""
        return self._pending

    def take_pending(self) -> bytes:
        data, self._pending = self._pending, b""
        inner = getattr(self._sock, "take_pending", None)  # a TLS socket's decrypted bytes
        return data + inner() if inner is not None else data

    @property
    def tls(self) -> Any:
        """The connection's :class:`~wsgi_hijack.tls.TLSSession` when the
        client speaks TLS (then :meth:`recv` and ``sendall`` encrypt, and
        the reactor takes the session with the fd); None for clear text."""
        return getattr(self._sock, "tls", None)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._pending:
            data, self._pending = self._pending[:bufsize], self._pending[bufsize:]
            return data
        return self._sock.recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if self._pending:
            view = memoryview(buffer).cast("B")
            n = min(len(view), nbytes or len(view), len(self._pending))
            view[:n] = self._pending[:n]
            self._pending = self._pending[n:]
            return n
        return self._sock.recv_into(buffer, nbytes, flags)

    def detach(self) -> int:
        """Give up the socket object and return its fd; call take_pending() first."""
        return self._sock.detach()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def __enter__(self) -> HijackedSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def __repr__(self) -> str:
        return f"<HijackedSocket fd={self._sock.fileno()} pending={len(self._pending)}>"


def encode_head(status: str, headers: list[tuple[str, str]]) -> bytes:
    """The HTTP/1.1 status line and header block, validated like a server would.

    Streams answer with the same head every time, so heads are cached (found
    in the reconnect-storm profile).
    """
    try:
        return _encode_head_cached(status, tuple(headers))
    except TypeError:  # something unhashable: let the checks below say what
        return _encode_head(status, headers)


@functools.lru_cache(maxsize=256)
def _encode_head_cached(status: str, headers: tuple) -> bytes:
    return _encode_head(status, list(headers))


def _encode_head(status: str, headers: list[tuple[str, str]]) -> bytes:
    """The HTTP/1.1 status line and header block, validated like a server would.

    A CR or LF in a name or value would let the app (or whoever fed it the
    value) inject headers or a second response, so it is refused.
    """
    if not isinstance(status, str) or len(status) < 4 or not status[:3].isdigit():
        raise HijackError(f"status must be a str like '200 OK', got {status!r}")
    lines = [f"HTTP/1.1 {status}\r\n"]
    for name, value in headers:
        if not isinstance(name, str) or not isinstance(value, str):
            raise HijackError(f"header names and values must be str: {name!r}: {value!r}")
        if any(c in name for c in "\r\n:") or not name or "\r" in value or "\n" in value:
            raise HijackError(f"invalid header {name!r}: {value!r} (no CR, LF, or ':' in names)")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class _Request:
    """The hijack state of one request, between the middleware and the app."""

    __slots__ = ("environ", "server_start_response", "server", "hijacked",
                 "status", "headers", "partial_callback", "forwarded", "server_write",
                 "refusal", "admitted_by")

    def __init__(self, environ: dict, start_response: StartResponse,
                 server: ServerConnection | None) -> None:
        self.environ = environ
        self.server_start_response = start_response
        self.server = server
        self.hijacked = False
        self.status: str | None = None
        self.headers: list[tuple[str, str]] | None = None
        self.partial_callback: Callable[[HijackedSocket], None] | None = None
        self.forwarded = False
        self.refusal: Any = None
        #: The reactor that admitted this hijack, told when the request ends.
        self.admitted_by: Any = None

    def _admit(self) -> None:
        from .reactor import get_reactor

        reactor = get_reactor()
        refusal = reactor.admit(self.environ.get("REMOTE_ADDR"))
        if refusal is not None:
            self.refusal = refusal
            raise HijackRefused(refusal)
        self.admitted_by = reactor

    # start_response is held back until we know the app did not hijack: a
    # server like pywsgi writes the head by itself once it has a status.
    def start_response(self, status: str, headers: list, exc_info: Any = None):
        if self.forwarded:
            return self.server_start_response(status, headers, exc_info)
        self.status, self.headers = status, headers
        return self._write

    def _write(self, data: bytes) -> None:
        # The app uses the legacy write() callable: it is not hijacking.
        if self.hijacked:
            raise HijackError("write() called after the connection was hijacked")
        self.forward()
        self.server_write(data)

    def forward(self) -> None:
        if not self.forwarded:
            self.forwarded = True
            if self.status is not None:
                self.server_write = self.server_start_response(self.status, self.headers)

    def full_hijack(self) -> HijackedSocket:
        if self.server is None:
            raise HijackError("this server cannot hijack; check environ['wsgi_hijack.hijackable']")
        if self.hijacked:
            raise HijackError("the connection was already hijacked")
        if self.forwarded:
            raise HijackError("the response was already started; hijack before writing")
        self._admit()
        self.hijacked = True
        return _hijacked(self.server, self.environ)

    def partial_hijack(self, callback: Callable[[HijackedSocket], None]) -> list[bytes]:
        if self.server is None:
            raise HijackError("this server cannot hijack; check environ['wsgi_hijack.hijackable']")
        if self.forwarded:
            raise HijackError("partial_hijack() must be called before the app returns")
        if self.hijacked:
            raise HijackError("the connection was already hijacked")
        if not callable(callback):
            raise HijackError(f"partial_hijack needs a callable, got {callback!r}")
        self._admit()
        self.partial_callback = callback
        self.hijacked = True
        return []


class HijackMiddleware:
    """Wrap a WSGI app so that it can hijack its client connections.

    ``app = HijackMiddleware(app)`` is the whole change for a legacy app.
    """

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        server = adapters.detect(environ, start_response)
        request = _Request(environ, start_response, server)
        try:
            return self._handle(environ, start_response, server, request)
        finally:
            if request.admitted_by is not None:
                request.admitted_by.admitted_done()

    def _handle(self, environ: dict, start_response: StartResponse,
                server: ServerConnection | None, request: _Request) -> Iterable[bytes]:
        environ[HIJACKABLE] = server is not None
        environ[HIJACK] = request.full_hijack
        environ[PARTIAL_HIJACK] = request.partial_hijack
        try:
            result = self.app(environ, request.start_response)
        except HijackRefused:
            result = []
        if request.refusal is not None and not request.hijacked:
            _close_quietly(result)
            return _refuse(request, start_response)
        if not request.hijacked:
            request.forward()
            return result
        _close_quietly(result)
        assert server is not None
        if request.partial_callback is not None:
            # start_response may come before or after partial_hijack() (a
            # framework calls it when the view returns), but it must come.
            if request.status is None:
                raise HijackError("partial hijack without start_response(status, headers): "
                                  "there is no head to write")
            head = encode_head(request.status, request.headers or [])
            sock = _hijacked(server, environ)
            try:
                if server.resumed is None:  # a resumed one had its head long ago
                    sock.sendall(head)
            except OSError as exc:
                log.debug("client went away before the response head was written: %s", exc)
                sock.close()
            else:
                request.partial_callback(sock)
        return server.finish(request.status)


def _hijacked(server: ServerConnection, environ: dict) -> HijackedSocket:
    sock, pending = server.take()
    return HijackedSocket(sock, pending, environ.get("REMOTE_ADDR"), request_line(environ),
                          server.resumed)


def request_line(environ: dict) -> str | None:
    """``METHOD /target HTTP/x.y``, as the client sent it (gunicorn's
    ``RAW_URI``), or rebuilt from the path and query; None when it cannot be
    carried (the connection then says goodbye rather than move)."""
    target = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not target:
        target = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
                       safe="/;=,~!$&'()*+@:")
        query = environ.get("QUERY_STRING")
        if query:
            target += "?" + query
    line = f"{environ.get('REQUEST_METHOD', 'GET')} {target} " \
           f"{environ.get('SERVER_PROTOCOL', 'HTTP/1.1')}"
    return line if _REQUEST_LINE.fullmatch(line) else None


def _refuse(request: _Request, start_response: StartResponse) -> list[bytes]:
    refusal = request.refusal
    log.info("hijack refused: %s", refusal.reason)  # counted in the reactor's stats, "refused"
    body = (refusal.reason + "\n").encode()
    # The client goes: its fd is for those still arriving (wsgi_hijack.admission).
    closing = request.server.close_after_response() if request.server is not None else []
    start_response(refusal.status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body))), *closing,
                                    *refusal.headers()])
    return [body]


def _close_quietly(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("error closing the body the app returned with its hijack")


def full_hijack(environ: dict) -> HijackedSocket:
    """Take the client connection now; see ``wsgi_hijack.hijack`` in the environ."""
    try:
        return environ[HIJACK]()
    except KeyError:
        raise HijackError("no hijack in this environ: wrap the app in HijackMiddleware") from None


def partial_hijack(environ: dict, callback: Callable[[HijackedSocket], None]) -> list[bytes]:
    """Return this from the app after start_response(); callback gets the socket."""
    try:
        return environ[PARTIAL_HIJACK](callback)
    except KeyError:
        raise HijackError("no hijack in this environ: wrap the app in HijackMiddleware") from None


def is_hijackable(environ: dict) -> bool:
    return bool(environ.get(HIJACKABLE))
