"""Issue 21, item 2: TLS streams held by the reactor, as plain ones are, and
what real clients get on them.

One real gunicorn for the module: the package's gevent worker
(``gunicorn.conf.py``) with ``--certfile``/``--keyfile`` (a throw-away
certificate, :func:`harness.tls.make_certificate`), heartbeat 1 s, serving
tests/apps.py (the demo's routes, ``/_stats``, ``/streams-page``). Every
client trusts that certificate and nothing else, and every request,
``POST /publish`` and ``/_stats`` included, goes over TLS:

- Python's ``ssl``: SSE, chunked, long-poll and WebSocket (websocket-client)
  at once, each held by the reactor; a :class:`harness.tls.WireTLSClient`
  on an SSE stream beside them finds no plaintext in its raw bytes; a
  client's close_notify in a stream is answered; a request that comes in
  the same segment as the client's Finished is answered;
- curl: an SSE stream and a long-poll;
- headless Chromium (trusting exactly the certificate's key): an
  ``EventSource`` and a ``wss://`` WebSocket on a page from the same server.

Nothing is timed: each wait is for content, with a generous timeout.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import websocket
from selenium.webdriver.common.by import By

from harness import servers
from harness.clients import published_id, read_pipe_until, stats, wait_for, wait_held
from harness.tls import WireTLSClient, assert_no_plaintext, make_certificate
from harness.wire import HOST, parse_head, read_head, read_until, recv_until_closed

HEARTBEAT = 1.0
WAIT = 15.0  # the longest any one awaited thing may take (a heartbeat comes each second)
RETRY = b"retry: 2000\n\n"  # an SSE stream's first bytes (WSGI_HIJACK_SSE_RETRY's default)
SSE_PING = b": ping\n\n"
CHUNK_BEAT = b"1\r\n\n\r\n"  # a chunk holding one newline
# What an SSE stream carries in clear; none of it may be on the wire.
PLAINTEXT = [b"HTTP/1.1", b"retry:", b": ping", b"data:", b"text/event-stream"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def context(certificate) -> ssl.SSLContext:
    """A client's TLS settings: the test's certificate is the one CA, and
    the host name (IP 127.0.0.1) is checked against it."""
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certificate) -> servers.Server:
    server = servers.start("gunicorn", tmp_path_factory.mktemp("gunicorn-tls"),
                           app="tests.apps:app", heartbeat=HEARTBEAT, tls=certificate)
    try:
        log = server.log()
        assert "Using worker: wsgi_hijack.workers.ggevent.GeventWorker" in log, log
        assert f"Listening at: https://{HOST}:{server.port}" in log, log
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser_flags(certificate) -> tuple[str, ...]:
    """Chromium trusts the test certificate's key, and only it (not every error)."""
    return (f"--ignore-certificate-errors-spki-list={spki_sha256(certificate[0])}",)


def spki_sha256(cert: Path) -> str:
    """Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo (DER),
    the form of Chromium's ``--ignore-certificate-errors-spki-list``: the PEM
    public key that ``openssl x509 -pubkey`` prints is that DER in base64."""
    pem = subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"],
                         check=True, capture_output=True, text=True).stdout
    der = base64.b64decode("".join(line for line in pem.splitlines() if "-----" not in line))
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def connect_tls(port: int, context: ssl.SSLContext, target: str) -> ssl.SSLSocket:
    """``GET target`` over TLS with Python's ``ssl``; the response unread.
    ``suppress_ragged_eofs=False``: ``recv`` returns b"" only for the server's
    close_notify, and a bare EOF raises ``ssl.SSLEOFError``."""
    raw = socket.create_connection((HOST, port), timeout=WAIT)
    sock = context.wrap_socket(raw, server_hostname=HOST, suppress_ragged_eofs=False)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    return sock


def sse_event(message_id: int, text: str) -> bytes:
    return f"id: {message_id}\ndata: {text}\n\n".encode()


def chunk(text: str) -> bytes:
    """The chunk of a message on a chunked stream: its text and a newline."""
    payload = f"{text}\n".encode()
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def ws_next(ws: websocket.WebSocket) -> tuple[int, bytes]:
    """The next frame, pings included (websocket-client answers each with a pong)."""
    opcode, frame = ws.recv_data_frame(control_frame=True)
    return opcode, frame.data


def ws_message(ws: websocket.WebSocket) -> dict:
    """The next text message, as the demo's JSON, past any pings."""
    while True:
        opcode, data = ws_next(ws)
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(data)
        assert opcode == websocket.ABNF.OPCODE_PING, (opcode, data)


