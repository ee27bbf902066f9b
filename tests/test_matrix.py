"""The compatibility matrix: each framework example on each server, for real.

Every cell starts the real server in a subprocess with one example app
(tests/matrix_app.py), and then, where the server can hijack:

- asks the server process which adapter took the request, and whether
  anything is monkeypatched (nothing may be, on servers whose handlers are
  OS threads);
- opens an SSE stream with httpx, publishes through the example's own publish
  view, and reads the message and a heartbeat off the stream;

and where it cannot: checks the clean ``501`` (with its log line), that the
capability flag is false, and that ordinary views still work.

``MATRIX`` is what each cell must show; the README's table is checked
against it (``test_readme_matrix_is_what_the_tests_show``), so every cell in
the README is produced by a test here.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest

from harness.servers import ROOT, Server, assert_clean_log

FRAMEWORKS = {"flask": "Flask", "django": "Django", "pyramid": "Pyramid", "bottle": "Bottle"}

# server -> (README row label, adapter name or None when not hijackable,
#            whether the server process is monkeypatched)
SERVERS = {
    "gunicorn-gevent": ("gunicorn ``-k gevent``", "gunicorn-gevent", True),
    "gunicorn-gthread": ("gunicorn ``-k gthread``", "gunicorn-gthread", False),
    "gunicorn-sync": ("gunicorn ``-k sync``", "gunicorn-sync", False),
    "pywsgi": ("``gevent.pywsgi``", "gevent-pywsgi", True),
    "werkzeug": ("Werkzeug ``run_simple(threaded=True)``", "werkzeug", False),
    "uwsgi": ("uWSGI ``--http-socket --enable-threads``", "uwsgi", False),
    "uwsgi-router": ("uWSGI ``--http`` (its HTTP router)", None, False),
    "wsgiref": ("``wsgiref.simple_server``", None, False),
}

HIJACK, FALLBACK = "SSE", "501"
MATRIX = {(fw, server): HIJACK if spec[1] else FALLBACK
          for server, spec in SERVERS.items() for fw in FRAMEWORKS}

README = ROOT / "README.rst"


def probe(srv: Server) -> dict:
    resp = httpx.get(f"http://127.0.0.1:{srv.port}/_matrix", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def publish(srv: Server, channel: str, data: str) -> int:
    resp = httpx.post(f"http://127.0.0.1:{srv.port}/publish",
                      data={"channel": channel, "data": data}, timeout=10)
    assert resp.status_code == 202, (resp.status_code, resp.text, srv.log())
    return resp.json()["id"]


def hijack_cell(srv: Server, framework: str, server: str) -> str:
    adapter, patched = SERVERS[server][1], SERVERS[server][2]
    before = probe(srv)
    assert before["adapter"] == adapter, before
    assert before["patched"] is patched, before
    channel = f"matrix-{framework}"
    text = f"hello from {framework} on {server}"
    with httpx.Client(timeout=10) as client, client.stream(
            "GET", f"http://127.0.0.1:{srv.port}/events", params={"channel": channel}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
        assert "content-length" not in resp.headers, resp.headers
        deadline = time.monotonic() + 10
        while (during := probe(srv))["held"] < 1:
            assert time.monotonic() < deadline, during
            time.sleep(0.02)
        # Nothing patched while a connection is held; on thread servers the
        # reactor runs in a thread of its own.
        assert during["patched"] is patched, during
        if not patched:
            assert during["reactor_thread"], during
        message_id = publish(srv, channel, text)
        seen: dict[str, bool] = {"data": False, "ping": False}
        lines: list[str] = []
        for line in resp.iter_lines():
            lines.append(line)
            if line == f"data: {text}":
                seen["data"] = True
                assert f"id: {message_id}" in lines, lines
            elif line.startswith(":") and seen["data"]:
                seen["ping"] = True  # a heartbeat after the message
            if all(seen.values()):
                break
    assert all(seen.values()), lines
    return HIJACK


def fallback_cell(srv: Server, framework: str, server: str) -> str:
    info = probe(srv)
    assert info["adapter"] is None and info["held"] == 0, info
    assert info["patched"] is False, info
    resp = httpx.get(f"http://127.0.0.1:{srv.port}/events", params={"channel": "c"}, timeout=10)
    assert resp.status_code == 501, (resp.status_code, resp.text)
    assert "not available on this server" in resp.text, resp.text
    # The capability flag is what the app sees: ordinary views go on working.
    publish(srv, "c", "still publishes")
    deadline = time.monotonic() + 5
    while "needs a server that can hijack" not in srv.log():
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)
    return FALLBACK


@pytest.mark.parametrize("server", [
    pytest.param(s, marks=pytest.mark.uwsgi) if s.startswith("uwsgi") else s for s in SERVERS])
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_cell(serve, framework, server):
    srv = serve(framework, server)
    expected = MATRIX[framework, server]
    cell = hijack_cell if expected == HIJACK else fallback_cell
    assert cell(srv, framework, server) == expected
    time.sleep(0.1)
    if expected == FALLBACK:
        # Django logs every 5xx it answers on django.request, the 501 too.
        srv.log = lambda log=srv.log: "".join(
            ln for ln in log().splitlines(keepends=True) if "Not Implemented: /events" not in ln)
    assert_clean_log(srv)
    if server == "uwsgi-router":
        assert "connections cannot be hijacked here: uWSGI: " in srv.log()


def render_table() -> str:
    """The README's matrix table, as MATRIX says it must be; to print it:
    ``python -c "from tests.test_matrix import render_table; print(render_table())"``."""
    header = ["server", *FRAMEWORKS.values()]
    rows = [[label, *(MATRIX[fw, server] for fw in FRAMEWORKS)]
            for server, (label, _, _) in SERVERS.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([rule, line(header), rule, *(line(r) for r in rows), rule])


@pytest.mark.unit
def test_readme_matrix_is_what_the_tests_show():
    text = README.read_text()
    match = re.search(r"\.\. matrix-start\n\n(.*?)\n\n\.\. matrix-end", text, re.S)
    assert match, "README.rst has no '.. matrix-start' / '.. matrix-end' block"
    assert match.group(1) == render_table(), (
        "README matrix differs from tests/test_matrix.py; paste this:\n\n" + render_table())

