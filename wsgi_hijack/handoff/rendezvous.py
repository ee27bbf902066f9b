"""Where the processes of one deployment meet to move connections.

One directory per deployment (``WSGI_HIJACK_HANDOFF_DIR``, default
``/tmp/wsgi_hijack-<uid>-<port>``), made ``0700`` and refused when another
user owns it or can write to it. In it:

- ``worker-<pid>.sock``: a worker that takes connections (:mod:`.worker`);
- ``leaving-<pid>``: a worker on its way out, whose connections and bus are
  about to move (its successors wait for them);
- ``master-<pid>.sock``: a master's park (:mod:`.park`), which keeps what a
  worker gives until a successor takes it;
- ``master-<pid>.json``: how many workers that master runs;
- ``stopping-<pid>``: that master is shutting down: nothing moves, every
  connection says goodbye.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .. import config
from .successors import start_time


class RendezvousError(RuntimeError):
    """The handoff directory cannot be trusted; the text says why."""


def directory(port: int | str | None) -> Path:
    """The deployment's directory, made if needed, checked to be this user's only."""
    named = config.handoff_dir()
    path = Path(named) if named else Path(f"/tmp/wsgi_hijack-{os.getuid()}-{port or 'default'}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RendezvousError(f"cannot make the handoff directory {path}: {exc}") from None
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RendezvousError(f"{path} is not a directory of uid {os.getuid()}: "
                              "set WSGI_HIJACK_HANDOFF_DIR to one of yours")
    if info.st_mode & 0o077:
        raise RendezvousError(f"{path} is open to other users (mode {info.st_mode & 0o777:o}): "
                              "chmod 700 it, or set WSGI_HIJACK_HANDOFF_DIR")
    return path


def worker_socket(where: Path, pid: int) -> Path:
    return where / f"worker-{pid}.sock"


def park_socket(where: Path, master: int) -> Path:
    return where / f"master-{master}.sock"


def leaving(where: Path, pid: int) -> Path:
    return where / f"leaving-{pid}"


def stopping(where: Path, master: int) -> Path:
    return where / f"stopping-{master}"


def mark(path: Path) -> None:
    path.touch(mode=0o600, exist_ok=True)


def unmark(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_workers(where: Path, master: int, workers: int) -> None:
    tmp = where / f".master-{master}.json"
    tmp.write_text(json.dumps({"workers": workers}))
    tmp.replace(where / f"master-{master}.json")


def read_workers(where: Path, master: int) -> int:
    try:
        return int(json.loads((where / f"master-{master}.json").read_text())["workers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def alive(pid: int) -> bool:
    return start_time(pid) is not None


def older_workers(where: Path, pid: int) -> list[int]:
    """Live workers (taking, or leaving) that started before ``pid``."""
    born = start_time(pid) or 0
    found = set()
    for path in where.iterdir():
        name = path.name
        if name.startswith("worker-") and name.endswith(".sock"):
            other = name[len("worker-"):-len(".sock")]
        elif name.startswith("leaving-"):
            other = name[len("leaving-"):]
        else:
            continue
        if not other.isdigit() or int(other) == pid:
            continue
        started = start_time(int(other))
        if started is not None and started < born:
            found.add(int(other))
    return sorted(found)


def prune(where: Path) -> None:
    """Remove what processes that are gone left behind (a worker killed with
    SIGKILL keeps its socket file)."""
    for path in where.iterdir():
        digits = "".join(c for c in path.name.split(".")[0] if c.isdigit())
        if digits and path.name.split("-")[0] in ("worker", "leaving", "master", "stopping") \
                and not alive(int(digits)):
            unmark(path)


def parks(where: Path) -> list[Path]:
    """Every live master's park socket here."""
    found = []
    for path in where.glob("master-*.sock"):
        pid = path.name[len("master-"):-len(".sock")]
        if pid.isdigit() and alive(int(pid)):
            found.append(path)
    return found
