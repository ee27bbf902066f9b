"""gunicorn settings for wsgi_hijack, shipped with the package:

    gunicorn -c python:wsgi_hijack.gunicorn_conf wsgi_hijack:app

Every value can be overridden on the command line or in GUNICORN_CMD_ARGS;
an own config file can start with ``from wsgi_hijack.gunicorn_conf import *``
(the repository's ``gunicorn.conf.py`` is just that).

What it sets, and why:

- the worker classes of :mod:`wsgi_hijack.workers` (``-k gevent`` and
  ``-k gthread`` are mapped to them): connections wait for their request
  head in the lobby, for ``WSGI_HIJACK_HEAD_TIMEOUT`` seconds, and accepting
  never passes the fd limit;
- the soft ``RLIMIT_NOFILE`` raised to the hard one (each held connection
  is one fd);
- one ``SO_REUSEPORT`` listener per worker, a cross-worker bus required for
  several workers, Prometheus metrics summed over workers;
- the reactor started in each worker; at worker exit, its held connections
  move to the successor worker (a reload, a recycle: :mod:`wsgi_hijack.handoff`),
  or get their goodbye when the master shuts down (``WSGI_HIJACK_HANDOFF=0``:
  always the goodbye).
"""

import json
import logging
import os
import resource
import socket
import tempfile
from pathlib import Path

bind = os.environ.get("WSGI_HIJACK_BIND", "127.0.0.1:8000")
worker_class = "wsgi_hijack.workers.ggevent.GeventWorker"
#: gunicorn's own worker names, mapped to ours in on_starting (``-k gevent``
#: on the command line then still gets the lobby).
OUR_WORKERS = {
    "gevent": "wsgi_hijack.workers.ggevent.GeventWorker",
    "gthread": "wsgi_hijack.workers.gthread.ThreadWorker",
}
workers = int(os.environ.get("WEB_CONCURRENCY", "1"))
# Requests being *handled* at once. Hijacked connections leave the pool at
# once, and connections waiting for their head wait in the lobby without a
# greenlet, so this bounds neither how many a worker holds nor how many it
# accepts ahead in a storm (benchmarks/results/storm.md).
worker_connections = 1000
# The kernel caps the backlog at net.core.somaxconn; in a connect storm this
# queue, and how fast the worker empties it (above), decide whose SYN waits
# for a retransmission (benchmarks/results/storm.md).
backlog = 4096
# Seconds between two requests on one connection. The first request head
# has its own deadline, WSGI_HIJACK_HEAD_TIMEOUT (30 s), in the lobby.
keepalive = 5


# Metrics from every worker (prometheus-client's multiprocess mode): each
# worker writes its values under this directory and /metrics sums them. It must
# be set before prometheus_client is imported anywhere, hence here, at load.
_own_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _own_metrics_dir = tempfile.mkdtemp(prefix="wsgi_hijack-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_dir


def on_exit(server):
    if _handoff():
        from wsgi_hijack.handoff import master

        master.stop(server)  # (and the private directory, if this was its last master)
    elif os.environ.get("WSGI_HIJACK_HANDOFF_DIR"):
        from wsgi_hijack.handoff import rendezvous

        rendezvous.remove(Path(os.environ["WSGI_HIJACK_HANDOFF_DIR"]), "")
    if _own_metrics_dir and server.pid == os.getpid():
        import shutil

        shutil.rmtree(_own_metrics_dir, ignore_errors=True)


def child_exit(server, worker):
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid)  # a dead worker's held connections do not count


