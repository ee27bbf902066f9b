#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need: redis-server (the Redis bus tests
# start and kill their own), chromium and its WebDriver (tests/test_browser.py
# drives /usr/bin/chromium through /usr/bin/chromedriver).
need=()
command -v redis-server > /dev/null || need+=(redis-server)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# Puma, which runs the Rack app the connect-storm benchmark compares against
# (benchmarks/storm.py, tests/test_storm_bench.py), and nstat for its counters.
command -v puma > /dev/null || need+=(puma ruby-rack)
command -v nstat > /dev/null || need+=(iproute2)
# A C compiler: the fan-out loop (wsgi_hijack/_fanout.c, which a test checks
# was built) and the benchmark's floor (benchmarks/floor.c).
command -v gcc > /dev/null || need+=(gcc)
# OpenSSL's headers: pip compiles uWSGI, and gives it --https-socket only when
# they are there (tests/test_tls_refused.py runs uWSGI over TLS).
dpkg -s libssl-dev > /dev/null 2>&1 || need+=(libssl-dev)
# nginx terminating TLS in front of a worker: the TLS benchmark's third case
# (benchmarks/tls.py, tests/test_tls_bench.py).
command -v nginx > /dev/null || need+=(nginx-light)
# curl and the openssl command: clients of the TLS streams (curl reads an SSE
# stream over TLS; openssl gives Chromium the key to trust, tests/test_tls_streams.py).
command -v curl > /dev/null || need+=(curl)
command -v openssl > /dev/null || need+=(openssl)
if ((${#need[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${need[@]}" \
        || { apt-get update && apt-get install -y --no-install-recommends "${need[@]}"; }
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[test,bench,docs]'
# A uWSGI compiled before libssl-dev was there has no TLS: compile it again.
uwsgi_bin="$(dirname "$(python3 -c 'import sys; print(sys.executable)')")/uwsgi"
if [ -x "$uwsgi_bin" ] && ! ldd "$uwsgi_bin" | grep -q libssl; then
    python3 -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --force-reinstall "uwsgi==$("$uwsgi_bin" --version)"
fi
python3 -m ruff check .
# Everything, with no marker filter. Subsets (markers in pyproject.toml):
# -m unit (in-process, seconds), -m "not slow", -m "not redis and not browser and not uwsgi".
# pytest exits 5 when no test ran; set -e turns that into a failure too.
python3 -m pytest "$@"
