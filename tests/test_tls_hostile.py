"""Issue 21, bad inputs on a TLS port: what each bad client gets, that none
of the response is in clear on its wire, and that it costs no other client
its data.

One real gunicorn for the module: the package's gevent worker
(``gunicorn.conf.py``) with ``--certfile``/``--keyfile`` (a throw-away
certificate), heartbeat 0.5 s, ``WSGI_HIJACK_HEAD_TIMEOUT=2`` (the worker
warns that this is short: the test wants the deadline to pass), serving
tests/apps.py (the demo's routes and ``/_stats``, asked over TLS).

In each test a well-behaved TLS SSE client (:class:`Witness`) is held on
the same server while the bad input happens; afterwards it gets a message
published after it, then a heartbeat, and its raw wire holds none of its
stream in clear. The bad clients' raw bytes are read with
:class:`harness.tls.WireTLSClient`, a plain socket, or, for ``openssl
s_client``, a recording TCP proxy (:class:`RecordingProxy`).

Nothing is timed: each wait is for content, with a generous timeout.
"""

from __future__ import annotations

import itertools
import select
import socket
import ssl
import subprocess
import threading
import warnings
from pathlib import Path

import pytest

from harness import servers
from harness.clients import published_id, read_pipe_until, stats, wait_for, wait_held
from harness.tls import WireTLSClient, assert_no_plaintext, make_certificate
from harness.wire import HOST, parse_head

from .test_tls_session import (
    ALERT,
    APPLICATION_DATA,
    FATAL,
    GARBAGE,
    HANDSHAKE,
    PROTOCOL_VERSION,
    VERSIONS,
    records,
)

HEARTBEAT = 0.5
HEAD_TIMEOUT = 2
WAIT = 20.0  # the longest any one awaited thing may take
CHANGE_CIPHER_SPEC = 0x14
RETRY = b"retry: 2000\n\n"
SSE_PING = b": ping\n\n"
# What an SSE stream and the server's own answers carry in clear; none of it
# may be on a TLS connection's wire after the handshake.
PLAINTEXT = [b"HTTP/1.1", b"retry:", b": ping", b"data:", b"text/event-stream",
             b"Request Timeout", b"Bad Request"]
_names = itertools.count()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def context(certificate) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, certificate) -> servers.Server:
    srv = servers.start("gunicorn", tmp_path_factory.mktemp("gunicorn-tls-hostile"),
                        app="tests.apps:app", heartbeat=HEARTBEAT, tls=certificate,
                        env={"WSGI_HIJACK_HEAD_TIMEOUT": str(HEAD_TIMEOUT)})
    try:
        log = srv.log()
        assert "Using worker: wsgi_hijack.workers.ggevent.GeventWorker" in log, log
        assert f"Listening at: https://{HOST}:{srv.port}" in log, log
        # The warning a 2 s head deadline earns, and nothing worse.
        assert f"WSGI_HIJACK_HEAD_TIMEOUT: a request head must arrive within {HEAD_TIMEOUT} s" \
            in log, log
        yield srv
    finally:
        srv.stop()


def sse_request(channel: str) -> bytes:
    return f"GET /events?channel={channel} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()


def open_stream(server: servers.Server, cafile: Path, channel: str,
                version: ssl.TLSVersion | None = None) -> WireTLSClient:
    """An SSE stream over TLS, read up to its ``retry:`` hint (held by then)."""
    client = WireTLSClient(HOST, server.port, cafile=cafile, maximum_version=version,
                           timeout=WAIT)
    client.handshake()
    client.send(sse_request(channel))
    head = client.read_until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    client.read_until(RETRY)
    return client


