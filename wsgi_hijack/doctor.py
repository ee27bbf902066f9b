"""``wsgi-hijack-doctor``: is this host, and the server on it, set for N connections?

    wsgi-hijack-doctor --connections 100000 [--pid MASTER_PID] [--url URL] [--json]

Each check prints ``OK``, ``WARN`` or ``FAIL`` with what it found and, when
not OK, the exact fix (a command or a config line). The exit status is 1 if
any check fails. The host's limits are read from ``/proc``; with ``--pid``
(a gunicorn master) the running workers' own fd limits and settings are
read from their ``/proc`` entries, and with ``--url`` the server is asked for
``/metrics``. Why each limit matters, and the sizing they come from, is in
``docs/scaling.rst``.

The checks are functions that return a :class:`Check`; reading the host is
kept in :func:`read` so that each rule reads like its explanation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from . import config

#: Fds a worker keeps besides its held connections (listeners, the epoll, logs,
#: the handoff socket, ordinary requests): WSGI_HIJACK_FD_RESERVE's default.
RESERVE = 100
#: Kernel memory of one idle TCP connection, both its socket and its epoll
#: item, in bytes, rounded up (benchmarks/results/capacity/).
KERNEL_PER_CONNECTION = 4096
#: The listen backlog the package's gunicorn settings ask for.
BACKLOG = 4096


@dataclass
class Check:
    name: str
    status: str  # OK, WARN or FAIL
    detail: str
    fix: str = ""


def read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def sysctl(name: str) -> str | None:
    return read("/proc/sys/" + name.replace(".", "/"))


# -- the host ------------------------------------------------------------------------


def check_nofile(connections: int, soft: int, hard: int, who: str = "this shell") -> Check:
    need = connections + RESERVE
    detail = f"{who}: RLIMIT_NOFILE soft {soft}, hard {hard}; {connections} connections in " \
             f"one worker need {need}"
    if hard < need:
        return Check("fd limit", "FAIL", detail,
                     f"raise the hard limit: `ulimit -Hn {need}` as root, LimitNOFILE={need} in "
                     f"the systemd unit, or `* hard nofile {need}` in /etc/security/limits.conf;"
                     " or spread over more workers (each has its own limit)")
    if soft < need:
        return Check("fd limit", "FAIL", detail,
                     f"`ulimit -n {hard}` before starting the server, or LimitNOFILE={need} in "
                     "its systemd unit (the package's gunicorn settings raise the soft limit "
                     "to the hard one at start; other servers do not)")
    return Check("fd limit", "OK", detail)


def check_nr_open(connections: int) -> Check:
    value = int(sysctl("fs.nr_open") or 0)
    need = connections + RESERVE
    if value < need:
        return Check("fs.nr_open", "FAIL", f"{value}: no process may have more fds than this",
                     f"sysctl -w fs.nr_open={max(need, 1048576)} (and in /etc/sysctl.d/)")
    return Check("fs.nr_open", "OK", f"{value} >= {need}")


def check_file_max(connections: int) -> Check:
    value = int(sysctl("fs.file-max") or 0)
    need = connections * 2 + 10000  # every client on this host holds an fd too
    if value < connections + 10000:
        return Check("fs.file-max", "FAIL", f"{value} open files on the whole host",
                     f"sysctl -w fs.file-max={need}")
    if value < need:
        return Check("fs.file-max", "WARN", f"{value}: enough for the server, not for clients "
                     "on the same host as well", f"sysctl -w fs.file-max={need}")
    return Check("fs.file-max", "OK", f"{value}")


def check_backlog() -> list[Check]:
    somaxconn = int(sysctl("net.core.somaxconn") or 0)
    syn = int(sysctl("net.ipv4.tcp_max_syn_backlog") or 0)
    cookies = sysctl("net.ipv4.tcp_syncookies")
    checks = [
        Check("net.core.somaxconn", "OK", f"{somaxconn}") if somaxconn >= BACKLOG else
        Check("net.core.somaxconn", "WARN", f"{somaxconn}: the listen backlog is cut to it; in "
              "a connect storm the clients beyond it wait 1, 3, 7 s to retry",
              f"sysctl -w net.core.somaxconn={BACKLOG}"),
        Check("net.ipv4.tcp_max_syn_backlog", "OK", f"{syn}" + (
            "" if syn >= BACKLOG else ": syncookies answer the SYNs beyond it"))
        if syn >= BACKLOG or cookies != "0" else
        Check("net.ipv4.tcp_max_syn_backlog", "WARN", f"{syn}: half-open connections beyond "
              "it are dropped in a storm", f"sysctl -w net.ipv4.tcp_max_syn_backlog={BACKLOG}"),
    ]
    if cookies == "0":
        checks.append(Check("net.ipv4.tcp_syncookies", "WARN", "0: a SYN flood or a storm past "
                            "the backlog drops clients", "sysctl -w net.ipv4.tcp_syncookies=1"))
    else:
        checks.append(Check("net.ipv4.tcp_syncookies", "OK", f"{cookies}"))
    return checks


def check_tcp_mem(connections: int) -> Check:
    values = (sysctl("net.ipv4.tcp_mem") or "0 0 0").split()
    page = os.sysconf("SC_PAGE_SIZE")
    pressure, high = int(values[1]) * page, int(values[2]) * page
    need = connections * KERNEL_PER_CONNECTION
    detail = f"pressure at {pressure >> 20} MiB, limit {high >> 20} MiB; {connections} idle " \
             f"connections take about {need >> 20} MiB, more while their send buffers fill"
    if high < need:
        pages = need * 2 // page
        return Check("net.ipv4.tcp_mem", "FAIL", detail,
                     f"sysctl -w net.ipv4.tcp_mem='{pages // 2} {pages} {pages * 3 // 2}'")
    if pressure < need:
        return Check("net.ipv4.tcp_mem", "WARN", detail + ": the kernel will shrink buffers",
                     f"raise the middle value of net.ipv4.tcp_mem above {need // page} pages")
    return Check("net.ipv4.tcp_mem", "OK", detail)


def check_port_range(connections: int) -> Check:
    low, high = map(int, (sysctl("net.ipv4.ip_local_port_range") or "32768 60999").split())
    ports = high - low + 1
    detail = f"{low}-{high}: {ports} connections per client address to one server address"
    if ports < connections:
        return Check("client ports", "WARN", detail + f"; a load client or proxy on this host "
                     f"making {connections} needs {-(-connections // ports)} source addresses",
                     "bind clients to several addresses (127.0.0.2, 127.0.0.3...), or "
                     "sysctl -w net.ipv4.ip_local_port_range='1024 65535'")
    return Check("client ports", "OK", detail)


# -- the package ---------------------------------------------------------------------------


def check_fanout() -> Check:
    try:
        from . import _fanout  # noqa: F401
    except ImportError as exc:
        return Check("C fan-out", "WARN", f"not built ({exc}): heartbeats are written by the "
                     "Python loop, slower per connection",
                     "pip install --force-reinstall --no-binary wsgi_hijack wsgi_hijack "
                     "(needs a C compiler and the Python headers)")
    return Check("C fan-out", "OK", "built")


def check_versions() -> list[Check]:
    from importlib import metadata

    checks = []
    for name, minimum in (("gevent", (24, 10)), ("gunicorn", (23, 0)), ("packaging", None)):
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            fix = f"pip install {name}" + (" (gunicorn's gevent worker imports it)"
                                           if name == "packaging" else "")
            checks.append(Check(name, "FAIL", "not installed", fix))
            continue
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if minimum and parts < minimum:
            checks.append(Check(name, "FAIL", f"{version} < {'.'.join(map(str, minimum))}",
                                f"pip install -U '{name}>={'.'.join(map(str, minimum))}'"))
        else:
            checks.append(Check(name, "OK", version))
    return checks


def check_timeouts(env: dict[str, str], argv: list[str] | None = None) -> list[Check]:
    """The first request head's deadline, and (given a master's command line)
    whether keep-alive bounds it: gunicorn's own gevent worker times the first
    head with keep-alive, ours with the head timeout, in the lobby."""
    checks = []
    head = float(env.get("WSGI_HIJACK_HEAD_TIMEOUT") or 30)
    if head < 10:
        checks.append(Check("head timeout", "WARN", f"WSGI_HIJACK_HEAD_TIMEOUT={head:g}: clients "
                            "whose first segments are retransmitted (after 1, 3, 7 s) are cut",
                            "WSGI_HIJACK_HEAD_TIMEOUT=30"))
    else:
        checks.append(Check("head timeout", "OK", f"{head:g} s"))
    if argv is not None:
        line = " ".join(argv + [env.get("GUNICORN_CMD_ARGS", "")])
        ours = "wsgi_hijack.gunicorn_conf" in line or "gunicorn.conf.py" in line or \
            "wsgi_hijack.workers" in line
        keepalive = argv[argv.index("--keep-alive") + 1] if "--keep-alive" in argv[:-1] else "5"
        if ours:
            checks.append(Check("keep-alive", "OK", f"{keepalive} s between requests; the first "
                                "head has the head timeout, in the lobby"))
        else:
            checks.append(Check("keep-alive", "WARN", f"{keepalive} s, and gunicorn's own "
                                "worker times the first request head with it: clients whose "
                                "SYN is retransmitted in a storm (1, 3, 7 s) are cut",
                                "gunicorn -c python:wsgi_hijack.gunicorn_conf ..."))
    return checks


def check_redis(url: str | None, env: dict[str, str] | None = None) -> Check | None:
    """Redis answers (through the sentinels, for a Sentinel URL), and has the
    replicas a publish waits for."""
    if not url:
        return None
    from . import redis_connect

    # What is printed never holds a password: the URL as hide() writes it,
    # and an error's text with the URL's passwords taken out (redact()).
    try:
        import redis  # noqa: F401

        target = redis_connect.parse(url)
        client = redis_connect.connect(target)
        client.ping()
        if target.kind == "cluster":  # the shard with the fewest replicas decides
            replicas = min(int(info.get("connected_slaves", 0)) for info in client.info(
                "replication", target_nodes=client.PRIMARIES).values())
        else:
            replicas = int(client.info("replication").get("connected_slaves", 0))
    except ImportError:
        return Check("Redis", "FAIL", f"{redis_connect.hide(url)} configured, redis-py missing",
                     "pip install 'wsgi_hijack[redis]'")
    except ValueError as exc:
        return Check("Redis", "FAIL", redis_connect.redact(str(exc), url),
                     "fix WSGI_HIJACK_REDIS_URL")
    except Exception as exc:  # any failure to reach it is the finding
        return Check("Redis", "FAIL", redis_connect.redact(f"{url}: {exc}", url),
                     "start redis-server there, or fix WSGI_HIJACK_REDIS_URL")
    where = target.describe()
    wanted = config.redis_min_replicas(url, env)
    connected = f"{replicas} replicas connected" + (
        " to the master with the fewest" if target.kind == "cluster" else "")
    if replicas < wanted:
        return Check("Redis", "FAIL", f"{where} answers, {connected}; each publish waits for "
                     f"{wanted} (WSGI_HIJACK_REDIS_MIN_REPLICAS) and fails without them",
                     f"start the replicas, or set WSGI_HIJACK_REDIS_MIN_REPLICAS={replicas}")
    if target.kind != "single" and not wanted:
        return Check("Redis", "WARN", f"{where} answers; publishes do not wait for a replica, "
                     "so a failover can lose acknowledged messages",
                     "WSGI_HIJACK_REDIS_MIN_REPLICAS=1")
    return Check("Redis", "OK", f"{where} answers PING; {connected}")


# -- a running server ------------------------------------------------------------------------


def limits_of(pid: int) -> tuple[int, int] | None:
    text = read(f"/proc/{pid}/limits")
    for line in (text or "").splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    return None


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0")
                if "=" in item)


def argv_of(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None


def check_server(pid: int, connections: int) -> list[Check]:
    from .loadclient_machine import children

    if limits_of(pid) is None:
        return [Check("server", "FAIL", f"no process {pid} (or not readable)",
                      "give the gunicorn master's pid (the first line of its log says it)")]
    workers = children(pid)
    if not workers:
        return [Check("server", "FAIL", f"pid {pid} has no workers: is it a gunicorn master?",
                      "give the gunicorn master's pid")]
    share = -(-connections // len(workers))
    checks = [Check("server", "OK", f"master {pid}, {len(workers)} workers: {share} "
                    "connections each")]
    for worker in workers:
        soft, hard = limits_of(worker) or (0, 0)
        check = check_nofile(share, soft, hard, who=f"worker {worker}")
        checks.append(check)
    return checks


def check_url(url: str) -> Check:
    target = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=5) as resp:
            body = resp.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return Check("server URL", "FAIL", f"{target}: {exc}",
                     "start the server, or give its address (--url http://host:port)")
    held = sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("wsgi_hijack_held_connections"))
    return Check("server URL", "OK", f"{target} answers; {held:g} connections held")


# -- running -------------------------------------------------------------------------------------


def diagnose(connections: int, pid: int | None = None, url: str | None = None) -> list[Check]:
    env = environ_of(pid) if pid else dict(os.environ)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    checks = [check_nofile(connections, soft, hard), check_nr_open(connections),
              check_file_max(connections), *check_backlog(), check_tcp_mem(connections),
              check_port_range(connections), check_fanout(), *check_versions(),
              *check_timeouts(env, argv_of(pid) if pid else None)]
    redis_check = check_redis(env.get("WSGI_HIJACK_REDIS_URL")
                              or os.environ.get("WSGI_HIJACK_REDIS_URL"), env)
    if redis_check is not None:
        checks.append(redis_check)
    if pid:
        checks.extend(check_server(pid, connections))
    if url:
        checks.append(check_url(url))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="wsgi-hijack-doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20000,
                    help="connections you want held (per worker, or over --pid's workers)")
    ap.add_argument("--pid", type=int, help="a running gunicorn master: check its workers")
    ap.add_argument("--url", help="the running server's address: ask it for /metrics")
    ap.add_argument("--json", action="store_true", help="one JSON list of checks")
    args = ap.parse_args(argv)
    if args.connections <= 0:
        ap.error("--connections must be positive")
    checks = diagnose(args.connections, args.pid, args.url)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        for check in checks:
            print(f"{check.status:<4} {check.name}: {check.detail}")
            if check.fix:
                print(f"     fix: {check.fix}")
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