def _raise_nofile() -> tuple[int, int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# The bus that carries published messages to every worker: Redis when set
# (here or in WSGI_HIJACK_REDIS_URL), else each worker's own in-process bus.
redis_url = os.environ.get("WSGI_HIJACK_REDIS_URL", "")


def _our_worker_class(server) -> None:
    ours = OUR_WORKERS.get(server.cfg.worker_class_str)
    if ours is None:
        return
    server.cfg.set("worker_class", ours)
    server.worker_class = server.cfg.worker_class
    server.log.info("worker class %s (waits for request heads in the lobby)", ours)


def on_reload(server):
    # A reload (HUP) reads the settings again, -k from the command line too.
    _our_worker_class(server)
    if _handoff():
        from wsgi_hijack.handoff import master

        master.workers_changed(server)


def _handoff() -> bool:
    from wsgi_hijack import config

    return config.handoff_enabled()


def _private_dir(server) -> None:
    # The deployment's private directory (0700, a random name nobody could
    # make first), named after what identifies the deployment: its bound
    # addresses, or WSGI_HIJACK_DEPLOYMENT. The handoff's sockets and
    # gunicorn's own listening socket (with a worker per SO_REUSEPORT socket)
    # live there; the workers, the park and a binary upgrade's new master
    # inherit it from here (wsgi_hijack/handoff/rendezvous.py).
    if _handoff() or _per_worker(server):
        from wsgi_hijack.handoff import rendezvous

        where = rendezvous.prepare(server.cfg.address)
        server.log.info("deployment %r, private directory %s",
                        os.environ["WSGI_HIJACK_DEPLOYMENT"], where)


def pre_exec(server):
    # A binary upgrade (USR2): gunicorn forks, runs this, and executes the
    # new master with the environment the old one was *started* with
    # (cfg.env_orig), not its own. The deployment's name and private
    # directory must reach the new master: its workers succeed this one's.
    from wsgi_hijack.handoff import rendezvous

    for name in ("WSGI_HIJACK_DEPLOYMENT", "WSGI_HIJACK_HANDOFF_DIR", rendezvous.MADE):
        if name in os.environ:
            server.cfg.env_orig[name] = os.environ[name]


def _private_listeners(server) -> None:
    # gunicorn binds a Unix socket with its umask (0 by default): 0777. Its
    # socket in the private directory is nobody's business but ours: 0600.
    where = os.environ.get("WSGI_HIJACK_HANDOFF_DIR")
    for listener in getattr(server, "LISTENERS", []):
        sock = getattr(listener, "sock", None)
        if where and sock is not None and sock.family == socket.AF_UNIX:
            name = os.fsdecode(sock.getsockname() or "")
            if name and os.path.dirname(name) == where and os.path.exists(name):
                os.chmod(name, 0o600)


def when_ready(server):
    _private_listeners(server)
    if _handoff():
        from wsgi_hijack.handoff import master

        master.start(server)


def on_starting(server):
    _our_worker_class(server)
    soft, hard, now = _raise_nofile()
    server.log.info("RLIMIT_NOFILE: soft %d, hard %d; soft now %d (each held "
                    "connection is one fd)", soft, hard, now)
    if redis_url:
        from wsgi_hijack import config, redis_connect

        try:
            target = redis_connect.parse(redis_url)
            prefix = config.redis_prefix(redis_connect.database(target))
        except ValueError as exc:
            raise SystemExit(f"wsgi_hijack: {exc}") from None
        os.environ["WSGI_HIJACK_REDIS_URL"] = redis_url  # inherited by the workers
        server.log.info("bus: Redis, %s, keys and channels under %r", target.describe(), prefix)
    elif server.cfg.workers > 1 and os.environ.get("WSGI_HIJACK_ALLOW_LOCAL_BUS") != "1":
        # Each worker would have its own bus: a publish would reach only the
        # clients of the worker that took the POST. Refuse rather than lose.
        raise SystemExit(
            f"wsgi_hijack: {server.cfg.workers} workers need a cross-worker bus: set "
            "WSGI_HIJACK_REDIS_URL (or redis_url in gunicorn.conf.py). If your app never "
            "publishes, set WSGI_HIJACK_ALLOW_LOCAL_BUS=1.")
    _private_dir(server)
    _listen_per_worker(server)
    _keep_listening_per_worker(server)


# Spreading connections evenly over workers. gunicorn's workers share one
# listening socket, and whichever wakes first accepts: a busy moment can give
# one worker far more than its share, and a worker stops at its fd limit.
# With SO_REUSEPORT each worker gets its own socket on the public address and
# the kernel spreads new connections over them by hash, evenly. gunicorn's
# shared socket then moves to a private Unix socket that no client uses (were
# it in the same SO_REUSEPORT group, connections queued on it, which no worker
# accepts, would hang). WSGI_HIJACK_REUSEPORT=0 keeps gunicorn's own way.
# Two workers, each with its own queue, in a storm: benchmarks/results/storm.md.
reuse_port_per_worker = os.environ.get("WSGI_HIJACK_REUSEPORT", "1") != "0"


def _per_worker(server) -> bool:
    return server.cfg.workers >= 2 and reuse_port_per_worker and \
        any(isinstance(addr, tuple) for addr in server.cfg.address)


def _listen_per_worker(server):
    if not _per_worker(server):
        return
    from wsgi_hijack.handoff import rendezvous

    public = [addr for addr in server.cfg.address if isinstance(addr, tuple)]
    others = [b for b in server.cfg.bind if not _is_tcp(b)]
    # In the deployment's private directory (0700), not at a name in /tmp
    # that another user could take first; 0600 once bound (when_ready).
    where = rendezvous.prepare(server.cfg.address)
    private = f"unix:{rendezvous.listen_socket(where, os.getpid())}"
    os.environ["WSGI_HIJACK_PUBLIC_BIND"] = json.dumps(public)
    server.cfg.set("bind", [private, *others])
    server.log.info("each worker listens on %s with SO_REUSEPORT; gunicorn's shared "
                    "socket is %s", ", ".join(f"{h}:{p}" for h, p in public), private)


def _keep_listening_per_worker(server) -> None:
    # A reload (HUP) reads the command line again, -b too, and gunicorn then
    # binds the public address itself unless the settings still name the
    # private socket: it would find the port taken by the workers' own
    # sockets and give up. So the private bind is set again after each
    # reading of the settings, before gunicorn compares addresses.
    setup = server.setup

    def setup_again(app):
        setup(app)
        _listen_per_worker(server)

    server.setup = setup_again


def _is_tcp(bind: str) -> bool:
    return not (bind.startswith("unix:") or bind.startswith("fd://"))


def _reuseport_listeners(worker):
    # gevent sockets for the gevent workers; plain ones for sync and gthread,
    # whose threads must not meet a gevent socket (nor its hub).
    if "gevent" in type(worker).__module__:
        from gevent import socket as socket_module
    else:
        socket_module = socket

    listeners = []
    for host, port in json.loads(os.environ["WSGI_HIJACK_PUBLIC_BIND"]):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket_module.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(worker.cfg.backlog)
        listeners.append(sock)
    return listeners


def post_worker_init(worker):
    # Start the reactor after the fork, in the worker's gevent hub, so that
    # heartbeats run even before the first hijack.
    from wsgi_hijack import config
    from wsgi_hijack.reactor import get_reactor

    logger = logging.getLogger("wsgi_hijack")
    if not logger.handlers:  # log where gunicorn logs
        for handler in logging.getLogger("gunicorn.error").handlers:
            logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(config.log_level())
    if os.environ.get("WSGI_HIJACK_PUBLIC_BIND"):
        worker.sockets = _reuseport_listeners(worker)
        if hasattr(worker, "wait_fds"):  # the sync worker selects on these
            worker.wait_fds = worker.sockets + [worker.PIPE[0]]
    if _handoff() and "gevent" in type(worker).__module__:
        from wsgi_hijack.handoff import worker as handoff

        # Before the reactor starts: with the in-process bus, the old worker's
        # history and ids come first.
        handoff.start(worker.wsgi, worker.cfg.workers, worker.notify)
    get_reactor()
    if not type(worker).__module__.startswith("wsgi_hijack.workers"):
        from wsgi_hijack.workers import checks

        checks.run_checks(worker.cfg, own_lobby=False, logger=worker.log)


def worker_exit(server, worker):
    from wsgi_hijack.handoff import worker as handoff
    from wsgi_hijack.reactor import current_reactor

    reactor = current_reactor()  # this process's, if it runs
    if reactor is not None:
        handoff.leave(reactor)  # to the successor; or the goodbye


__all__ = [
    "bind", "worker_class", "workers", "worker_connections", "backlog", "keepalive",
    "redis_url", "on_starting", "on_reload", "on_exit", "child_exit", "post_worker_init",
    "worker_exit", "when_ready", "pre_exec",
    "OUR_WORKERS",
]
