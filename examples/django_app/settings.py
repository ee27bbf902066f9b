"""Settings for the example: ``DJANGO_SETTINGS_MODULE=examples.django_app.settings``."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = False
ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]
ROOT_URLCONF = "examples.django_app.urls"
# The server is given this module's `application`, which wraps Django's.
WSGI_APPLICATION = "examples.django_app.wsgi.application"
INSTALLED_APPS: list[str] = []
# Ordinary Django middleware, inside the hijack. Do not add GZipMiddleware
# for the event stream: the hijacked head would announce gzip, and the
# reactor writes plain text.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
DATABASES: dict = {}
USE_TZ = True
# Django sets the process's TZ from this (default America/Chicago): the
# server's own log times would follow.
TIME_ZONE = "UTC"