def read_answer(sock: ssl.SSLSocket) -> tuple[dict, bytes]:
    """A long-poll's answer, read to the server's close_notify (a bare EOF
    raises): its headers and its body, which must be exactly Content-Length."""
    answer = recv_until_closed(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    assert status == 200, answer
    assert int(headers["content-length"]) == len(body), answer
    return headers, body


def test_python_ssl_clients_get_each_stream_its_heartbeats_and_messages(
        tls_server, context, certificate):
    server, channel = tls_server, "py-tls"
    wait_held(server, 0, WAIT, context)
    baseline = stats(server, context)
    with contextlib.ExitStack() as stack:
        sse = stack.enter_context(connect_tls(server.port, context, f"/events?channel={channel}"))
        stream = stack.enter_context(connect_tls(server.port, context,
                                                 f"/stream?channel={channel}"))
        poll = stack.enter_context(connect_tls(server.port, context, f"/poll?channel={channel}"))
        ws = websocket.create_connection(f"wss://{HOST}:{server.port}/ws?channel={channel}",
                                         sslopt={"context": context}, timeout=WAIT)
        stack.callback(ws.close)
        wire = stack.enter_context(WireTLSClient(HOST, server.port, cafile=certificate[0],
                                                 timeout=WAIT))
        wire.handshake()
        wire.send(f"GET /events?channel={channel} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        # All five in the reactor, as plain streams are: none keeps a greenlet.
        wait_held(server, 5, WAIT, context)
        assert stats(server, context)["greenlets"] <= baseline["greenlets"] + 2

        # Each gets its head, then two heartbeats in a row.
        head, rest = read_head(sse)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert b"Content-Type: text/event-stream; charset=utf-8" in head, head
        got_sse = read_until(sse, SSE_PING * 2, rest)
        assert got_sse.startswith(RETRY + SSE_PING), got_sse
        head, rest = read_head(stream)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert b"Transfer-Encoding: chunked" in head, head
        got_stream = read_until(stream, CHUNK_BEAT * 2, rest)
        assert got_stream.startswith(CHUNK_BEAT), got_stream
        assert ws.getstatus() == 101
        assert [ws_next(ws)[0] for _ in range(2)] == [websocket.ABNF.OPCODE_PING] * 2
        wire_head = wire.read_until(b"\r\n\r\n")
        assert wire_head.startswith(b"HTTP/1.1 200 OK\r\n"), wire_head
        assert wire.read_until(SSE_PING * 2).startswith(RETRY + SSE_PING)

        # A message published over TLS reaches each, with its id; the held
        # long-poll gets its one answer (nothing was written before it), then
        # the server's close_notify.
        text = "over TLS: ünïcödé ✓"
        first = published_id(server, channel, text, context=context)
        got_sse = read_until(sse, sse_event(first, text), got_sse)
        got_stream = read_until(stream, chunk(text), got_stream)
        expected = {"id": first, "channel": channel, "event": None, "data": text}
        assert ws_message(ws) == expected
        wire.read_until(sse_event(first, text))
        headers, body = read_answer(poll)
        assert headers["content-type"] == "application/json", headers
        assert json.loads(body) == {"messages": [expected], "last_id": first, "gap": False}

        # A long-poll that has missed it is answered at once from the history.
        with connect_tls(server.port, context,
                         f"/poll?channel={channel}&since={first - 1}") as late:
            _, body = read_answer(late)
        assert json.loads(body) == {"messages": [expected], "last_id": first, "gap": False}

        # What the WebSocket client sends goes through the reactor's TLS
        # the other way: the demo chat publishes it to the channel.
        typed = "typed over wss ✓"
        ws.send(typed)
        echoed = ws_message(ws)
        assert echoed["data"] == typed and echoed["id"] > first, echoed
        read_until(sse, sse_event(echoed["id"], typed), got_sse)
        read_until(stream, chunk(typed), got_stream)
        wire.read_until(sse_event(echoed["id"], typed))

        # Not one byte of it in clear on the wire after the handshake.
        assert_no_plaintext(wire.wire_after_handshake,
                            [*PLAINTEXT, text.encode(), typed.encode()])
        assert wire.tls.version() in ("TLSv1.2", "TLSv1.3")
        wait_held(server, 4, WAIT, context)  # the long-poll is done; the streams go on
    wait_held(server, 0, WAIT, context)
    servers.assert_clean_log(server)


def test_a_clients_close_notify_in_a_stream_is_answered(tls_server, context, certificate):
    """A client that ends TLS in the middle of an SSE stream gets the
    server's close_notify (its own heartbeats stop there), and the reactor
    lets go of the connection."""
    wait_held(tls_server, 0, WAIT, context)
    with WireTLSClient(HOST, tls_server.port, cafile=certificate[0], timeout=WAIT) as client:
        client.handshake()
        client.send(f"GET /events?channel=bye-tls HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        assert client.read_until(SSE_PING).startswith(b"HTTP/1.1 200 OK\r\n")
        wait_held(tls_server, 1, WAIT, context)
        client.send_close_notify()
        client.read_to_close()  # heartbeats already on their way, at most
        assert client.closed_cleanly
        wait_held(tls_server, 0, WAIT, context)
    servers.assert_clean_log(tls_server)


class CoalescingClient(WireTLSClient):
    """A TLS client that sends its last handshake flight (TLS 1.3: its
    Finished) with the first request, in one write, as browsers and HTTP
    clients often do: the server has the request's record in hand the
    moment its handshake completes."""

    def _flush(self) -> None:
        if self.tls.version() is not None and not self.handshake_done:
            return  # the handshake is complete: keep the Finished for the request
        super()._flush()


def test_a_request_sent_with_the_clients_finished_is_answered(tls_server, context, certificate):
    with CoalescingClient(HOST, tls_server.port, cafile=certificate[0], timeout=WAIT) as client:
        client.handshake()
        client.send(f"GET /_stats HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                    .encode())
        answer = client.read_to_close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
    assert client.closed_cleanly
    servers.assert_clean_log(tls_server)


def test_curl_gets_the_stream_its_heartbeats_and_a_message(tls_server, context, certificate):
    server, channel = tls_server, "curl-tls"
    url = f"https://{HOST}:{server.port}"
    cacert = ["--cacert", str(certificate[0])]
    wait_held(server, 0, WAIT, context)
    curl = subprocess.Popen(["curl", "-sSN", *cacert, f"{url}/events?channel={channel}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        got = read_pipe_until(curl, SSE_PING * 2, timeout=WAIT)
        assert got.startswith(RETRY + SSE_PING), got
        wait_held(server, 1, WAIT, context)
        text = "to curl over TLS ✓"
        message_id = published_id(server, channel, text, context=context)
        read_pipe_until(curl, sse_event(message_id, text), got, WAIT)
    finally:
        curl.terminate()
        curl.wait()
        curl.stdout.close()
        curl.stderr.close()

    # curl's long-poll: the answer, complete, and curl finds nothing wrong.
    done = subprocess.run(["curl", "-sS", "-i", *cacert,
                           f"{url}/poll?channel={channel}&since={message_id - 1}"],
                          capture_output=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    status, headers = parse_head(head)
    assert status == 200 and int(headers["content-length"]) == len(body), done.stdout
    assert json.loads(body)["messages"] == [
        {"id": message_id, "channel": channel, "event": None, "data": text}]
    wait_held(server, 0, WAIT, context)
    servers.assert_clean_log(server)


def page_lists(driver) -> tuple[list[str], list[str]]:
    """What the page's EventSource and WebSocket got: "id data" per message."""
    return tuple([li.text for li in driver.find_elements(By.CSS_SELECTOR, f"#{name} li")]
                 for name in ("sse", "ws"))


def page_states(driver) -> tuple[str, str]:
    return (driver.find_element(By.ID, "sse-state").text,
            driver.find_element(By.ID, "ws-state").text)


def test_chromium_gets_messages_on_event_source_and_wss(tls_server, context, browser):
    server, channel = tls_server, "chromium-tls"
    wait_held(server, 0, WAIT, context)
    browser.get(f"https://{HOST}:{server.port}/streams-page?channel={channel}")
    wait_for(lambda: page_states(browser) == ("open", "open"),
             "the page's EventSource and WebSocket to open", timeout=WAIT)
    assert browser.execute_script("return location.protocol + ' ' + window.isSecureContext") \
        == "https: true"
    wait_held(server, 2, WAIT, context)

    text = "to Chromium over TLS <b>not bold</b> ✓"
    first = published_id(server, channel, text, context=context)
    wait_for(lambda: page_lists(browser) == ([f"{first} {text}"], [f"{first} {text}"]),
             "the published message in both lists", timeout=WAIT)
    # Text the page sends over wss:// is published (the demo chat): both see it.
    browser.execute_script("window.say('typed in chromium over wss')")
    wait_for(lambda: all(len(got) == 2 for got in page_lists(browser)),
             "the page's own message back in both lists", timeout=WAIT)
    sse_got, ws_got = page_lists(browser)
    assert sse_got == ws_got and sse_got[1].endswith(" typed in chromium over wss"), sse_got

    # Chromium answers the pings through the reactor's TLS: after several
    # pong timeouts (3 heartbeats each) both streams are still open.
    before = stats(server, context)
    wait_for(lambda: stats(server, context)["rounds"] >= before["rounds"] + 8,
             "eight more heartbeat rounds", timeout=WAIT)
    assert page_states(browser) == ("open", "open")
    assert stats(server, context)["dropped_dead"] == before["dropped_dead"]
    browser.execute_script("es.close(); ws.close(1000, 'done')")
    wait_for(lambda: page_states(browser)[1] == "closed 1000", "the close handshake",
             timeout=WAIT)
    wait_held(server, 0, WAIT, context)
    servers.assert_clean_log(server)
