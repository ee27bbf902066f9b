"""TLS for tests: a throw-away certificate, and a client that keeps the raw wire.

Issue 21: a stream on a TLS connection must never put plaintext on the wire.
An ordinary TLS client cannot show that: ``ssl.SSLSocket`` decrypts what it
can and throws away what it cannot ("wrong version number"), and by then the
plaintext bytes have crossed the network. :class:`WireTLSClient` runs TLS
over memory BIOs on a plain TCP socket, so every byte the server sent is kept
as it arrived (:attr:`WireTLSClient.wire`, and the part after the handshake
in :attr:`WireTLSClient.wire_after_handshake`), and
:func:`assert_no_plaintext` looks for the response's plaintext in it.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.wire import HOST, Closed

if TYPE_CHECKING:
    from harness.servers import Server

_READ = 65536


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A new self-signed certificate and its key, ``(cert.pem, key.pem)`` in
    ``directory``: EC P-256, CN=localhost, SAN DNS:localhost and IP:127.0.0.1.

    Made afresh each call (an EC key takes milliseconds; nothing cached that a
    test could find expired or shared). The ``openssl`` command when present
    (Debian has it); else the ``cryptography`` package. The certificate is
    its own CA (``CA:TRUE``), so clients trust it with ``cafile=cert``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl:
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "30", "-subj", "/CN=localhost", "-keyout", str(key),
             "-out", str(cert), "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
            check=True, capture_output=True)
    else:
        _make_with_cryptography(cert, key)
    return cert, key


def _make_with_cryptography(cert: Path, key: Path) -> None:
    """:func:`make_certificate` without the ``openssl`` command."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()),
                       critical=False)
        .sign(private, hashes.SHA256()))
    key.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def assert_no_plaintext(wire: bytes | bytearray, markers: Iterable[bytes]) -> None:
    """Fail if any of ``markers`` occurs in ``wire``, the raw bytes received
    on a TLS connection: the message names each marker found, its offset, and
    the bytes around it, which is what a reader of the failure needs first."""
    found = []
    raw = bytes(wire)
    for marker in markers:
        at = raw.find(marker)
        if at >= 0:
            context = raw[max(0, at - 16):at + len(marker) + 48]
            found.append(f"{marker!r} at offset {at}: ...{context!r}...")
    assert not found, (f"plaintext on a TLS connection ({len(raw)} raw bytes):\n  "
                       + "\n  ".join(found))


def answers_https(server: Server) -> bool:
    """Ready when a request over TLS gets a status line (the readiness check
    of :func:`harness.servers.start` with ``tls``). A TCP connect would not
    do: a gunicorn master accepts before its worker runs, and a connection
    closed in the middle of a handshake is an error in some servers' logs.
    The answer is read to its end and closed with a close_notify, so the
    server sees an ordinary client."""
    with WireTLSClient(HOST, server.port, verify=False, timeout=2) as client:
        client.handshake()
        client.send(b"GET /wsgi-hijack-ready HTTP/1.0\r\n\r\n")
        answered = client.read_until(b"\r\n").startswith(b"HTTP/")
        try:
            client.read_to_close(timeout=2)
            client.send_close_notify()
        except OSError:  # the server closed first, or an app that streams on every path
            pass
        return answered


