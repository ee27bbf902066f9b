#!/usr/bin/env bash
# Install wsgi_hijack and run the demo under gunicorn on 127.0.0.1:8000.
# Try it: curl -N http://127.0.0.1:8000/   (BEEP every WSGI_HIJACK_HEARTBEAT seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check .
exec python3 -m gunicorn -c gunicorn.conf.py "$@" wsgi_hijack:app
