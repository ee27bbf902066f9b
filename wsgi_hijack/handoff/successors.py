"""Who takes a departing worker's connections, and how many each.

Workers of one deployment listen on ``worker-<pid>.sock`` in one directory
(across a binary upgrade's two masters too). A successor is a live process
of this user that started after the giver: gunicorn's worker ages cannot be
compared across masters, process start times can (``/proc/<pid>/stat``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_WORKER = re.compile(r"worker-(\d+)\.sock")


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 of the whole line


def parent(pid: int) -> int | None:
    """``pid``'s parent, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def successors(directory: str | Path, giver: int) -> list[tuple[int, Path]]:
    """``(pid, socket path)`` of the workers that started after ``giver``,
    oldest first."""
    born = start_time(giver)
    found = []
    for path in Path(directory).glob("worker-*.sock"):
        match = _WORKER.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        started = start_time(pid)
        if pid == giver or started is None or (born is not None and started < born):
            continue
        try:
            if path.lstat().st_uid != os.getuid():
                continue
        except FileNotFoundError:
            continue
        found.append((started, pid, path))
    return [(pid, path) for _, pid, path in sorted(found)]


def spread(count: int, takers: int) -> list[list[int]]:
    """Indices ``0..count-1`` dealt over ``takers``: each gets every
    ``takers``-th, so shares differ by at most one."""
    if takers <= 0:
        raise ValueError("nobody to spread over")
    return [list(range(start, count, takers)) for start in range(takers)]
