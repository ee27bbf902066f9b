"""What every server adapter does: find the connection, take it, step back.

Each server keeps the client socket, the bytes it read ahead, and its own
idea of what happens after the app returns (a keep-alive loop, an error
page, a close) in different places. An adapter knows one server's places.
Nothing server-specific goes past this package: the middleware and the
reactor see only a socket, its pending bytes, and the value to return.

Two helpers are shared by the adapters: :func:`drain_buffered` (what a
buffered reader already holds, without waiting) and :func:`swap_out` (how a
server whose socket object we cannot empty lets go of the connection).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

log = logging.getLogger("wsgi_hijack")

#: The environ key where an adapter that recognised the server, but cannot
#: take this connection, says why (read by the 501 answers of the stream
#: helpers, so that the client learns the fix, not only the log).
WHY_NOT = "wsgi_hijack.why_not"
_said: set[str] = set()


def decline(environ: dict, reason: str) -> None:
    """Record why this request cannot be hijacked on this server; logged once
    per reason and process. Returns None, what ``detect`` returns then."""
    environ[WHY_NOT] = reason
    if reason not in _said:
        _said.add(reason)
        log.warning("wsgi_hijack: connections cannot be hijacked here: %s", reason)


def decline_tls(environ: dict, server: str) -> None:
    """Decline a TLS connection on ``server``, a server that keeps the
    connection's TLS state in its own socket object (or in C): the fd alone
    would carry the reactor's writes in clear text on a connection the client
    believes encrypted. The reason names the two ways to get TLS streams."""
    decline(environ, f"this is a TLS connection on {server}, which cannot hand TLS to the "
            "reactor: run gunicorn with -k wsgi_hijack.workers.ggevent.GeventWorker "
            "(-c python:wsgi_hijack.gunicorn_conf), which holds TLS streams, or terminate "
            "TLS at a proxy in front (docs/tls.rst)")


class ServerConnection:
    """One request's client connection on one kind of server."""

    #: Short name for logs and the compatibility matrix.
    name = "server"
    #: The moved connection's state when this request resumes one
    #: (:mod:`.resume`); None for a request from a client.
    resumed: Any = None

    def take(self) -> tuple[socket.socket, bytes]:
        """Detach the connection from the server.

        Returns a socket that the server no longer knows about (it will not
        read, write, or close it), and the bytes the server had read past the
        request head. Called at most once per request.
        """
        raise NotImplementedError

    def finish(self, status: str | None) -> Any:
        """What the middleware returns to the server after a hijack.

        It must end the server's handling of this connection without writing
        a byte, without logging an error, and free its slot for others.
        ``status`` is the hijacked response's status, for the access log.
        """
        raise NotImplementedError

    def close_after_response(self) -> list[tuple[str, str]]:
        """End the connection after this (ordinary) response, with no keep-alive;
        returns the headers the response needs for that.

        For refusals: a client refused because the worker is full must not
        keep an fd in keep-alive that an arriving client needs. Servers that
        read the app's headers (pywsgi, Werkzeug, uWSGI) act on
        ``Connection: close``; one that drops the app's hop-by-hop headers
        (gunicorn) is told directly instead.
        """
        return [("Connection", "close")]


def drain_buffered(rfile: Any, sock: Any) -> bytes:
    """The bytes a buffered reader over ``sock`` holds, taken out of it.

    ``sock`` is made non-blocking first: ``peek()`` then returns what the
    reader buffered (or what one read finds at once) and never waits, and
    ``read()`` takes exactly that much out of the buffer.
    """
    sock.settimeout(0.0)
    pending = b""
    try:
        while True:
            chunk = rfile.peek()
            if not chunk:
                break
            pending += rfile.read(len(chunk))
    except (BlockingIOError, ValueError, OSError, TypeError):
        pass  # TypeError: a raw read that found nothing returns None on some readers
    return pending


def swap_out(sock: socket.socket, sink: bool = False) -> socket.socket:
    """Move the connection behind ``sock`` to a new plain socket that only we
    hold, and leave at ``sock``'s fd number a socket whose peer has gone.

    For servers that keep using their socket object after the app returns
    (``setblocking``, ``shutdown``, a drain loop, ``close``): an object whose
    fd was ``detach()``-ed makes some of those raise ``EBADF`` or
    ``ValueError``, which they count or log as errors. After the swap every
    step works on the stand-in, which looks like a client that went away:
    reads give EOF, ``shutdown`` and ``close`` touch only the stand-in, and
    the real connection is never shut down. ``dup2`` replaces the fd in one
    step, so the server's fd number is never free for another thread's open.

    With ``sink``, the stand-in is ``/dev/null`` instead: writes succeed and
    go nowhere, reads give EOF (for a server that writes a head we cannot
    stop, and would log a failed write as an error).
    """
    fd = sock.fileno()
    ours = os.dup(fd)  # non-inheritable, like every fd Python makes
    try:
        if sink:
            null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.dup2(null, fd, inheritable=False)
            finally:
                os.close(null)
        else:
            stand_in, peer = socket.socketpair()
            try:
                os.dup2(stand_in.fileno(), fd, inheritable=False)
            finally:
                stand_in.close()
                peer.close()  # the stand-in's peer is gone: EOF for whoever reads it
    except BaseException:
        os.close(ours)
        raise
    taken = socket.socket(fileno=ours)
    taken.setblocking(True)
    return taken
