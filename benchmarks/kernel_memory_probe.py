"""What ``benchmarks/kernel_memory.py`` reads from the kernel, and the arithmetic on it.

- ``/proc/slabinfo``: every slab cache's ``active_objs`` and ``objsize``; a
  cache's memory is their product. Caches with the same size and flags are
  merged by SLUB and listed under one name: :func:`slab_aliases` reads
  ``/sys/kernel/slab`` for the names behind each listed one (``eventpoll_epi``
  here also holds ``tcp_bind_bucket`` and ``tcp_bind2_bucket``;
  ``pool_workqueue`` holds ``skbuff_fclone_cache``).
- ``/proc/net/sockstat``: TCP ``inuse``, ``orphan``, ``tw``, ``alloc`` and ``mem``
  (pages charged to TCP socket buffers, host-wide).
- ``/proc/meminfo``: ``Slab``, ``SReclaimable``, ``SUnreclaim`` and friends (kB).
- ``ss -tmn``: each established socket's ``skmem`` (``r`` receive queue, ``w``
  send queue, ``f`` forward-allocated: what ``mem`` above counts, socket by
  socket), so that the buffers are split between the server's ends of the
  connections (local port = the server's port) and the clients' ends.
- the server process's RSS and CPU (:func:`proc_memory`).

A snapshot is a plain dict (JSON); :func:`delta` subtracts two.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
SLAB_DIR = Path("/sys/kernel/slab")
MEMINFO_KEYS = ("Slab", "SReclaimable", "SUnreclaim", "PageTables", "VmallocUsed", "KernelStack")
_SKMEM = re.compile(r"skmem:\(([^)]*)\)")
_SKMEM_FIELD = re.compile(r"([a-z]+)(\d+)")


def read_slabinfo(path: str = "/proc/slabinfo") -> dict[str, list[int]]:
    """``{cache: [active_objs, objsize]}`` (needs root)."""
    out: dict[str, list[int]] = {}
    with open(path) as f:
        for line in f:
            if line.startswith(("slabinfo", "#")):
                continue
            parts = line.split()
            out[parts[0]] = [int(parts[1]), int(parts[3])]
    return out


def slab_aliases() -> dict[str, list[str]]:
    """For each cache name that ``/proc/slabinfo`` may list, every cache merged
    with it (itself included), from ``/sys/kernel/slab``'s symlinks; ``{}`` if
    the directory is not there."""
    if not SLAB_DIR.is_dir():
        return {}
    groups: dict[str, list[str]] = {}
    for entry in SLAB_DIR.iterdir():
        target = os.path.realpath(entry)
        groups.setdefault(target, []).append(entry.name)
    out: dict[str, list[str]] = {}
    for names in groups.values():
        listed = sorted(n for n in names if not n.startswith(":"))
        for name in listed:
            out[name] = listed
    return out


def read_sockstat(path: str = "/proc/net/sockstat") -> dict[str, int]:
    """``{"sockets_used", "tcp_inuse", "tcp_orphan", "tcp_tw", "tcp_alloc", "tcp_mem"}``;
    ``tcp_mem`` is in pages."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            head, _, rest = line.partition(":")
            fields = rest.split()
            if head == "sockets":
                out["sockets_used"] = int(fields[1])
            elif head == "TCP":
                for key, value in zip(fields[::2], fields[1::2], strict=True):
                    out[f"tcp_{key}"] = int(value)
    return out


def read_meminfo(path: str = "/proc/meminfo") -> dict[str, int]:
    """:data:`MEMINFO_KEYS` from ``/proc/meminfo``, in kB."""
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in MEMINFO_KEYS:
                out[key] = int(rest.split()[0])
    return out


