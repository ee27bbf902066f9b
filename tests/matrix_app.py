"""The app a compatibility-matrix cell serves: one framework example, chosen by
``MATRIX_FRAMEWORK``, plus ``/_matrix``, which reports what the server process
looks like from inside (tests/test_matrix.py).

``/_matrix`` is routed before the example and passes the server's own
``start_response`` through, so the example's HijackMiddleware is still the
layer that talks to the server, as in production.
"""

from __future__ import annotations

import json
import os
import threading


def _load(framework: str):
    if framework == "flask":
        from examples.flask_app import app
        return app
    if framework == "django":
        from examples.django_app.wsgi import application
        return application
    if framework == "pyramid":
        from examples.pyramid_app import app
        return app
    if framework == "bottle":
        from examples.bottle_app import app
        return app
    raise ValueError(f"unknown MATRIX_FRAMEWORK {framework!r}")


_app = _load(os.environ["MATRIX_FRAMEWORK"])


def _probe(environ, start_response):
    from gevent import monkey

    from wsgi_hijack import adapters
    from wsgi_hijack.reactor import current_reactor

    conn = adapters.detect(environ, start_response)
    reactor = current_reactor()
    body = json.dumps({
        "pid": os.getpid(),
        "adapter": conn.name if conn is not None else None,
        "patched": monkey.is_module_patched("socket"),
        "held": len(reactor) if reactor is not None else 0,
        "reactor_thread": any(t.name == "wsgi_hijack-reactor" for t in threading.enumerate()),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    if environ.get("PATH_INFO") == "/_matrix":
        return _probe(environ, start_response)
    return _app(environ, start_response)
