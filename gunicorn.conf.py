"""gunicorn settings for this repository: ``gunicorn -c gunicorn.conf.py wsgi_hijack:app``.

The settings ship with the package (:mod:`wsgi_hijack.gunicorn_conf`, also
usable as ``-c python:wsgi_hijack.gunicorn_conf``); override any of them
below, on the command line, or in GUNICORN_CMD_ARGS.
"""

from wsgi_hijack.gunicorn_conf import *  # noqa: F403