class Witness:
    """A well-behaved TLS SSE client held beside the bad input."""

    def __init__(self, server: servers.Server, certificate: tuple[Path, Path],
                 context: ssl.SSLContext) -> None:
        self.server, self.context = server, context
        self.channel = f"witness-{next(_names)}"
        self.client = open_stream(server, certificate[0], self.channel)

    def still_served(self) -> None:
        """A message published now arrives, then a heartbeat; none of it,
        nor anything before it, in clear on the wire."""
        text = f"published after the bad input to {self.channel}"
        message_id = published_id(self.server, self.channel, text, context=self.context)
        self.client.read_until(f"id: {message_id}\ndata: {text}\n\n".encode())
        self.client.read_until(SSE_PING)
        assert not self.client.closed_cleanly
        assert_no_plaintext(self.client.wire_after_handshake, [*PLAINTEXT, text.encode()])

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def witness(server, certificate, context):
    wait_held(server, 0, WAIT, context)
    held_one = Witness(server, certificate, context)
    try:
        wait_held(server, 1, WAIT, context)
        yield held_one
    finally:
        held_one.close()
    wait_held(server, 0, WAIT, context)


def read_raw_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Every byte until the server ends the connection: ``(bytes, "EOF")``,
    or ``"reset"`` if it reset it. A timeout fails."""
    sock.settimeout(WAIT)
    got = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return got, "reset"
        if not data:
            return got, "EOF"
        got += data


def client_hello() -> bytes:
    """A real client's first flight (its ClientHello), made in memory."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def ending(client: WireTLSClient) -> str:
    """Read a TLS stream to its end: ``"close_notify"``, ``"EOF"`` (the
    socket closed without one), or ``"alert: <reason>"``."""
    try:
        while client.recv(WAIT):
            pass
    except ssl.SSLError as exc:
        return f"alert: {exc.reason}"
    return "close_notify" if client.closed_cleanly else "EOF"


# -- a handshake that never finishes ------------------------------------------------

@pytest.mark.parametrize("sends", ["nothing", "a ClientHello"])
def test_a_handshake_that_never_finishes_is_closed_at_the_head_deadline(
        server, context, witness, sends):
    """A TCP connect with nothing sent waits in the lobby; a ClientHello
    alone gets the server's first flight from a pool greenlet, which then
    waits for the client's Finished. Either way the head deadline (2 s)
    ends it: the server closes (a FIN, no reset), and what it sent is TLS
    handshake records only (no clear-text 408, nothing else)."""
    with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
        if sends == "a ClientHello":
            sock.sendall(client_hello())
        got, end = read_raw_to_end(sock)
    assert end == "EOF", got
    if sends == "nothing":
        assert got == b""
    else:
        kinds = {kind for kind, _ in records(got)}  # whole records, nothing after
        assert HANDSHAKE in kinds and kinds <= {HANDSHAKE, CHANGE_CIPHER_SPEC,
                                                APPLICATION_DATA}, kinds
        assert got[1:3] == b"\x03\x03", got[:5]  # a TLS 1.2+ record, not "HTTP/1.1 408"
    assert_no_plaintext(got, PLAINTEXT)
    assert stats(server, context)["held"] == 1  # the witness alone
    witness.still_served()
    servers.assert_clean_log(server)


def test_a_partial_head_after_the_handshake_gets_an_encrypted_408(server, context, certificate,
                                                                  witness):
    """Half a request head, then silence: at the deadline the client gets
    ``408`` encrypted, then the server's close_notify."""
    with WireTLSClient(HOST, server.port, cafile=certificate[0], timeout=WAIT) as client:
        client.handshake()
        client.send(b"GET /events?channel=never HTTP/1.1\r\nHost: loc")
        answer = client.read_to_close()
        assert client.closed_cleanly
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
        assert answer.endswith(b"\r\n\r\nthe request head did not arrive in time\n"), answer
        assert_no_plaintext(client.wire_after_handshake, PLAINTEXT)
    witness.still_served()
    servers.assert_clean_log(server)


