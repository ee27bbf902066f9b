"""One way to start and stop every server the tests and benchmarks run.

Every server is a subprocess on 127.0.0.1, in a session (process group) of
its own, with stdout and stderr in one log file. Starting waits until it is
ready (by default: its port accepts a connection), and fails with the log if
it exits or does not get ready in time. Stopping sends SIGTERM to the whole
group (a gunicorn master and its workers, or ``bash -c 'ulimit ...; exec'``
and what it runs), then SIGKILL after a timeout, so no worker outlives a
test. :func:`start` knows each kind's command line and quirks; :class:`Server`
runs any command line; :class:`RedisServer` is redis-server with a restart.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import wire

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
WSGI_SERVER = Path(__file__).resolve().parent / "wsgi_server.py"
# The seed (the 2018 gist, a Rack app) that the storm benchmark runs on Puma.
SEED_CONFIG = ROOT.parent / "shared" / "mission" / "seed_config.ru"
UWSGI = shutil.which("uwsgi") or (Path(sys.executable).parent / "uwsgi").as_posix()
# What the reactor logs after each heartbeat's write run.
WRITE_RUN_RE = re.compile(rb"Number of clients connected: (\d+), time for entire write run: "
                          rb"([0-9.]+) s")
# Settings in the caller's environment that would change what a server runs
# (gunicorn options, worker counts, Puma's threads): never inherited.
_NOT_INHERITED = ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY", "PUMA_MIN_THREADS",
                  "PUMA_MAX_THREADS", "MIN_THREADS", "MAX_THREADS")
# Python WSGI servers with no command line of their own: harness/wsgi_server.py.
SCRIPT_KINDS = ("pywsgi", "werkzeug", "werkzeug-debug", "wsgiref")


def free_port() -> int:
    """A free port *below* the ephemeral range: the many outgoing connections
    of load tests take ephemeral ports, and could take ours between our check
    and the server's bind."""
    from wsgi_hijack.loadclient import free_server_port

    return free_server_port()


