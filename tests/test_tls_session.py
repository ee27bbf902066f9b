"""Issue 21: :class:`wsgi_hijack.tls.TLSSession`, sans-IO, in-process.

The server side is the session with the TLS settings our gevent worker
builds from gunicorn's (:func:`wsgi_hijack.workers.ggevent.tls_context`:
``certfile``/``keyfile``, no renegotiation); the client is an
``ssl.SSLObject`` over memory BIOs. Bytes go between the two by hand, so
each test sees exactly what the session gives the wire: the handshake, a
round trip both ways, a large write, ``close_notify`` both ways, garbage,
and clients of an old protocol version.
"""

from __future__ import annotations

import logging
import os
import ssl
import warnings
from pathlib import Path

import pytest
from gunicorn.config import Config

from harness.tls import _make_with_cryptography
from wsgi_hijack.tls import TLSError, TLSSession
from wsgi_hijack.workers.ggevent import tls_context

pytestmark = pytest.mark.unit

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
# TLS record content types (RFC 8446, section 5.1) and alerts (section 6).
ALERT, HANDSHAKE, APPLICATION_DATA = 0x15, 0x16, 0x17
FATAL, PROTOCOL_VERSION = 2, 70


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """What the worker serves with, from gunicorn's settings. The certificate
    is made with the ``cryptography`` package (a unit test starts no
    ``openssl`` process)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    _make_with_cryptography(cert, key)
    cfg = Config()
    cfg.set("certfile", str(cert))
    cfg.set("keyfile", str(key))
    context = tls_context(cfg, logging.getLogger("test_tls_session"))
    context.cafile = str(cert)  # (for the clients below)
    return context


class Client:
    """A TLS client over memory BIOs; ``to_server()`` is what it wrote."""

    def __init__(self, cafile: str | Path, version: ssl.TLSVersion | None = None,
                 ciphers: str | None = None) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(cafile))
        if ciphers is not None:
            context.set_ciphers(ciphers)
        if version is not None:
            with warnings.catch_warnings():  # TLSv1 and TLSv1_1 are deprecated names
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = context.maximum_version = version
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def to_server(self) -> bytes:
        return self.outgoing.read()

    def start(self) -> bytes:
        """The client's hello."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.to_server()

    def feed(self, wire: bytes) -> None:
        self.incoming.write(wire)

    def read_all(self) -> bytes:
        """All the plain text fed so far; b"" at the server's close_notify."""
        got = b""
        while True:
            try:
                data = self.tls.read(1 << 20)
            except ssl.SSLWantReadError:
                return got
            if not data:
                return got
            got += data


def connect(server_context: ssl.SSLContext, version: ssl.TLSVersion | None = None,
            ) -> tuple[Client, TLSSession]:
    """A finished handshake (one round trip in TLS 1.3, two in 1.2): the
    client and the server's session."""
    client = Client(server_context.cafile, version)
    session = TLSSession(server_context)
    wire, server_done, client_done = client.start(), False, False
    for _ in range(4):
        server_done, out = session.handshake(wire)
        client.feed(out)  # with TLS 1.3's session tickets, after the handshake
        if not client_done:
            try:
                client.tls.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        wire = client.to_server()
        if server_done and client_done and not wire:
            return client, session
    raise AssertionError(f"no handshake: server {server_done}, client {client_done}")


def records(wire: bytes) -> list[tuple[int, bytes]]:
    """``(content type, body)`` of each record; the bytes must be whole records."""
    found = []
    while wire:
        assert len(wire) >= 5, wire
        length = int.from_bytes(wire[3:5], "big")
        assert len(wire) >= 5 + length, wire
        found.append((wire[0], wire[5:5 + length]))
        wire = wire[5 + length:]
    return found