def test_garbage_instead_of_a_hello_is_closed_without_a_word(server, context, witness):
    """Bytes that are neither TLS nor HTTP on the TLS port: the lobby closes
    the connection and sends nothing (it reads nothing of it, so the kernel
    may say so with a reset)."""
    with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
        sock.sendall(GARBAGE["not TLS"])
        got, end = read_raw_to_end(sock)
    assert got == b"" and end in ("EOF", "reset"), (got, end)
    witness.still_served()
    servers.assert_clean_log(server)


# -- garbage after the handshake ----------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_after_the_handshake_closes_that_stream_only(server, context, certificate,
                                                             witness, garbage, version):
    """Raw bytes outside TLS on a held SSE stream: the reactor answers with
    the alert OpenSSL produces (the client's ``ssl`` raises it) and drops
    that connection; its log says why, at INFO, without a traceback."""
    client = open_stream(server, certificate[0], f"garbage-{next(_names)}", VERSIONS[version])
    try:
        client.read_until(SSE_PING)
        wait_held(server, 2, WAIT, context)
        said = server.log().count("TLS error from the peer")
        client.send_raw(GARBAGE[garbage])
        end = ending(client)
        assert end.startswith("alert: ") and "ALERT" in end, end
        assert_no_plaintext(client.wire_after_handshake, PLAINTEXT)
    finally:
        client.close()
    wait_held(server, 1, WAIT, context)
    wait_for(lambda: server.log().count("TLS error from the peer") == said + 1,
             "the reason in the log")
    witness.still_served()
    servers.assert_clean_log(server)


# -- renegotiation ------------------------------------------------------------------

