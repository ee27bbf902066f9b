"""The gunicorn master's side of the handoff: its park, and knowing when it stops.

The park (:mod:`.park`) is started from ``when_ready`` as a process of its
own and ended with the master. The master's TERM, INT and QUIT handlers are
wrapped so that the ``stopping-<pid>`` mark is made before gunicorn's own
handler runs, that is before any worker is told to stop: a worker stopping
because the master shuts down then says goodbye instead of moving its
connections to nobody. (A worker cannot tell this SIGTERM from a reload's.)
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import config
from . import rendezvous

log = logging.getLogger("wsgi_hijack.handoff")

_park: subprocess.Popen | None = None


def start(server: Any) -> None:
    """Start this master's park and watch for its shutdown; from ``when_ready``."""
    global _park
    try:
        where = rendezvous.directory()
        ident = rendezvous.deployment(where, create=True).ident
    except rendezvous.RendezvousError as exc:
        server.log.error("handoff off, held connections say goodbye at restarts: %s", exc)
        return
    rendezvous.prune(where)
    master = os.getpid()
    rendezvous.unmark(rendezvous.stopping(where, master))
    rendezvous.write_workers(where, master, server.num_workers, ident)
    _park = subprocess.Popen([sys.executable, "-m", "wsgi_hijack.handoff.park", str(where),
                              str(master)], stdin=subprocess.DEVNULL, close_fds=True)
    _wait_for(rendezvous.park_socket(where, master), 10.0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        _mark_first(sig, where, master)
    server.log.info("handoff: held connections move to the new workers on reload and "
                    "recycle (park pid %d, in %s, deployment %s)", _park.pid, where, ident)


def workers_changed(server: Any) -> None:
    """From ``on_reload``: the park spreads over as many workers as now run."""
    if _park is not None:
        where = rendezvous.directory()
        rendezvous.write_workers(where, os.getpid(), server.num_workers,
                                 rendezvous.own_ident())


def stop(server: Any) -> None:
    """From ``on_exit``: the park gives on what it still holds (to another
    master's workers, in a binary upgrade) or says its goodbye, then ends.
    The last master of the deployment removes its key (and the directory it
    made)."""
    global _park
    if _park is None:
        return
    where = rendezvous.directory()
    rendezvous.mark(rendezvous.stopping(where, os.getpid()))
    _park.terminate()  # it ends once it holds nothing
    try:
        _park.wait(config.handoff_timeout() + 5.0)
    except subprocess.TimeoutExpired:
        _park.kill()
    _park = None
    for path in (rendezvous.stopping(where, os.getpid()),
                 where / f"master-{os.getpid()}.json"):
        rendezvous.unmark(path)
    rendezvous.remove(where, rendezvous.own_ident())


def _mark_first(sig: int, where: Path, master: int) -> None:
    previous = signal.getsignal(sig)

    def handler(signum: int, frame: Any) -> None:
        rendezvous.mark(rendezvous.stopping(where, master))
        if callable(previous):
            previous(signum, frame)

    signal.signal(sig, handler)


def _wait_for(path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if _park is not None and _park.poll() is not None:
            raise RuntimeError(f"the handoff park exited at start ({_park.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the handoff park did not listen on {path} in {seconds} s")
        time.sleep(0.02)
