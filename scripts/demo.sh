#!/usr/bin/env bash
# Install wsgi_hijack and run the demo under gunicorn on 127.0.0.1:8000.
# Try it: curl -N http://127.0.0.1:8000/   (BEEP every WSGI_HIJACK_HEARTBEAT seconds)
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc builds the fan-out loop in C (wsgi_hijack/_fanout.c); without it the
# package still installs and the reactor uses its Python loop.
if ! command -v gcc > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends gcc \
        || { apt-get update && apt-get install -y --no-install-recommends gcc; } \
        || echo "no gcc: installing without the C fan-out loop" >&2
fi
python3 -m pip install --quiet --disable-pip-version-check .
exec python3 -m gunicorn -c gunicorn.conf.py "$@" wsgi_hijack:app
