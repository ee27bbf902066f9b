"""Serve a WSGI app on a Python server that has no command line of its own:
``python harness/wsgi_server.py pywsgi|werkzeug|werkzeug-debug|wsgiref PORT MODULE:APP
[CERTFILE KEYFILE]``; with a certificate and its key, pywsgi and Werkzeug
serve TLS (``WSGIServer(certfile=, keyfile=)``, ``run_simple(ssl_context=)``).

Run as a file (by :func:`harness.servers.start`), so that for ``pywsgi`` gevent
patches the standard library before anything else is imported.
"""

import sys

kind, port, target = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tls = tuple(sys.argv[4:6])  # (certfile, keyfile), or () for plain HTTP
if kind == "pywsgi":  # a gevent server: patch before anything else is imported
    from gevent import monkey

    monkey.patch_all()

import importlib  # noqa: E402
import logging  # noqa: E402

logging.basicConfig(level=logging.INFO)
sys.path.insert(0, __file__.rsplit("/harness/", 1)[0])
_module, _name = target.split(":")
application = getattr(importlib.import_module(_module), _name)

if __name__ == "__main__":
    if kind == "pywsgi":
        from gevent.pywsgi import WSGIServer

        certificate = {"certfile": tls[0], "keyfile": tls[1]} if tls else {}
        WSGIServer(("127.0.0.1", port), application, **certificate).serve_forever()
    elif kind in ("werkzeug", "werkzeug-debug"):  # -debug: with the interactive debugger
        from werkzeug.serving import run_simple

        run_simple("127.0.0.1", port, application, threaded=True,
                   use_debugger=kind == "werkzeug-debug", ssl_context=tls or None)
    elif kind == "wsgiref" and not tls:
        from wsgiref.simple_server import make_server

        make_server("127.0.0.1", port, application).serve_forever()
    else:
        raise SystemExit(f"unknown server {kind!r}" + (" with TLS" if tls else ""))