class WireTLSClient:
    """A TLS client (``ssl.SSLObject`` over ``ssl.MemoryBIO``) over a plain TCP
    socket, which records every raw byte the server sent.

    ``verify=False`` accepts any certificate (for tests about the server's
    writes, not its identity). ``minimum_version``/``maximum_version`` (an
    ``ssl.TLSVersion``) and ``ciphers`` (an OpenSSL cipher string, e.g.
    ``"DEFAULT:@SECLEVEL=0"`` to offer TLS 1.0) shape the client's hello, for
    tests of what the server refuses. A protocol error from the server (such
    as plaintext where a record should be) raises ``ssl.SSLError`` from
    :meth:`recv`; :attr:`wire` then still holds what arrived.
    """

    def __init__(self, host: str, port: int, cafile: str | Path | None = None,
                 verify: bool = True, minimum_version: ssl.TLSVersion | None = None,
                 maximum_version: ssl.TLSVersion | None = None, ciphers: str | None = None,
                 timeout: float = 10) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if verify:
            context.load_verify_locations(cafile=str(cafile) if cafile else None)
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if ciphers is not None:
            context.set_ciphers(ciphers)
        if minimum_version is not None:
            context.minimum_version = minimum_version
        if maximum_version is not None:
            context.maximum_version = maximum_version
        context.set_alpn_protocols(["http/1.1"])
        self.timeout = timeout
        #: Every byte received from the server, as it arrived.
        self.wire = bytearray()
        #: What was received after the handshake completed: no plaintext may be here.
        self.wire_after_handshake = bytearray()
        #: True once the server's close_notify was read.
        self.closed_cleanly = False
        self.handshake_done = False
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        #: The TLS state, for ``version()``, ``cipher()``, ``getpeercert()``.
        self.tls = context.wrap_bio(self._incoming, self._outgoing,
                                    server_hostname=host if verify else None)
        self._unread = bytearray()  # plaintext read past a read_until marker
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def __enter__(self) -> WireTLSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _flush(self) -> None:
        """Send what the TLS layer wrote to its outgoing BIO."""
        data = self._outgoing.read()
        if data:
            self.sock.sendall(data)

    def _receive(self, timeout: float) -> bool:
        """One read from the socket into the TLS layer; False at EOF."""
        self.sock.settimeout(max(timeout, 0.001))
        data = self.sock.recv(_READ)
        self.wire += data
        if self.handshake_done:
            self.wire_after_handshake += data
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    def handshake(self) -> None:
        """Complete the TLS handshake (``ssl.SSLError`` if the server refuses it)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._receive(deadline - time.monotonic()):
                    raise Closed("the server closed the connection in the handshake") from None
        self._flush()
        self.handshake_done = True
        # Bytes of the last read that the handshake did not consume came after it.
        if self._incoming.pending:
            self.wire_after_handshake += self.wire[-self._incoming.pending:]

    def send(self, plaintext: bytes) -> None:
        """Encrypt and send ``plaintext``."""
        self.tls.write(plaintext)
        self._flush()

    def recv(self, timeout: float | None = None) -> bytes:
        """The next plaintext from the server; b"" on close_notify (then
        :attr:`closed_cleanly`) or on EOF. ``TimeoutError`` if nothing came."""
        if self._unread:
            data = bytes(self._unread)
            self._unread.clear()
            return data
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                data = self.tls.read(_READ)
                self._flush()  # a read may answer (a key update, an alert)
                if not data:  # _ssl returns b"" for a close_notify, raises for the rest
                    self.closed_cleanly = True
                return data
            except ssl.SSLWantReadError:
                self._flush()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no TLS record from the server") from None
                if not self._receive(remaining):
                    return b""
            except ssl.SSLZeroReturnError:  # close_notify, as some versions report it
                self.closed_cleanly = True
                return b""
            except ssl.SSLEOFError:  # the socket's EOF without a close_notify
                return b""

    def read_until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Plaintext up to and including ``marker``; what came after it is
        kept for the next read. ``Closed`` if the server ends the connection
        first, ``TimeoutError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = bytearray()
        while marker not in got:
            data = self.recv(deadline - time.monotonic())
            if not data:
                raise Closed(f"connection closed before {marker!r}; got {bytes(got)!r}")
            got += data
        end = got.index(marker) + len(marker)
        self._unread[:0] = got[end:]
        return bytes(got[:end])

    def read_exactly(self, size: int, timeout: float | None = None) -> bytes:
        """``size`` bytes of plaintext (a body of known length on a connection
        the server keeps open); what came after them is kept for the next
        read. ``Closed`` if the server ends the connection first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = bytearray()
        while len(got) < size:
            data = self.recv(deadline - time.monotonic())
            if not data:
                raise Closed(f"connection closed after {len(got)} of {size} bytes")
            got += data
        self._unread[:0] = got[size:]
        return bytes(got[:size])

    def read_to_close(self, timeout: float | None = None) -> bytes:
        """All plaintext until the server ends the connection (a response
        with ``Connection: close``). ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        got = bytearray()
        while data := self.recv(deadline - time.monotonic()):
            got += data
        return bytes(got)

    def send_close_notify(self) -> None:
        """Send our close_notify (the connection stays open for the server's)."""
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the server's close_notify is read by recv()
        self._flush()

    def send_raw(self, data: bytes) -> None:
        """Write ``data`` on the socket outside TLS (garbage, a plain HTTP request)."""
        self.sock.sendall(data)

    def close(self) -> None:
        """Close the TCP socket, without a close_notify."""
        self.sock.close()
