"""The Redis topologies of :mod:`harness.redis_topology` really fail over:
a failover test built on a harness that only looked right would pass for
nothing."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from harness.redis_topology import HOST, ClusterSet, SentinelSet

pytestmark = [pytest.mark.redis, pytest.mark.slow]


@pytest.fixture
def sentinel_set(tmp_path):
    topology = SentinelSet(tmp_path)
    yield topology
    topology.stop()
    topology.stop()  # twice: must be harmless


@pytest.fixture
def cluster_set(tmp_path):
    topology = ClusterSet(tmp_path)
    yield topology
    topology.stop()


def test_sentinel_set_fails_over(sentinel_set: SentinelSet) -> None:
    ports = sentinel_set.sentinel_ports
    assert len(ports) == 3
    assert sentinel_set.url() == (f"redis+sentinel://{HOST}:{ports[0]},{HOST}:{ports[1]},"
                                  f"{HOST}:{ports[2]}/mymaster/0")
    sentinel = Sentinel([(HOST, p) for p in ports], socket_timeout=2)
    primary = sentinel_set.primary_port()
    assert sentinel.discover_master("mymaster") == (HOST, primary)

    replicas = [p for p in sentinel_set.data_ports if p != primary]
    assert len(replicas) == 2
    with redis.Redis(host=HOST, port=primary, socket_timeout=10) as r:
        r.set("before", "failover")
        # WAIT: both replicas have the write, so reading them is not a race.
        assert r.execute_command("WAIT", 2, 5000) == 2
    for port in replicas:
        with redis.Redis(host=HOST, port=port, socket_timeout=2) as r:
            assert r.get("before") == b"failover"

    old = sentinel_set.kill_primary()
    assert old == primary
    new = sentinel_set.wait_for_failover(old)
    assert new != old and new in replicas
    assert sentinel.discover_master("mymaster") == (HOST, new)
    with redis.Redis(host=HOST, port=new, socket_timeout=2) as r:
        assert r.get("before") == b"failover"
        assert r.set("after", "failover")
        assert r.get("after") == b"failover"


def test_cluster_set_fails_over(cluster_set: ClusterSet) -> None:
    masters = cluster_set.master_ports()
    assert len(masters) == 3 and len(cluster_set.ports) == 6
    assert cluster_set.url() == "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in masters)
    keys = [f"key-{i}" for i in range(20)]
    rc = RedisCluster(host=HOST, port=masters[0], socket_timeout=2)
    try:
        for key in keys:
            assert rc.set(key, key)
        assert [rc.get(k) for k in keys] == [k.encode() for k in keys]
        assert len({rc.keyslot(k) for k in keys}) > 1
        owners = {k: cluster_set.master_for_key(k) for k in keys}
        assert owners == {k: rc.get_node_from_key(k).port for k in keys}
        assert set(owners.values()) == set(masters)
    finally:
        rc.close()

    key = keys[0]
    old = owners[key]
    with redis.Redis(host=HOST, port=old, socket_timeout=10) as r:
        assert r.set(key, "before failover")
        # WAIT: the replica has it, so it must survive the failover.
        assert r.execute_command("WAIT", 1, 5000) == 1
    cluster_set.kill_master(old)
    new = cluster_set.wait_for_failover(old)
    assert new != old
    assert cluster_set.master_for_key(key) == new
    assert old not in cluster_set.master_ports() and new in cluster_set.master_ports()

    rc = RedisCluster(host=HOST, port=new, socket_timeout=2)
    try:
        assert rc.get_node_from_key(key).port == new
        assert rc.get(key) == b"before failover"
        assert rc.set(key, "after failover")
        assert rc.get(key) == b"after failover"
    finally:
        rc.close()
