"""The test and benchmark harness: one way to start and stop every server the
project runs (:mod:`harness.servers`), and one set of raw-socket helpers
(:mod:`harness.wire`), shared by ``tests/`` and ``benchmarks/``.

It lives at the repository root, outside the ``wsgi_hijack`` package, so that
it is never shipped in the wheel (``setup.cfg`` includes ``wsgi_hijack`` only)
and so that a benchmark never has to import a test module. pytest finds it
through ``pythonpath = ["."]`` in ``pyproject.toml``; a benchmark run as a
file (``python benchmarks/x.py``) puts the repository root on ``sys.path``
itself.

This file imports nothing on purpose: ``harness/wsgi_server.py`` must patch
with gevent before anything else is imported.
"""
