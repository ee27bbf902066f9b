"""Apps for tests/test_thread_servers.py: the hijack API on servers whose
handlers are OS threads (gunicorn sync and gthread, Werkzeug, uWSGI), used the
way a thread-server app would use it: with threads, never gevent."""

from __future__ import annotations

import gc
import json
import os
import threading

from wsgi_hijack import HijackMiddleware, full_hijack


def _json(start_response, data: dict) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _echo_in_thread(sock, head: bytes) -> None:
    def serve() -> None:
        with sock:
            sock.sendall(head)
            while data := sock.recv(4096):
                sock.sendall(data)
    threading.Thread(target=serve, daemon=True).start()


def echo(environ, start_response):
    """Full hijack, after reading ``?read=N`` bytes of the body: our own head,
    which names the socket's class, then an echo of whatever comes."""
    read = int(environ.get("QUERY_STRING", "read=0").partition("=")[2] or 0)
    got = environ["wsgi.input"].read(read) if read else b""
    sock = full_hijack(environ)
    raw = object.__getattribute__(sock, "_sock")
    kind = f"{type(raw).__module__}.{type(raw).__qualname__}"
    _echo_in_thread(sock, b"HTTP/1.1 200 OK\r\nConnection: close\r\nX-Socket: " + kind.encode()
                    + b"\r\nX-Read: " + got + b"\r\n\r\n")
    return []


def probe(environ, start_response):
    from gevent import monkey

    workers = [o for o in gc.get_objects() if type(o).__name__ == "ThreadWorker"]
    return _json(start_response, {
        "pid": os.getpid(),
        "hijackable": environ["wsgi_hijack.hijackable"],
        "patched": monkey.is_module_patched("socket"),
        "nr_conns": workers[0].nr_conns if workers else None,
        "fds": len(os.listdir(f"/proc/{os.getpid()}/fd")),
    })


def hello(environ, start_response):
    return _json(start_response, {"hello": "world"})


ROUTES = {"/echo": echo, "/_probe": probe, "/hello": hello}


def router(environ, start_response):
    return ROUTES[environ["PATH_INFO"]](environ, start_response)


app = HijackMiddleware(router)