class RecordingProxy:
    """A TCP proxy on loopback for one connection to ``port``, keeping every
    byte each way (``to_server``, ``to_client``) as it passed."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.to_server, self.to_client = bytearray(), bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(WAIT)
        with self.listener, self.listener.accept()[0] as client, \
                socket.create_connection((HOST, self.target), timeout=WAIT) as upstream:
            ways = {client: (upstream, self.to_server), upstream: (client, self.to_client)}
            while ways:
                readable, _, _ = select.select(list(ways), [], [], WAIT)
                if not readable:
                    return
                for sock in readable:
                    other, record = ways[sock]
                    try:
                        data = sock.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        del ways[sock]
                        try:
                            other.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    record += data
                    other.sendall(data)

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the proxied connection did not end"


class SClient:
    """``openssl s_client`` (``-msg``: its trace of every record) through a
    :class:`RecordingProxy`, holding an SSE stream of ``channel``; its
    interactive commands (``R``, ``K``) go to its stdin."""

    def __init__(self, server: servers.Server, cafile: Path, version_flag: str,
                 channel: str) -> None:
        self.proxy = RecordingProxy(server.port)
        self.shell = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{HOST}:{self.proxy.port}", version_flag,
             "-crlf", "-msg", "-CAfile", str(cafile)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.got = b""
        self.type(f"GET /events?channel={channel} HTTP/1.1\nHost: localhost\n\n")
        self.read_until(RETRY)
        self.read_until(SSE_PING)

    def type(self, line: str) -> None:
        self.shell.stdin.write(line.encode())
        self.shell.stdin.flush()

    def read_until(self, needle: bytes) -> None:
        self.got = read_pipe_until(self.shell, needle, self.got, WAIT)

    def since(self, needle: bytes) -> bytes:
        """What s_client printed after the last ``needle``."""
        return self.got.rpartition(needle)[2]

    def close(self) -> None:
        if self.shell.poll() is None:
            self.shell.kill()
            self.shell.wait()
        self.shell.stdin.close()
        self.shell.stdout.close()
        self.proxy.join()


def kinds(wire: bytearray, start: int) -> list[int]:
    """The content types of the records on ``wire`` from offset ``start``."""
    return [kind for kind, _ in records(bytes(wire[start:]))]


def test_a_renegotiation_is_refused(server, context, certificate, witness):
    """``openssl s_client -tls1_2`` asks for an SSE stream, then renegotiates
    (its ``R`` command). What happens, on the recorded wire and in
    s_client's own trace (``-msg``):

    - the client's new ClientHello goes out (an encrypted handshake record);
    - the server starts no new handshake: not one handshake record comes
      back, only a *warning* ``no_renegotiation`` alert (OpenSSL's answer
      with ``OP_NO_RENEGOTIATION``);
    - OpenSSL's client treats a refused renegotiation as fatal: it sends a
      fatal ``handshake_failure`` alert and exits (status 1);
    - the reactor reads that alert as a TLS error from the peer and drops
      the connection (its log says so, at INFO, no traceback); the stream
      is over, the held count goes down, and the witness is untouched.

    So the stream does not continue, but only because this client ends it;
    nothing of it was ever on the wire in clear.
    """
    client = SClient(server, certificate[0], "-tls1_2", "renegotiate")
    try:
        wait_held(server, 2, WAIT, context)
        before = (len(client.proxy.to_server), len(client.proxy.to_client))
        client.type("R\n")
        client.read_until(b"RENEGOTIATING")
        assert client.shell.wait(WAIT) == 1
        client.got += client.shell.stdout.read()
    finally:
        client.close()
    trace = client.since(b"RENEGOTIATING").decode(errors="replace")
    assert "Alert [length 0002], warning no_renegotiation" in trace, trace
    assert "Alert [length 0002], fatal handshake_failure" in trace, trace
    asked = kinds(client.proxy.to_server, before[0])
    assert asked[0] == HANDSHAKE, asked  # the ClientHello of the renegotiation
    answered = kinds(client.proxy.to_client, before[1])
    # Heartbeats may come first; then one alert, and no handshake at all.
    assert answered[-1] == ALERT and set(answered[:-1]) <= {APPLICATION_DATA}, answered
    assert_no_plaintext(client.proxy.to_client, PLAINTEXT)
    wait_held(server, 1, WAIT, context)
    assert "TLS error from the peer: SSLV3_ALERT_HANDSHAKE_FAILURE" in server.log()
    witness.still_served()
    servers.assert_clean_log(server)


def test_a_tls13_key_update_is_answered_and_the_stream_goes_on(server, context, certificate,
                                                               witness):
    """TLS 1.3 has no renegotiation; what a client may ask for in the middle
    of a stream is new keys (``openssl s_client -tls1_3``, its ``K``
    command: a KeyUpdate that asks the server to update its own). The
    reactor's session answers with its own KeyUpdate, and the stream goes
    on under the new keys: heartbeats, then a message published after it."""
    client = SClient(server, certificate[0], "-tls1_3", "key-update")
    try:
        wait_held(server, 2, WAIT, context)
        client.type("K\n")
        client.read_until(b"KEYUPDATE")
        # The server's KeyUpdate comes back (as ours went out), then the stream.
        client.read_until(b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate")
        client.read_until(SSE_PING)
        text = "after the key update"
        message_id = published_id(server, "key-update", text, context=context)
        client.read_until(f"id: {message_id}\ndata: {text}\n\n".encode())
        after = client.since(b"KEYUPDATE")
        assert b">>> TLS 1.3, Handshake [length 0005], KeyUpdate" in after, after
        assert client.shell.poll() is None  # s_client found nothing wrong
        assert stats(server, context)["held"] == 2
        assert_no_plaintext(client.proxy.to_client, [*PLAINTEXT, text.encode()])
    finally:
        client.close()
    wait_held(server, 1, WAIT, context)
    witness.still_served()
    servers.assert_clean_log(server)


# -- old protocol versions ----------------------------------------------------------

@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls_1_0_and_1_1_are_refused_with_an_alert(server, context, witness, version):
    """gunicorn's context (Python's default for a server) takes TLS 1.2 at
    least; a client that offers only 1.0 or 1.1 (and would take any cipher)
    is refused with a fatal ``protocol_version`` alert, the handshake's only
    answer."""
    with warnings.catch_warnings():  # TLSVersion.TLSv1 and TLSv1_1 are deprecated names
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion[version]
        client = WireTLSClient(HOST, server.port, verify=False, minimum_version=old,
                               maximum_version=old, ciphers="DEFAULT:@SECLEVEL=0",
                               timeout=WAIT)
    with client:
        with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):
            client.handshake()
        assert records(bytes(client.wire)) == [(ALERT, bytes([FATAL, PROTOCOL_VERSION]))], \
            bytes(client.wire)
    witness.still_served()
    servers.assert_clean_log(server)


# -- close_notify in the middle of a stream -----------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_close_notify_in_the_middle_of_a_stream_is_answered_and_released(
        server, context, certificate, witness, version):
    """The client says close_notify while its stream is held: the reactor
    answers with its own (TLS 1.2 shows it on the wire as an alert record;
    TLS 1.3 encrypts it, so the client's ``ssl`` is the judge), closes the
    connection, and holds one fewer."""
    client = open_stream(server, certificate[0], f"bye-{next(_names)}", VERSIONS[version])
    try:
        client.read_until(SSE_PING)
        wait_held(server, 2, WAIT, context)
        sent_at = len(client.wire)
        client.send_close_notify()
        client.read_to_close()  # heartbeats sent before it came are dropped by ssl
        assert client.closed_cleanly
        last = records(bytes(client.wire[sent_at:]))[-1][0] if len(client.wire) > sent_at \
            else None
        assert last == (ALERT if version == "TLSv1.2" else APPLICATION_DATA), last
        assert read_raw_to_end(client.sock) == (b"", "EOF")  # and then the TCP close
        assert_no_plaintext(client.wire_after_handshake, PLAINTEXT)
    finally:
        client.close()
    wait_held(server, 1, WAIT, context)
    witness.still_served()
    servers.assert_clean_log(server)


# -- clear-text HTTP on the TLS port ------------------------------------------------

def test_a_plain_http_request_gets_a_clear_text_400_and_nothing_else(server, context, witness):
    """As nginx does: a ``400`` in clear text (the client speaks clear text
    itself) that says the port speaks TLS, then the close; nothing of the
    stream it asked for."""
    with socket.create_connection((HOST, server.port), timeout=WAIT) as sock:
        sock.sendall(b"GET /events?channel=plain HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got, end = read_raw_to_end(sock)
    assert end == "EOF", got
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got
    status, headers = parse_head(head)
    assert status == 400
    assert headers["connection"] == "close" and headers["content-type"].startswith("text/plain")
    assert body == b"this port speaks TLS: use https://\n"
    assert int(headers["content-length"]) == len(body)  # and not one byte more
    assert stats(server, context)["held"] == 1
    witness.still_served()
    servers.assert_clean_log(server)


def test_stalled_handshakes_take_no_pool_slot(tmp_path, certificate, context):
    """Clients that send a ClientHello and then nothing hold a greenlet and an
    fd until the head deadline, but no ``worker_connections`` slot: with more
    of them than slots, a new TLS client is still served at once, long before
    their deadline (60 s here)."""
    srv = servers.start("gunicorn", tmp_path, app="tests.apps:app", heartbeat=HEARTBEAT,
                        tls=certificate, args=("--worker-connections", "2"),
                        env={"WSGI_HIJACK_HEAD_TIMEOUT": "60"})
    stalled = []
    try:
        for _ in range(6):
            sock = socket.create_connection((HOST, srv.port), timeout=WAIT)
            sock.sendall(client_hello())
            stalled.append(sock)
        for sock in stalled:  # each got the server's first flight: its handshake is under way
            sock.settimeout(WAIT)
            assert sock.recv(5)[:1] == bytes([HANDSHAKE])
        with WireTLSClient(HOST, srv.port, cafile=certificate[0], timeout=WAIT) as client:
            client.handshake()
            client.send(b"GET /_stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = client.read_to_close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200]
        servers.assert_clean_log(srv)
    finally:
        for sock in stalled:
            sock.close()
        srv.stop()
