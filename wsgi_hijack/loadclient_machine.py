"""What the load client reads from this machine and plans with it.

The server's processes, sampled from ``/proc`` (RSS, open fds, CPU time;
a gunicorn master's workers), the kernel's ephemeral port range (outgoing
connections take those ports), the fd limit of a client process, and the
split of N connections into client processes, each with its source address.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import resource
import socket
import time

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# fds a worker keeps for itself (stdio, epoll, Python's own) on top of its connections.
_FD_RESERVE = 64


# -- the server's processes, from /proc ----------------------------------------------------

def proc_stats(pid: int) -> dict:
    """RSS (bytes), open fds, and CPU seconds (user + system) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * _PAGE
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"pid": pid, "rss": rss, "fds": fds, "cpu": (utime + stime) / _CLK_TCK,
            "cpu_user": utime / _CLK_TCK, "t": time.monotonic()}


def children(pid: int, helpers: bool = False) -> list[int]:
    """The direct children of ``pid``: a gunicorn master's workers. With
    ``helpers``, also the master's handoff park (:mod:`wsgi_hijack.handoff.park`),
    which holds no connection but while workers are replaced. (Found by each
    process's parent: ``/proc/<pid>/task/*/children`` may miss a child.)"""
    kids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            kids.append(int(entry))
    if not helpers:
        kids = [kid for kid in kids if not _is_park(kid)]
    return sorted(kids)


def _is_park(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"wsgi_hijack.handoff.park" in f.read()
    except OSError:
        return False


def sample(pids: list[int]) -> list[dict]:
    """One :func:`proc_stats` per pid, or ``{"pid", "gone": True}`` for one that exited."""
    out = []
    for pid in pids:
        try:
            out.append(proc_stats(pid))
        except (FileNotFoundError, ProcessLookupError):
            out.append({"pid": pid, "gone": True, "t": time.monotonic()})
    return out


# -- planning --------------------------------------------------------------------------------

def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (outgoing connections take these)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def ephemeral_ports() -> int:
    low, high = ephemeral_range()
    return high - low + 1


def free_server_port(host: str = "127.0.0.1") -> int:
    """A free port *below* the ephemeral range, for a server under load: the
    load client's many outgoing connections take ephemeral ports, and could
    take the server's between this check and its bind."""
    low = ephemeral_range()[0]
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_per_process() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(1, min(19000, hard - _FD_RESERVE))


def plan(n: int, host: str, per_process: int, source_addresses: str) -> list[dict]:
    """Split N into worker shares and pick each worker's source address."""
    procs = max(1, math.ceil(n / per_process))
    shares = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    if source_addresses == "auto":
        loopback = _is_loopback(host) and ":" not in host
        # Leave a tenth of the ports for everything else on the machine.
        needed = loopback and n > ephemeral_ports() * 0.9
        sources = [f"127.0.0.{2 + i}" for i in range(procs)] if needed else [None] * procs
    elif source_addresses in ("none", ""):
        sources = [None] * procs
    else:
        given = [a.strip() for a in source_addresses.split(",") if a.strip()]
        sources = [given[i % len(given)] for i in range(procs)]
    return [{"n": share, "source": src} for share, src in zip(shares, sources, strict=True)]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
