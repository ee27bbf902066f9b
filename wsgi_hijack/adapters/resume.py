"""A connection moved here from another worker, run through the app again.

When a worker hands its held connections to its successor
(:mod:`wsgi_hijack.handoff`), the successor calls the app once per
connection with an environ rebuilt from the request line, and the moved
state under :data:`RESUME`. The app's route runs in the new code and
hijacks as it always does; this adapter gives it the moved socket, and the
middleware then writes no head (the client has had it) and the reactor
resumes the connection from its state (:meth:`Reactor.hold`).
"""

from __future__ import annotations

import socket
from typing import Any

from .base import ServerConnection

#: The environ key of a resumed request: the moved connection's state.
RESUME = "wsgi_hijack.resume"
#: The environ key of the moved socket itself.
RESUME_SOCKET = "wsgi_hijack.resume_socket"


class ResumedConnection(ServerConnection):
    name = "resume"

    def __init__(self, environ: dict) -> None:
        self.resumed = environ[RESUME]
        self._sock: socket.socket | None = environ[RESUME_SOCKET]

    @classmethod
    def detect(cls, environ: dict, start_response: Any) -> ResumedConnection | None:
        return cls(environ) if RESUME in environ else None

    def take(self) -> tuple[socket.socket, bytes]:
        sock, self._sock = self._sock, None
        if sock is None:
            raise RuntimeError("the resumed connection was already taken")
        # What the client had sent and was not yet parsed is parsed first.
        return sock, self.resumed.input

    def finish(self, status: str | None) -> Any:
        return []