def proc_memory(pid: int) -> dict[str, float]:
    """RSS (bytes) and CPU seconds (user + system) of one process. Its fds are
    not listed: listing ``/proc/PID/fd`` makes a dentry and a proc inode for
    every fd, which would count as kernel memory per connection."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * PAGE
    return {"rss": rss, "cpu": (int(fields[11]) + int(fields[12])) / _CLK_TCK}


def tcp_mem_limits() -> list[int]:
    """``net.ipv4.tcp_mem``: low, pressure, high, in pages."""
    return [int(x) for x in Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()]


def tcp_settings() -> dict:
    """The sysctls that size TCP buffers here: ``tcp_mem`` (pages), ``tcp_wmem`` and
    ``tcp_rmem`` (bytes: min, default, max), the congestion control."""
    base = Path("/proc/sys/net/ipv4")
    return {"tcp_mem": tcp_mem_limits(),
            "tcp_wmem": [int(x) for x in (base / "tcp_wmem").read_text().split()],
            "tcp_rmem": [int(x) for x in (base / "tcp_rmem").read_text().split()],
            "congestion_control": (base / "tcp_congestion_control").read_text().strip()}


def _side() -> dict[str, int]:
    return {"sockets": 0, "r": 0, "w": 0, "f": 0, "t": 0, "rb": 0, "tb": 0, "d": 0}


def socket_memory(port: int) -> dict:
    """The established TCP sockets of connections to ``port``, split into the
    server's ends and the clients' ends: per side the socket count and the
    sum of each ``skmem`` field (``charged`` = r + w + f, bytes); and
    ``server_peers``: the server's ends counted by client address."""
    out: dict = {"server": _side(), "client": _side()}
    text = subprocess.run(
        ["ss", "-tmnH", "state", "established", f"( sport = :{port} or dport = :{port} )"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    peers: dict[str, int] = {}
    side = None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            fields = line.split()
            # Recv-Q Send-Q Local Peer (state filtered, so no State column)
            local, peer = (fields[2], fields[3]) if len(fields) >= 4 else ("", "")
            side = "server" if local.rsplit(":", 1)[-1] == str(port) else "client"
            if side == "server":
                host = peer.rsplit(":", 1)[0]
                peers[host] = peers.get(host, 0) + 1
            continue
        found = _SKMEM.search(line)
        if found and side:
            acc = out[side]
            acc["sockets"] += 1
            for key, value in _SKMEM_FIELD.findall(found.group(1)):
                if key in acc:
                    acc[key] += int(value)
            side = None
    for acc in out.values():
        acc["charged"] = acc["r"] + acc["w"] + acc["f"]
    out["server_peers"] = peers
    return out


def snapshot(port: int | None, pid: int | None, label: str = "") -> dict:
    """Everything above, now."""
    snap: dict = {"label": label, "t": time.monotonic(), "slab": read_slabinfo(),
                  "sockstat": read_sockstat(), "meminfo": read_meminfo()}
    if port is not None:
        snap["sockets"] = socket_memory(port)
    if pid is not None:
        snap["proc"] = proc_memory(pid)
    return snap


def delta(before: dict, after: dict) -> dict:
    """``after - before``: slab caches (objects and bytes; caches that moved),
    sockstat, meminfo (bytes), the server process (RSS, CPU) and the
    socket buffers of each side (bytes: ``after``'s, and ``before``'s beside
    them in ``sockets_before``)."""
    slab = {}
    for name, (objs, size) in after["slab"].items():
        objs0 = before["slab"].get(name, [0, size])[0]
        if objs != objs0:
            slab[name] = {"objs": objs - objs0, "objsize": size, "bytes": (objs - objs0) * size}
    out = {
        "slab": slab,
        "sockstat": {k: v - before["sockstat"].get(k, 0) for k, v in after["sockstat"].items()},
        "meminfo": {k: (v - before["meminfo"].get(k, 0)) * 1024
                    for k, v in after["meminfo"].items()},
    }
    if "proc" in after and "proc" in before:
        out["proc"] = {k: after["proc"][k] - before["proc"][k] for k in ("rss", "cpu")}
    if "sockets" in after:
        out["sockets"] = after["sockets"]
        out["sockets_before"] = before.get("sockets")
    return out
