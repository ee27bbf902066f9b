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

import os
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import ROOT, Server, assert_clean_log, free_port, server_env

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

HEARTBEAT = 0.3
README = ROOT / "README.rst"
UWSGI = shutil.which("uwsgi") or (Path(sys.executable).parent / "uwsgi").as_posix()


def server_argv(server: str, port: int, app: str = "tests.matrix_app:application") -> list[str]:
    """How each server is started; the runner-script servers take ``app``
    from ``MATRIX_APP`` in their environment."""
    bind = f"127.0.0.1:{port}"
    gunicorn = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                "-b", bind, "--no-control-socket", "-w", "1"]
    if server == "gunicorn-gevent":
        return [*gunicorn, "-k", "gevent", app]
    if server == "gunicorn-gthread":
        return [*gunicorn, "-k", "gthread", "--threads", "4", app]
    if server == "gunicorn-sync":
        return [*gunicorn, "-k", "sync", app]
    if server in ("pywsgi", "werkzeug", "werkzeug-debug", "wsgiref"):
        return [sys.executable, str(ROOT / "tests" / "matrix_server.py"), server, str(port)]
    if server.startswith("uwsgi"):
        if not os.path.exists(UWSGI):
            # scripts/test.sh installs it (setup.cfg's test extra): missing is a
            # broken set-up, not a reason to skip a matrix cell.
            pytest.fail(f"uwsgi not found at {UWSGI}: pip install -e '.[test]'")
        # --http starts uWSGI's router process in front of the worker: the
        # worker's fd is a connection to the router, not to the client.
        listen = "--http" if server == "uwsgi-router" else "--http-socket"
        return [UWSGI, listen, bind, "--module", app, "--master", "--processes", "1",
                "--enable-threads", "--die-on-term", "--need-app", "--pythonpath", str(ROOT)]
    raise ValueError(server)


@pytest.fixture
def serve(tmp_path):
    """serve(framework, server, app=...) -> Server; stopped after the test."""
    yield from servers_for(tmp_path)


def servers_for(tmp_path: Path):
    servers: list[Server] = []

    def start(framework: str | None, server: str,
              app: str = "tests.matrix_app:application") -> Server:
        port = free_port()
        env = server_env(HEARTBEAT)
        env["MATRIX_APP"] = app
        if framework is not None:
            env["MATRIX_FRAMEWORK"] = framework
        srv = Server(server_argv(server, port, app), port, env, tmp_path)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


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


@pytest.mark.parametrize("server", list(SERVERS))
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
        assert "uWSGI: connections are not hijackable" in srv.log()


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


def test_readme_matrix_is_what_the_tests_show():
    text = README.read_text()
    match = re.search(r"\.\. matrix-start\n\n(.*?)\n\n\.\. matrix-end", text, re.S)
    assert match, "README.rst has no '.. matrix-start' / '.. matrix-end' block"
    assert match.group(1) == render_table(), (
        "README matrix differs from tests/test_matrix.py; paste this:\n\n" + render_table())