@pytest.mark.parametrize("name", VERSIONS)
def test_handshake_then_each_way_round_trip(server_context, name):
    client, session = connect(server_context, VERSIONS[name])
    assert session.version == client.tls.version() == name
    # Client to server: the plain text, and nothing TLS must answer.
    client.tls.write(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
    plain, out = session.receive(client.to_server())
    assert (plain, out) == (b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n", b"")
    assert not session.peer_closed
    # Server to client: records, none of whose plain text is on the wire.
    wire = session.encrypt(b"HTTP/1.1 200 OK\r\n\r\nretry: 2000\n\n")
    assert b"retry" not in wire and b"HTTP" not in wire
    assert {kind for kind, _ in records(wire)} == {APPLICATION_DATA}
    client.feed(wire)
    assert client.read_all() == b"HTTP/1.1 200 OK\r\n\r\nretry: 2000\n\n"
    assert session.encrypt(b"") == b""


def test_plain_text_that_came_with_the_handshake_is_read_with_receive_of_nothing(
        server_context):
    """The client's Finished and its request head in one read (what the
    reactor gets with the hijacked connection): ``receive(b"")`` returns it."""
    client = Client(server_context.cafile)
    session = TLSSession(server_context)
    client.feed(session.handshake(client.start())[1])
    client.tls.do_handshake()
    client.tls.write(b"GET / HTTP/1.1\r\n\r\n")
    done, out = session.handshake(client.to_server())
    assert done
    assert session.receive(b"") == (b"GET / HTTP/1.1\r\n\r\n", b"")


@pytest.mark.parametrize("name", VERSIONS)
def test_a_large_write_arrives_whole(server_context, name):
    client, session = connect(server_context, VERSIONS[name])
    payload = os.urandom(1 << 20)
    wire = session.encrypt(payload)
    assert len(records(wire)) >= 64  # at most 16 KiB of plain text per record
    client.feed(wire)
    assert client.read_all() == payload


@pytest.mark.parametrize("name", VERSIONS)
def test_the_clients_close_notify_is_answered_with_ours(server_context, name):
    client, session = connect(server_context, VERSIONS[name])
    client.tls.write(b"last words")
    with pytest.raises(ssl.SSLWantReadError):  # sent ours; waiting for the server's
        client.tls.unwrap()
    plain, out = session.receive(client.to_server())
    assert plain == b"last words"
    assert session.peer_closed
    assert out == b""  # the server may still answer (TLS 1.3 closes each way apart)
    out = session.close()
    assert out, "the server's close_notify"
    client.feed(out)
    client.tls.unwrap()  # both sides closed: it returns
    assert session.close() == b""  # already said


@pytest.mark.parametrize("name", VERSIONS)
def test_our_close_notify_once(server_context, name):
    client, session = connect(server_context, VERSIONS[name])
    client.feed(session.encrypt(b"goodbye"))
    out = session.close()
    assert out
    assert session.close() == b"" and session.close() == b""  # idempotent
    client.feed(out)
    assert client.read_all() == b"goodbye"
    assert client.tls.read(100) == b""  # _ssl's answer to a close_notify


def test_close_before_a_handshake_says_nothing(server_context):
    session = TLSSession(server_context)
    assert session.close() == b""
    assert session.close() == b""


GARBAGE = {
    "not TLS": b"\x00garbage\r\n" * 4,
    "clear-text HTTP": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "a record that does not decrypt": b"\x17\x03\x03\x00\x20" + bytes(range(32)),
    "an alert in clear": bytes([ALERT, 3, 3, 0, 2, FATAL, 40]),
}


@pytest.mark.parametrize("name", VERSIONS)
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_after_the_handshake_raises_with_an_alert_to_send(server_context, garbage,
                                                                  name):
    client, session = connect(server_context, VERSIONS[name])
    with pytest.raises(TLSError) as raised:
        session.receive(GARBAGE[garbage])
    goodbye = raised.value.goodbye
    assert goodbye, "an alert for the peer"
    # TLS 1.2 shows an alert record's type; TLS 1.3 encrypts it as data.
    expected = ALERT if name == "TLSv1.2" else APPLICATION_DATA
    assert [kind for kind, _ in records(goodbye)] == [expected]
    client.feed(goodbye)
    with pytest.raises(ssl.SSLError, match="ALERT"):
        client.read_all()


@pytest.mark.parametrize("hello", ["not TLS", "clear-text HTTP"])
def test_garbage_instead_of_a_hello_raises(server_context, hello):
    session = TLSSession(server_context)
    with pytest.raises(TLSError, match="TLS handshake failed"):
        session.handshake(GARBAGE[hello])


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1],
                         ids=["TLSv1.0", "TLSv1.1"])
def test_an_old_protocol_version_is_refused_with_an_alert(server_context, version):
    """gunicorn's context (Python's default) takes TLS 1.2 at least: the
    session refuses an older hello, with the alert that says so."""
    client = Client(server_context.cafile, version, ciphers="DEFAULT:@SECLEVEL=0")
    session = TLSSession(server_context)
    with pytest.raises(TLSError, match="UNSUPPORTED_PROTOCOL") as raised:
        session.handshake(client.start())
    (kind, body), = records(raised.value.goodbye)
    assert (kind, body) == (ALERT, bytes([FATAL, PROTOCOL_VERSION]))
    client.feed(raised.value.goodbye)
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
        client.tls.do_handshake()
