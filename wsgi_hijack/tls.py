"""TLS that the reactor can hold: one connection's TLS state, apart from its fd.

A server's TLS socket (``ssl.SSLSocket``, gevent's ``SSLSocket``) keeps its
state inside the socket object, bound to the fd; taking the fd from under it
leaves a connection the client believes encrypted, on which the reactor
would write clear text. So where the reactor holds TLS connections (our
gevent worker, :mod:`wsgi_hijack.workers.ggevent`), the handshake is done
here, with an :class:`ssl.SSLObject` over two memory BIOs, and that state
goes with the connection to the reactor:

- :class:`TLSSession` is the state, sans-IO: bytes from the wire go in,
  plain text and bytes for the wire come out. The reactor keeps one per
  TLS connection and encrypts each write for it.
- :class:`TLSSocket` is what the server reads its requests through, a
  gevent-cooperative socket over a :class:`TLSSession`; when the app
  hijacks, the session leaves with the fd (:meth:`TLSSocket.take`).

What the session's memory costs per held connection, and how TLS at
gunicorn compares with TLS at a proxy: benchmarks/results/tls.md.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any

#: The most a read from the wire takes at once (one TLS record is 16 KiB
#: plus its overhead; the reactor reads 64 KiB).
_WIRE_READ = 65536
#: The most plain text one ``SSLObject.read`` returns.
_PLAIN_READ = 65536


class TLSError(ConnectionError):
    """The peer broke the TLS protocol (garbage, a fatal alert, a refused
    renegotiation); ``goodbye`` is the alert to send it, if any, before closing."""

    def __init__(self, message: str, goodbye: bytes = b"") -> None:
        super().__init__(message)
        self.goodbye = goodbye


class TLSSession:
    """One connection's TLS state over memory BIOs: given bytes, produce bytes.

    Nothing here touches a socket, so the reactor decides when to write and
    what to do when the kernel does not take it all, as for clear text.
    """

    __slots__ = ("_obj", "_incoming", "_outgoing", "peer_closed", "_closed")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        #: The peer sent ``close_notify``: it will read nothing more.
        self.peer_closed = False
        self._closed = False  # our close_notify is out

    def handshake(self, wire: bytes = b"") -> tuple[bool, bytes]:
        """Feed the handshake; returns ``(done, bytes for the wire)``.

        Raises :class:`TLSError` when the peer's hello is refused (an old
        protocol version, no shared cipher, not TLS at all).
        """
        if wire:
            self._incoming.write(wire)
        try:
            self._obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake failed: {exc.reason or exc}",
                           self._outgoing.read()) from None
        return done, self._outgoing.read()

    def encrypt(self, plain: bytes) -> bytes:
        """The records carrying ``plain``, for the wire (b"" for b"")."""
        if plain:
            self._obj.write(plain)  # a memory BIO never blocks: all of it, in records
        return self._outgoing.read()

    def receive(self, wire: bytes) -> tuple[bytes, bytes]:
        """Feed bytes from the wire; returns ``(plain text, bytes for the wire)``.

        The second is what the session must answer on its own (a key
        update). After the peer's ``close_notify`` (:attr:`peer_closed`) it
        reads nothing more, but may still be written to (TLS 1.3 closes each
        direction apart): the owner sends :meth:`close` when its response is
        done. With b"" it
        returns the plain text already decrypted and not yet read (what
        arrived with the request head). Raises :class:`TLSError` on bytes
        that are not TLS, a fatal alert, or a renegotiation.
        """
        if wire:
            self._incoming.write(wire)
        chunks = []
        obj = self._obj
        try:
            while True:
                data = obj.read(_PLAIN_READ)
                if not data:  # _ssl's read gives b"" for the peer's close_notify
                    raise ssl.SSLZeroReturnError
                chunks.append(data)
        except ssl.SSLWantReadError:  # all there is, for now
            pass
        except ssl.SSLZeroReturnError:  # close_notify: nothing more comes
            self.peer_closed = True
        except ssl.SSLError as exc:
            raise TLSError(f"TLS error from the peer: {exc.reason or exc}",
                           self._outgoing.read()) from None
        return b"".join(chunks), self._outgoing.read()

    def close(self) -> bytes:
        """Our ``close_notify``, for the wire, once: the clean end of the
        stream (a client that sees it knows nothing was cut off)."""
        if self._closed:
            return b""
        self._closed = True
        try:
            self._obj.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
            pass  # sent ours; not waiting for the peer's
        except (ssl.SSLError, ValueError):
            return b""  # broken or never established: nothing to say
        return self._outgoing.read()

    @property
    def version(self) -> str | None:
        return self._obj.version()

    def selected_alpn_protocol(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._obj.getpeercert(binary_form)


class TLSSocket:
    """A server-side TLS connection that a WSGI server reads and writes like
    a socket, cooperatively (gevent), and that the reactor can take over.

    ``raw`` is the plain gevent socket; every method the server uses that is
    not about the bytes (``getpeername``, ``setblocking``, ``fileno``...) is
    the raw socket's own.
    """

    __slots__ = ("raw", "tls", "_plain", "_taken")

    def __init__(self, raw: Any, session: TLSSession) -> None:
        self.raw = raw
        #: The connection's TLS state; it leaves with the fd (:meth:`take`).
        self.tls = session
        self._plain = b""  # decrypted, not yet returned by recv()
        self._taken = False

    @classmethod
    def accept(cls, raw: Any, context: ssl.SSLContext, deadline: float) -> TLSSocket:
        """Do the server's handshake on ``raw`` by ``deadline`` (monotonic).

        The deadline is the request head's: a client that opens a TLS
        connection and never finishes its handshake costs no more than one
        that never sends its head. Raises :class:`TLSError`, ``TimeoutError``
        or ``OSError``; the caller closes ``raw``.
        """
        session = TLSSession(context)
        wire = b""
        while True:
            try:
                done, out = session.handshake(wire)
            except TLSError as exc:  # the alert says why (an old version, no shared cipher)
                if exc.goodbye:
                    raw.sendall(exc.goodbye)
                raise
            if out:
                raw.sendall(out)
            if done:
                tls = cls(raw, session)
                # What came in the same read as the client's Finished (a client
                # often sends its request with it) is already in the session.
                tls._plain = tls._receive(b"")
                return tls
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("TLS handshake not finished before the head deadline")
            raw.settimeout(left)
            try:
                wire = raw.recv(_WIRE_READ)
            finally:
                raw.settimeout(None)
            if not wire:
                raise ConnectionResetError("the client closed during the TLS handshake")

    def wait_for(self, ready: Callable[[bytes], bool], deadline: float) -> bool:
        """Read until ``ready(plain text so far)`` or ``deadline`` (monotonic);
        False when the deadline passed or the client left first. What was
        read stays for :meth:`recv`."""
        while not ready(self._plain):
            left = deadline - time.monotonic()
            if left <= 0 or self.tls.peer_closed:
                return False
            self.raw.settimeout(left)
            try:
                wire = self.raw.recv(_WIRE_READ)
            except (TimeoutError, OSError):
                return False
            finally:
                self.raw.settimeout(None)
            if not wire:
                return False
            self._plain += self._receive(wire)
        return True

    # -- bytes ---------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        while not self._plain:
            if self.tls.peer_closed:
                return b""
            wire = self.raw.recv(_WIRE_READ)
            if not wire:
                return b""  # the peer left without close_notify: EOF all the same
            self._plain = self._receive(wire)
        data, self._plain = self._plain[:bufsize], self._plain[bufsize:]
        return data

    def _receive(self, wire: bytes) -> bytes:
        """The plain text in ``wire``; TLS's own answers are sent. On a
        :class:`TLSError` the peer gets the alert, and the caller closes."""
        try:
            plain, out = self.tls.receive(wire)
        except TLSError as exc:
            self._send_wire(exc.goodbye)
            raise
        self._send_wire(out)
        return plain

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(min(len(view), nbytes or len(view)))
        view[:len(data)] = data
        return len(data)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self.raw.sendall(self.tls.encrypt(bytes(data)))

    def send(self, data: bytes, flags: int = 0) -> int:
        self.sendall(data)
        return len(data)

    def _send_wire(self, wire: bytes) -> None:
        if wire:
            try:
                self.raw.sendall(wire)
            except OSError:
                pass

    def take_pending(self) -> bytes:
        """Plain text decrypted and not yet read (it goes first to whoever
        takes the connection over)."""
        data, self._plain = self._plain, b""
        return data

    # -- handing over --------------------------------------------------------------

    def take(self) -> TLSSocket:
        """Move the connection (fd and TLS state) to a new object that only
        the caller holds. This one becomes an empty shell: the server's later
        ``close()`` on it neither writes (no ``close_notify`` on a stream
        that goes on) nor closes the fd."""
        fd = self.raw.detach()
        self._taken = True
        taken = TLSSocket(type(self.raw)(fileno=fd), self.tls)
        taken._plain = self.take_pending()
        return taken

    def detach(self) -> int:
        """The raw fd; the TLS state stays in :attr:`tls` (the reactor takes both)."""
        self._taken = True
        return self.raw.detach()

    def close(self) -> None:
        if self._taken:
            return
        self._taken = True
        self._send_wire(self.tls.close())
        self.raw.close()

    def shutdown(self, how: int) -> None:
        if not self._taken:
            self._send_wire(self.tls.close())
        self.raw.shutdown(how)

    def makefile(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError("TLSSocket has no makefile(); read with recv()")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def __repr__(self) -> str:
        return f"<TLSSocket {self.tls.version} raw={self.raw!r}>"
