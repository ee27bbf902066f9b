"""Where the processes of one deployment meet to move connections.

A **deployment** is one gunicorn master and the masters that replace it by a
binary upgrade (``USR2``), with their workers. What identifies it is
``WSGI_HIJACK_DEPLOYMENT`` when the settings give it, else the sorted list
of the addresses it binds (``127.0.0.1:8000``, ``unix:/run/app.sock``): two
apps of one user on two Unix sockets, or on one port at two addresses, are
two deployments. The master names it once (:func:`prepare`, from
``on_starting``) and its workers, its park and a binary upgrade's new master
inherit the name through the environment; what goes into file names is its
hash, :attr:`Deployment.ident`.

Its directory is private and nobody can take its name beforehand: by
default a new one with a random name, ``wsgi_hijack-<uid>-<ident>-<random>``,
made ``0700`` by the master (``mkdtemp``) under ``$XDG_RUNTIME_DIR`` when
that is this user's own (``/run/user/<uid>``), else under the temporary
directory. Every restart that moves connections finds it through the
environment, ``WSGI_HIJACK_HANDOFF_DIR``: a reload's and a recycle's
workers are forked by the same master, and a binary upgrade's new master
gets it from ``gunicorn_conf.pre_exec`` (gunicorn executes that one with
the environment the old master was started with). A predictable name would
serve no restart, and would let another local user make it first and with
it turn the handoff off on every reload (as ``/tmp/wsgi_hijack-<uid>-<port>``
did). A directory named in ``WSGI_HIJACK_HANDOFF_DIR`` that
another user owns or may enter is refused with a warning, and the master
makes a private one instead: the handoff stays on.

In it, besides the sockets and marks below, ``deployment-<ident>.key``
(``0600``): the deployment's secret, made by its first master. A process
proves it belongs to the deployment before anything moves
(:func:`.transport.prove`, :func:`.transport.expect`): the park gives
connections only to a successor that proves it, and takes them, or gives
the bus's state, only to a worker that does. So even two deployments told
to share one directory never take each other's connections. The rest:

- ``worker-<pid>.sock``: a worker that takes connections (:mod:`.worker`);
- ``leaving-<pid>``: a worker on its way out, whose connections and bus are
  about to move (its successors wait for them);
- ``master-<pid>.sock``: a master's park (:mod:`.park`), which keeps what a
  worker gives until a successor takes it;
- ``master-<pid>.json``: how many workers that master runs, and its
  deployment's ident;
- ``stopping-<pid>``: that master is shutting down: nothing moves, every
  connection says goodbye;
- ``listen-<pid>.sock``: with several workers, gunicorn's own listening
  socket, moved off the public address (``0600``; no client uses it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import config
from .successors import parent, start_time

log = logging.getLogger("wsgi_hijack.handoff")

#: Set by the master when it made the directory itself (so that its last
#: master removes it); inherited like the directory.
MADE = "WSGI_HIJACK_HANDOFF_DIR_MADE"


class RendezvousError(RuntimeError):
    """The handoff directory cannot be trusted; the text says why."""


@dataclass(frozen=True)
class Deployment:
    """Who this process works for: the deployment's name, its hash, its secret."""

    name: str
    ident: str
    key: bytes


def deployment_name(binds: Iterable[object]) -> str:
    """``WSGI_HIJACK_DEPLOYMENT``, or else a name made of the bound addresses:
    gunicorn's parsed ``cfg.address`` (``(host, port)`` tuples, Unix socket
    paths, inherited fds), sorted, paths made absolute."""
    given = config.deployment()
    if given:
        return given
    parts = []
    for addr in binds:
        if isinstance(addr, tuple):
            parts.append(f"{addr[0]}:{addr[1]}")
        elif isinstance(addr, (str, bytes)):
            parts.append("unix:" + os.path.abspath(os.fsdecode(addr)))
        else:
            parts.append(f"fd:{addr}")
    return "bind:" + ",".join(sorted(parts))


