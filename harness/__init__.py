"""The test and benchmark harness, shared by ``tests/`` and ``benchmarks/``.

- :mod:`harness.servers`: one way to start and stop every server the project
  runs (gunicorn with the project's settings or without, gevent.pywsgi,
  Werkzeug, wsgiref, uWSGI, Puma with the seed, redis-server), and to run a
  benchmark script;
- :mod:`harness.wire`: raw-socket helpers (connect, send a request, read to
  the end of the head, to a marker, to the close);
- :mod:`harness.clients`: what a test does as a client of the apps (publish,
  open SSE subscribers, wait until held);
- ``harness/wsgi_server.py``: the runner for servers with no command line.

It lives at the repository root, outside the ``wsgi_hijack`` package, so that
it is never shipped in the wheel (``setup.cfg`` includes ``wsgi_hijack``
only) and so that a benchmark never imports a test module. pytest finds it
through ``pythonpath = ["."]`` in ``pyproject.toml``; a benchmark run as a
file (``python benchmarks/x.py``) puts the repository root on ``sys.path``.

This file imports nothing on purpose: ``harness/wsgi_server.py`` must patch
with gevent before anything else is imported.
"""
