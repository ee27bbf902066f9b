"""A minimal Django project with a live feed, hijacking its SSE connections.

Run it on any server in the compatibility matrix, for instance::

    gunicorn -k gthread --threads 4 examples.django_app.wsgi:application
    gunicorn -k gevent examples.django_app.wsgi:application

- ``GET /events?channel=NAME``: Server-Sent Events, held by the reactor
  (``Last-Event-ID`` replays what a reconnecting client missed);
- ``POST /publish`` with form fields ``channel`` and ``data``: ``202`` and
  ``{"id": N}`` (loopback clients only, or a bearer token with
  ``WSGI_HIJACK_PUBLISH_TOKEN``).

The whole change to an existing Django project is one line in its
``wsgi.py`` (see :mod:`.wsgi`). A ``MIDDLEWARE`` entry cannot do it: Django's
middleware runs inside Django's WSGI handler, and the hijack middleware must
be the outermost WSGI layer, the one the server calls.
"""
