"""``WSGI_HIJACK_REDIS_URL``: the three forms read as written, and every
malformed one refused with a message that says what to fix."""

from __future__ import annotations

import pytest

from wsgi_hijack import config
from wsgi_hijack.redis_connect import parse

pytestmark = pytest.mark.unit


def test_sentinel_url_with_password_and_db():
    target = parse("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,[::1]:26381"
                   "/mymaster/2?sentinel_password=other")
    assert target.kind == "sentinel"
    assert target.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("::1", 26381))
    assert (target.service, target.db, target.password) == ("mymaster", 2, "s3cret")
    assert target.options == {"sentinel_password": "other"}
    assert "s3cret" not in target.describe() and "mymaster" in target.describe()


def test_single_and_cluster_urls():
    single = parse("redis://:pw@127.0.0.1:6379/0")
    assert single.kind == "single" and "pw" not in single.describe()
    cluster = parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001")
    assert cluster.kind == "cluster" and len(cluster.nodes) == 2


@pytest.mark.parametrize(("url", "says"), [
    ("http://127.0.0.1:6379", "expected one of"),
    ("redis+sentinel://127.0.0.1:26379", "<service name>/<db>"),
    ("redis+sentinel://127.0.0.1:26379/mymaster/zero", "db must be a number"),
    ("redis+sentinel://127.0.0.1/mymaster/0", "is not host:port"),
    ("redis+sentinel://127.0.0.1:x/mymaster/0", "is not a number"),
    ("redis+sentinel:///mymaster/0", "no host:port"),
    ("redis+cluster://127.0.0.1:7000/3", "only db 0"),
])
def test_malformed_urls_say_what_to_fix(url, says):
    with pytest.raises(ValueError, match=says):
        parse(url)


def test_passwords_stay_out_of_errors():
    with pytest.raises(ValueError) as refused:
        parse("redis+sentinel://:hunter2@127.0.0.1:26379")
    assert "hunter2" not in str(refused.value)


def test_replicas_to_wait_for(monkeypatch):
    sentinel = "redis+sentinel://127.0.0.1:26379/mymaster/0"
    assert config.redis_min_replicas(sentinel) == 1
    assert config.redis_min_replicas("redis+cluster://127.0.0.1:7000") == 1
    assert config.redis_min_replicas("redis://127.0.0.1:6379/0") == 0
    assert config.redis_min_replicas(sentinel, {"WSGI_HIJACK_REDIS_MIN_REPLICAS": "0"}) == 0
    with pytest.raises(ValueError, match="int >= 0"):
        config.redis_min_replicas(sentinel, {"WSGI_HIJACK_REDIS_MIN_REPLICAS": "-1"})


def test_the_cluster_bus_needs_a_gevent_worker():
    from gevent import monkey

    from wsgi_hijack.redis_cluster_bus import RedisClusterBus

    assert not monkey.is_module_patched("socket")  # pytest's own process
    bus = RedisClusterBus("redis+cluster://127.0.0.1:1")  # connects lazily
    with pytest.raises(RuntimeError, match="needs a gevent worker"):
        bus.start(lambda item: None)
