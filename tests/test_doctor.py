"""``wsgi-hijack-doctor``, run as a user runs it (the console script), on this
host and against real servers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness import servers, wire
from harness.clients import wait_for
from wsgi_hijack import doctor

DOCTOR = str(Path(sys.executable).parent / "wsgi-hijack-doctor")


def run(*args: str, soft_nofile: int | None = None, env: dict | None = None):
    argv = [DOCTOR, *args]
    if soft_nofile is not None:
        argv = ["bash", "-c", f'ulimit -Sn {soft_nofile} && exec "$@"', "doctor", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=servers.server_env(**(env or {})))


def checks(result) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(result.stdout)}


def test_a_low_soft_fd_limit_fails_with_its_fix():
    result = run("--connections", "19900", soft_nofile=1024)
    assert result.returncode == 1, result.stdout
    assert "FAIL fd limit: this shell: RLIMIT_NOFILE soft 1024" in result.stdout
    assert "fix: `ulimit -n 20000` before starting the server, or LimitNOFILE=20000" in \
        result.stdout
    as_json = checks(run("--connections", "19900", "--json", soft_nofile=1024))
    assert as_json["fd limit"]["status"] == "FAIL" and "ulimit -n" in as_json["fd limit"]["fix"]


def test_this_host_set_for_its_limit_is_ok():
    result = run("--connections", "19000", "--json")
    found = checks(result)
    assert result.returncode == 0, result.stdout
    assert {c["status"] for c in found.values()} <= {"OK", "WARN"}
    for name in ("fd limit", "fs.nr_open", "fs.file-max", "net.core.somaxconn",
                 "net.ipv4.tcp_mem", "C fan-out", "gevent", "gunicorn", "packaging",
                 "head timeout"):
        assert found[name]["status"] == "OK", found[name]
    # More than one process may hold: the hard limit itself is the failure.
    over = checks(run("--connections", "50000", "--json"))["fd limit"]
    assert over["status"] == "FAIL" and "LimitNOFILE=50100" in over["fix"]


def test_a_running_server_is_checked_through_its_master(start_server):
    server = start_server("gunicorn", app="wsgi_hijack:app")
    streams = wire.open_streams(server.port, 5)
    try:
        # The gauge is fed once a second.
        wait_for(lambda: doctor.check_url(server.url).detail.endswith("; 5 connections held"),
                 "the metrics to show the 5")
        result = run("--connections", "10000", "--pid", str(server.proc.pid),
                     "--url", server.url, "--json")
    finally:
        for s in streams:
            s.close()
    found = checks(result)
    assert result.returncode == 0, result.stdout
    assert found["server"]["status"] == "OK" and "1 workers" in found["server"]["detail"]
    assert found["keep-alive"]["status"] == "OK"
    assert found["server URL"]["status"] == "OK"
    assert "5 connections held" in found["server URL"]["detail"]
    assert [c for c in json.loads(result.stdout) if c["detail"].startswith("worker ")][0][
        "status"] == "OK"


def test_gunicorns_own_worker_gets_the_keep_alive_warning(start_server):
    server = start_server("gunicorn-plain", app="wsgi_hijack:app")
    found = checks(run("--pid", str(server.proc.pid), "--json"))
    assert found["keep-alive"]["status"] == "WARN"
    assert "python:wsgi_hijack.gunicorn_conf" in found["keep-alive"]["fix"]


def test_redis_is_reached_or_named(redis_server):
    ok = checks(run("--json", env={"WSGI_HIJACK_REDIS_URL": redis_server.url}))
    assert ok["Redis"]["status"] == "OK"
    redis_server.kill()
    result = run("--json", env={"WSGI_HIJACK_REDIS_URL": redis_server.url})
    assert result.returncode == 1
    assert checks(result)["Redis"]["status"] == "FAIL"


@pytest.mark.unit
def test_bad_targets_are_named():
    gone = doctor.check_server(2 ** 22 + 7, 1000)
    assert gone[0].status == "FAIL" and "master's pid" in gone[0].fix
    url = doctor.check_url("http://127.0.0.1:1")
    assert url.status == "FAIL" and "--url" in url.fix
    low = doctor.check_nofile(19900, 1024, 20000)
    assert low.status == "FAIL" and "ulimit -n 20000" in low.fix
    hard = doctor.check_nofile(30000, 20000, 20000)
    assert hard.status == "FAIL" and "LimitNOFILE=30100" in hard.fix


@pytest.mark.redis
@pytest.mark.slow
def test_sentinel_and_cluster_replicas_are_checked(tmp_path):
    """Through the sentinels, and on every master of a cluster: the replicas
    a publish waits for are there, or the check fails with the setting to change."""
    from harness.redis_topology import ClusterSet, SentinelSet

    with SentinelSet(tmp_path / "sentinel") as sentinels:
        url = sentinels.url()
        found = checks(run("--json", env={"WSGI_HIJACK_REDIS_URL": url}))["Redis"]
        assert found["status"] == "OK" and "2 replicas connected" in found["detail"]
        too_many = checks(run("--json", env={"WSGI_HIJACK_REDIS_URL": url,
                                             "WSGI_HIJACK_REDIS_MIN_REPLICAS": "3"}))["Redis"]
        assert too_many["status"] == "FAIL"
        assert too_many["fix"] == "start the replicas, or set WSGI_HIJACK_REDIS_MIN_REPLICAS=2"
        unwaited = checks(run("--json", env={"WSGI_HIJACK_REDIS_URL": url,
                                             "WSGI_HIJACK_REDIS_MIN_REPLICAS": "0"}))["Redis"]
        assert unwaited["status"] == "WARN"
        unknown = checks(run("--json", env={
            "WSGI_HIJACK_REDIS_URL": url.replace("/mymaster/", "/nosuch/")}))["Redis"]
        assert unknown["status"] == "FAIL" and "nosuch" in unknown["detail"]
    with ClusterSet(tmp_path / "cluster") as cluster:
        found = checks(run("--json", env={"WSGI_HIJACK_REDIS_URL": cluster.url()}))["Redis"]
        assert found["status"] == "OK"
        assert "1 replicas connected to the master with the fewest" in found["detail"]
