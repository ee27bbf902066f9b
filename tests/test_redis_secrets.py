"""Redis passwords are never printed (issue 22, item 5): ``describe()``, the
parse errors, ``wsgi-hijack-doctor`` (its own URL, a server's with
``--pid``, a Redis that is down) and the gunicorn master's log line mask
every password form redis-py accepts -- ``redis://:pw@``, ``redis://user:pw@``,
``?password=``, ``rediss://``, ``unix://...?password=`` -- and ours,
``?sentinel_password=``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import servers
from harness.clients import published_id, wait_total_held
from wsgi_hijack import doctor
from wsgi_hijack.redis_connect import hide, parse, redact

DOCTOR = str(Path(sys.executable).parent / "wsgi-hijack-doctor")
SECRET = "hunter2-Zq"
OTHER = "hunter3-Zq"  # a second password (the sentinels')
SECRETS = (SECRET, OTHER, "hun%40ter2", "hun@ter2", "pa/ss", "pa#ss")

#: Every form a password takes in a URL the bus reads.
URLS = [
    f"redis://:{SECRET}@127.0.0.1:6379/0",
    f"redis://user:{SECRET}@127.0.0.1:6379/0",
    f"redis://127.0.0.1:6379/0?password={SECRET}",
    f"redis://user@127.0.0.1:6379/1?db=1&password={SECRET}&socket_timeout=1",
    f"redis://:{SECRET}@127.0.0.1:6379/0?password={OTHER}",
    f"redis://127.0.0.1:6379/0?ssl_password={SECRET}",
    f"redis://127.0.0.1:6379/0?PASSWORD={SECRET}",
    f"rediss://:{SECRET}@127.0.0.1:6380/0",
    f"rediss://default:{SECRET}@127.0.0.1:6380/0?password={OTHER}",
    f"unix:///tmp/redis.sock?password={SECRET}&db=0",
    f"unix://:{SECRET}@/tmp/redis.sock?db=0",
    "redis://:hun%40ter2@127.0.0.1:6379/0",  # percent-encoded
    "redis://:hun@ter2@127.0.0.1:6379/0",  # not encoded
    "redis://:pa#ss@127.0.0.1:6379/0",
    f"redis+sentinel://:{SECRET}@127.0.0.1:26379,127.0.0.1:26380/mymaster/0"
    f"?sentinel_password={OTHER}",
    f"redis+sentinel://u:{SECRET}@127.0.0.1:26379/mymaster/0?sentinel_password={OTHER}"
    "&password=pa/ss",
    f"redis+cluster://:{SECRET}@127.0.0.1:7000,127.0.0.1:7001",
    f"redis+cluster://u:{SECRET}@127.0.0.1:7000?password={OTHER}",
]

#: URLs that parse() refuses, each with passwords in it.
BAD_URLS = [
    f"http://:{SECRET}@127.0.0.1:6379/0?password={OTHER}",
    f"redis+sentinel://:{SECRET}@127.0.0.1:x/mymaster/0?sentinel_password={OTHER}",
    f"redis+sentinel://:{SECRET}@127.0.0.1:26379/mymaster/x?sentinel_password={OTHER}",
    f"redis+sentinel://:{SECRET}@127.0.0.1:26379?sentinel_password={OTHER}",
    f"redis+sentinel://127.0.0.1:26379/m/0/extra?sentinel_password={OTHER}",
    f"redis+cluster://:{SECRET}@127.0.0.1:7000/3?password={OTHER}",
    f"redis+cluster://:{SECRET}@?password={OTHER}",
    f"redis+cluster://:pa/ss@nohostport?password={OTHER}",
]


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


@pytest.mark.unit
@pytest.mark.parametrize("url", URLS)
def test_describe_and_hide_mask_every_password(url):
    target = parse(url)
    assert_no_secret(target.describe())
    assert_no_secret(hide(url))
    assert_no_secret(repr(target))
    assert_no_secret(redact(f"failed: {url} ({target.password})", url))
    if url.startswith(("redis://", "rediss://", "unix://")):
        assert target.describe() == hide(url) and "***" in hide(url)


@pytest.mark.unit
@pytest.mark.parametrize("url", BAD_URLS)
def test_parse_errors_mask_every_password(url):
    with pytest.raises(ValueError) as error:
        parse(url)
    assert_no_secret(str(error.value))
    assert "***" in str(error.value) or "127.0.0.1" not in url


@pytest.mark.unit
def test_hide_keeps_the_rest_to_read():
    assert hide(f"redis://user:{SECRET}@h:6379/2?password={OTHER}&db=2") == \
        "redis://user:***@h:6379/2?password=***&db=2"
    assert hide("redis://h:6379/0") == "redis://h:6379/0"
    assert hide("redis://user@h:6379/0") == "redis://user@h:6379/0"  # a user, no password


@pytest.mark.unit
@pytest.mark.parametrize("url", URLS + BAD_URLS)
def test_the_doctors_redis_check_masks_every_password(url):
    # Nothing listens on these ports (or the URL does not parse): the check
    # fails, and says where without the password.
    url = url.replace(":6379/", ":1/").replace(":6380/", ":1/")
    check = doctor.check_redis(url)
    assert check.status == "FAIL"
    assert_no_secret(check.detail + check.fix)


def run_doctor(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([DOCTOR, "--json", *args], capture_output=True, text=True, timeout=60,
                          env=servers.server_env(**env))


def test_the_doctor_and_the_master_never_print_the_password(start_server, redis_server):
    """A real redis-server with a password, a gunicorn with it in the URL
    two ways; the master's log, the doctor on its pid, and the doctor once
    Redis is down, all without the password."""
    import redis

    redis.Redis(port=redis_server.port).config_set("requirepass", SECRET)
    for url in (f"redis://127.0.0.1:{redis_server.port}/0?password={SECRET}",
                f"redis://default:{SECRET}@127.0.0.1:{redis_server.port}/0"):
        server = start_server("gunicorn", env={"WSGI_HIJACK_REDIS_URL": url})
        wait_total_held(server, 1, 0, timeout=20)
        published_id(server, "news", "the bus works with the password")
        found = run_doctor("--pid", str(server.proc.pid), env={"WSGI_HIJACK_REDIS_URL": ""})
        assert_no_secret(found.stdout + found.stderr)
        check = {c["name"]: c for c in json.loads(found.stdout)}["Redis"]
        assert check["status"] == "OK" and "***" in check["detail"], check
        server.stop()
        log = server.log()
        assert "bus: Redis, redis://" in log and "***" in log
        assert_no_secret(log)
    redis_server.kill()
    down = run_doctor(env={"WSGI_HIJACK_REDIS_URL": url})
    assert down.returncode == 1
    check = {c["name"]: c for c in json.loads(down.stdout)}["Redis"]
    assert check["status"] == "FAIL" and "***" in check["detail"], check
    assert_no_secret(down.stdout + down.stderr)