def raise_nofile() -> None:
    """Raise this process's soft fd limit to its hard one (a server or client
    holding thousands of connections needs one fd each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def server_env(heartbeat: float | None = None, root: Path = ROOT, **extra: str) -> dict:
    """The environment for a server: ours, with ``root`` on ``PYTHONPATH`` (so
    the server runs this tree's code, not an installed copy), unbuffered
    output (the log is read while it runs), the heartbeat if given, and
    nothing that would change the command line behind our back
    (``GUNICORN_CMD_ARGS``, ``WEB_CONCURRENCY``, Puma's threads)."""
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
    for name in _NOT_INHERITED:
        env.pop(name, None)
    if heartbeat is not None:
        env["WSGI_HIJACK_HEARTBEAT"] = str(heartbeat)
    env.update(extra)
    return env


def port_open(server: Server) -> bool:
    """Ready when the port accepts a connection (the default readiness check)."""
    socket.create_connection((wire.HOST, server.port), timeout=1).close()
    return True


def answers_http(server: Server) -> bool:
    """Ready when a request gets a status line: a worker, not just the
    master's listening socket, is there. What it answers does not matter.
    The answer is read to its end (HTTP/1.0: the server closes), so that the
    worker's fd for it is closed before anyone counts the worker's fds; an
    app that streams on any path is ready too, once a second has passed."""
    with wire.connect(server.port, b"GET /wsgi-hijack-ready HTTP/1.0\r\n\r\n",
                      timeout=5) as s:
        answered = wire.read_until(s, b"\r\n").startswith(b"HTTP/")
        deadline = time.monotonic() + 1.0
        s.settimeout(0.2)
        while time.monotonic() < deadline:  # (a stream may never end, nor pause)
            try:
                if not s.recv(65536):
                    break
            except TimeoutError:
                pass
        return answered


def workers_ready(count: int = 1) -> Callable[[Server], bool]:
    """Ready when a worker answers and the process has ``count`` children
    (gunicorn's workers): measurements read the workers' /proc.

    The answer comes first: until a worker has been forked, the master's
    handoff park may be a child still between fork and exec, with the
    master's command line, and so counted as a worker. Workers are forked
    only after the park has exec'd, so once one answers the count is right."""
    def ready(server: Server) -> bool:
        return answers_http(server) and len(server.workers()) >= count
    return ready


class Server:
    """A server subprocess on 127.0.0.1:``port``, with its combined log.

    ``ready(server)`` is polled (every 50 ms, an ``OSError`` counting as not
    yet) until it returns true; ``timeout`` bounds the start. ``raise_fd_limit``
    gives the server its hard fd limit as its soft one (see :func:`raise_nofile`).
    """

    def __init__(self, argv: Sequence[str], port: int, log_path: Path,
                 env: dict | None = None, cwd: Path = ROOT,
                 ready: Callable[[Server], bool] = port_open, timeout: float = 20.0,
                 stop_timeout: float = 10.0, raise_fd_limit: bool = False,
                 name: str = "server") -> None:
        self.argv = list(argv)
        self.port = port
        self.name = name
        self.log_path = log_path
        self.stop_timeout = stop_timeout
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=server_env() if env is None else env,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=raise_nofile if raise_fd_limit else None)
        try:
            self._wait_ready(ready, timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://{wire.HOST}:{self.port}/"

    def _wait_ready(self, ready: Callable[[Server], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n"
                                   f"{self.log()[-3000:]}")
            try:
                if ready(self):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start in {timeout:g} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The server's child processes (a gunicorn master's workers)."""
        from wsgi_hijack.loadclient import children

        return children(self.proc.pid)

    def write_runs(self, connections: int | None = None) -> list[float]:
        """Seconds of each heartbeat write run the log reports (with exactly
        ``connections`` clients, if given)."""
        return [float(t) for c, t in WRITE_RUN_RE.findall(self.log_path.read_bytes())
                if connections is None or int(c) == connections]

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict, bytes]:
        """A plain HTTP/1.0 GET with Connection: close; returns status, headers, body."""
        return wire.http_get(self.port, path, timeout)

    def stats(self) -> dict:
        """The test app's ``/_stats`` (the reactor's counters of the worker that answers)."""
        return wire.get_json(self.port, "/_stats")

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to the process group; SIGKILL if it has not exited after ``timeout``."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def argv_for(kind: str, port: int, app: str = "wsgi_hijack:app",
             args: Sequence[str] = (), config: Path | str = GUNICORN_CONF,
             tls: tuple[Path, Path] | None = None) -> list[str]:
    """The command line of a server ``kind`` on ``port`` serving ``app``;
    HTTPS with ``tls`` (a certificate and its key, :func:`harness.tls.make_certificate`):
    gunicorn's ``--certfile``/``--keyfile``, pywsgi's and Werkzeug's own
    arguments (``harness/wsgi_server.py``), uWSGI's ``--https-socket``.

    - ``gunicorn``: with the project's settings (``config``: its workers, the
      lobby, SO_REUSEPORT per worker; or ``python:wsgi_hijack.gunicorn_conf``);
      ``gunicorn-script`` the same through the console script;
    - ``gunicorn-plain``: no settings file; gunicorn's own gevent worker
      unless ``args`` name another (``-k``);
    - ``pywsgi``, ``werkzeug``, ``werkzeug-debug``, ``wsgiref``:
      ``harness/wsgi_server.py``;
    - ``uwsgi`` (``--http-socket``: the worker owns the client's socket) and
      ``uwsgi-router`` (``--http``: uWSGI's router in front of the worker);
    - ``puma``: ``app`` is a Rack config file (the seed's).

    ``args`` go before the app."""
    bind = f"{wire.HOST}:{port}"
    if tls is not None and kind.startswith("gunicorn"):
        args = ("--certfile", str(tls[0]), "--keyfile", str(tls[1]), *args)
    elif tls is not None and kind in SCRIPT_KINDS:
        args = (str(tls[0]), str(tls[1]), *args)
    elif tls is not None and kind != "uwsgi":
        raise ValueError(f"no TLS for server kind {kind!r}")
    if kind in ("gunicorn", "gunicorn-script"):
        # gunicorn-script: the console script, as operators run it. A binary
        # upgrade (USR2) executes the master's argv again, and ``python -m
        # gunicorn`` would come back as ``python .../gunicorn/__main__.py``,
        # whose directory shadows the standard library's ``http``.
        program = [str(Path(sys.executable).parent / "gunicorn")] if kind == "gunicorn-script" \
            else [sys.executable, "-m", "gunicorn"]
        return [*program, "-c", str(config), "-b", bind, "--no-control-socket", *args, app]
    if kind == "gunicorn-plain":
        worker = () if "-k" in args else ("-k", "gevent")
        return [sys.executable, "-m", "gunicorn", *worker, "-b", bind,
                "--no-control-socket", *args, app]
    if kind in SCRIPT_KINDS:
        return [sys.executable, str(WSGI_SERVER), kind, str(port), app, *args]
    if kind in ("uwsgi", "uwsgi-router"):
        listen = "--http" if kind == "uwsgi-router" else "--http-socket"
        if tls is not None:
            listen, bind = "--https-socket", f"{bind},{tls[0]},{tls[1]}"
        return [UWSGI, listen, bind, "--module", app, "--master", "--processes", "1",
                "--enable-threads", "--die-on-term", "--need-app", "--pythonpath", str(ROOT),
                *args]
    if kind == "puma":
        # Single mode (-w 0) and --no-config: one process, its default backlog
        # and threads, as the seed was run; no config file found by accident.
        return ["puma", "--no-config", "-w", "0", "-b", f"tcp://{bind}", *args, app]
    raise ValueError(f"unknown server kind {kind!r}")


def start(kind: str, log_dir: Path, app: str = "wsgi_hijack:app", args: Sequence[str] = (),
          env: dict | None = None, heartbeat: float | None = None, nofile: int | None = None,
          soft_nofile: int | None = None, port: int | None = None, root: Path = ROOT,
          config: Path | str | None = None, tls: tuple[Path, Path] | None = None,
          **options) -> Server:
    """Start a server of ``kind`` (see :func:`argv_for`) on a free port;
    HTTPS with ``tls``, (certificate, key), ready once it answers a request
    over TLS (:func:`harness.tls.answers_https`).

    ``env`` is added to :func:`server_env`; ``nofile`` sets the server's own
    fd limit, soft and hard (through ``bash -c 'ulimit -n'``), ``soft_nofile``
    the soft one only; ``root`` is the tree whose code and ``gunicorn.conf.py``
    run (a baseline checkout, say); ``config``: gunicorn's settings, if not
    ``root``'s ``gunicorn.conf.py``.
    ``options`` go to :class:`Server` (``ready``, ``timeout``, ``raise_fd_limit``...).

    The working directory matters: gunicorn reads ``./gunicorn.conf.py`` by
    itself, so ``gunicorn-plain`` runs in ``log_dir``; Puma runs next to its
    config file."""
    port = free_port() if port is None else port
    argv = argv_for(kind, port, app, args, config=config or root / "gunicorn.conf.py", tls=tls)
    if tls is not None:
        from .tls import answers_https

        options.setdefault("ready", answers_https)
    cwd = root
    if kind == "gunicorn-plain":
        cwd = log_dir
    elif kind == "puma":
        cwd = Path(app).parent
    if kind.startswith("uwsgi") and not os.path.exists(UWSGI):
        # scripts/test.sh installs it (setup.cfg's test extra): missing is a
        # broken set-up, not a reason to skip.
        raise RuntimeError(f"uwsgi not found at {UWSGI}: pip install -e '.[test]'")
    if nofile is not None or soft_nofile is not None:  # the server's own fd limit
        limit = f"-n {nofile}" if nofile is not None else f"-Sn {soft_nofile}"
        argv = ["bash", "-c", f'ulimit {limit} && exec "$@"', kind, *argv]
    options.setdefault("name", kind)
    return Server(argv, port, log_dir / f"{kind}-{port}.log",
                  env=server_env(heartbeat, root=root, **(env or {})), cwd=cwd, **options)


def run_benchmark(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` to its end, as a file from the repository
    root, the way its docstring tells a user to; output captured as text."""
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# What must not be in the log of a server that did its job.
ERROR_MARKERS = ("Traceback", "[ERROR]", "ERROR:", "Error handling request", " 500 ")


def assert_clean_log(server: Server) -> None:
    """No traceback, error line or 500 answer in the server's log."""
    log = server.log()
    for marker in ERROR_MARKERS:
        assert marker not in log, f"{marker!r} in server log:\n{log}"


def redis_ping(server: Server) -> bool:
    """Ready when redis-server answers PING."""
    with wire.connect(server.port, b"PING\r\n", timeout=1) as s:
        return s.recv(100).startswith(b"+PONG")


class RedisServer:
    """A real redis-server on loopback, persisting to an append-only file so
    that a restart (:meth:`kill`, then :meth:`start`) keeps the ids and streams,
    as production must."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir()
        self.server: Server | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{wire.HOST}:{self.port}/0"

    def start(self) -> None:
        self.server = Server(
            ["redis-server", "--port", str(self.port), "--bind", wire.HOST,
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no"],
            self.port, self.dir / "redis.log", ready=redis_ping, timeout=10,
            name="redis-server")

    def kill(self) -> None:
        """SIGKILL: an outage, not a shutdown."""
        if self.server is not None:
            self.server.kill()
