"""WSGI entry point of the Django example: the one line that gives it hijack.

A Django project's ``wsgi.py`` usually ends with::

    application = get_wsgi_application()

Wrapping it is the whole change::

    application = HijackMiddleware(get_wsgi_application())

``WSGI_APPLICATION`` in the settings names this ``application``, so
``manage.py`` and every server see the wrapped one.
"""

import os

from django.core.wsgi import get_wsgi_application

from wsgi_hijack import HijackMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_app.settings")

application = HijackMiddleware(get_wsgi_application())