def ident_of(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def prepare(binds: Iterable[object]) -> Path:
    """From the master's ``on_starting``: name the deployment and make its
    private directory, both exported to what the master starts. A master that
    inherits them (a binary upgrade) keeps them."""
    name = deployment_name(binds)
    os.environ["WSGI_HIJACK_DEPLOYMENT"] = name
    named = config.handoff_dir()
    if named:
        try:
            return directory()
        except RendezvousError as exc:
            log.warning("wsgi_hijack: %s; using a private directory of its own instead", exc)
    base = _base()
    path = Path(tempfile.mkdtemp(prefix=f"wsgi_hijack-{os.getuid()}-{ident_of(name)}-",
                                 dir=base))
    os.environ["WSGI_HIJACK_HANDOFF_DIR"] = str(path)
    os.environ[MADE] = str(path)
    return path


def _base() -> str:
    """``$XDG_RUNTIME_DIR`` if it is this user's own (0700), else the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        try:
            info = os.stat(runtime)
        except OSError:
            info = None
        if info is not None and stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() \
                and not info.st_mode & 0o077:
            return runtime
    return tempfile.gettempdir()


def directory() -> Path:
    """The deployment's directory (``WSGI_HIJACK_HANDOFF_DIR``, made if
    needed), checked to be this user's only."""
    named = config.handoff_dir()
    if not named:
        raise RendezvousError("WSGI_HIJACK_HANDOFF_DIR is not set (the master's on_starting "
                              "in wsgi_hijack.gunicorn_conf makes the directory)")
    path = Path(named)
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise RendezvousError(f"cannot make the handoff directory {path}: {exc}") from None
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise RendezvousError(f"{path} is not a directory of uid {os.getuid()}")
    if info.st_mode & 0o077:
        raise RendezvousError(f"{path} is open to other users (mode {info.st_mode & 0o777:o})")
    return path


def deployment(where: Path, create: bool = False) -> Deployment:
    """This process's deployment, with its secret from ``where`` (made there
    by a master, ``create``); RendezvousError if there is none to read."""
    name = config.deployment() or "unnamed"
    ident = own_ident()
    path = key_path(where, ident)
    if create and not path.exists():
        # Whole or not at all: written aside, then linked to its name, which
        # fails if another master of the deployment was first (its key wins).
        aside = where / f".{path.name}.{os.getpid()}"
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(aside)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise RendezvousError(f"no key for deployment {ident} in {where}: {exc}") from None
    with os.fdopen(fd) as source:
        info = os.fstat(source.fileno())
        key = source.read().strip()
    if info.st_uid != os.getuid() or info.st_mode & 0o077 or len(key) < 32:
        raise RendezvousError(f"{path} is not this user's own key (mode "
                              f"{info.st_mode & 0o777:o}, uid {info.st_uid})")
    return Deployment(name, ident, key.encode("ascii", "replace"))


def own_ident() -> str:
    """This process's deployment's ident (its name's hash)."""
    return ident_of(config.deployment() or "unnamed")


def key_path(where: Path, ident: str) -> Path:
    return where / f"deployment-{ident}.key"


def remove(where: Path, ident: str) -> None:
    """The last master of the deployment here leaves: its key goes, and the
    directory too if a master made it (and it is empty)."""
    if parks(where, ident):
        return  # another master of this deployment runs on (a binary upgrade)
    unmark(key_path(where, ident))
    if os.environ.get(MADE) == str(where):
        prune(where)  # (a worker killed or stopped mid-start leaves its socket)
        try:
            where.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                raise


def worker_socket(where: Path, pid: int) -> Path:
    return where / f"worker-{pid}.sock"


def park_socket(where: Path, master: int) -> Path:
    return where / f"master-{master}.sock"


def listen_socket(where: Path, master: int) -> Path:
    """gunicorn's own listening socket when each worker listens on the public
    address itself (``gunicorn_conf``): private, as nobody connects to it."""
    return where / f"listen-{master}.sock"


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


def write_workers(where: Path, master: int, workers: int, ident: str = "") -> None:
    tmp = where / f".master-{master}.json"
    tmp.write_text(json.dumps({"workers": workers, "deployment": ident}))
    tmp.replace(where / f"master-{master}.json")


def _master_info(where: Path, master: int) -> dict:
    try:
        info = json.loads((where / f"master-{master}.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def read_workers(where: Path, master: int) -> int:
    try:
        return int(_master_info(where, master)["workers"])
    except (ValueError, KeyError, TypeError):
        return 1


def of_deployment(where: Path, pid: int, ident: str) -> bool:
    """Whether ``pid`` is a worker of a master of deployment ``ident`` here
    (by its master's ``master-<pid>.json``). A hint that saves a refused
    attempt; the proof is :func:`.transport.expect`."""
    master = parent(pid)
    return master is not None and _master_info(where, master).get("deployment") == ident


def alive(pid: int) -> bool:
    return start_time(pid) is not None


def older_workers(where: Path, pid: int, ident: str | None = None) -> list[int]:
    """Live workers (taking, or leaving) that started before ``pid`` (of
    deployment ``ident`` only, if given)."""
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
        if started is not None and started < born and \
                (ident is None or of_deployment(where, int(other), ident)):
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


def parks(where: Path, ident: str | None = None) -> list[Path]:
    """Every live master's park socket here (of deployment ``ident`` only, if given)."""
    found = []
    for path in where.glob("master-*.sock"):
        pid = path.name[len("master-"):-len(".sock")]
        if pid.isdigit() and alive(int(pid)) and \
                (ident is None or _master_info(where, int(pid)).get("deployment") == ident):
            found.append(path)
    return found
