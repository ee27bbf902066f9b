"""What every server adapter does: find the connection, take it, step back.

Each server keeps the client socket, the bytes it read ahead, and its own
idea of what happens after the app returns (a keep-alive loop, an error
page, a close) in different places. An adapter knows one server's places.
Nothing server-specific goes past this package: the middleware and the
reactor see only a socket, its pending bytes, and the value to return.
"""

from __future__ import annotations

import socket
from typing import Any


class ServerConnection:
    """One request's client connection on one kind of server."""

    #: Short name for logs and the compatibility matrix.
    name = "server"

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
