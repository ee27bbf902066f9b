"""Fixtures that start real servers on loopback and talk to them with raw sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free port *below* the ephemeral range: the many outgoing connections
    of load tests take ephemeral ports, and could take ours between our check
    and the server's bind."""
    from wsgi_hijack.loadclient import free_server_port

    return free_server_port()


class Server:
    """A server subprocess on 127.0.0.1:port, with its combined log."""

    def __init__(self, argv: list[str], port: int, env: dict, tmp: Path,
                 cwd: Path = ROOT) -> None:
        self.port = port
        self.log_path = tmp / f"server-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict, bytes]:
        """A plain HTTP/1.0 GET with Connection: close; returns status, headers, body."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            data = recv_until_closed(s, timeout)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        return status, headers, body

    def stats(self) -> dict:
        status, _, body = self.get("/_stats")
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def recv_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def server_env(heartbeat: float) -> dict:
    env = dict(os.environ)
    env["WSGI_HIJACK_HEARTBEAT"] = str(heartbeat)
    env["PYTHONPATH"] = str(ROOT)
    env.pop("GUNICORN_CMD_ARGS", None)
    return env


@pytest.fixture
def start_server(tmp_path):
    """start_server(kind, heartbeat=..., app=..., args=[...], env={...}) -> Server;
    stopped after the test."""
    servers: list[Server] = []

    def start(kind: str, heartbeat: float = 0.5, app: str = "tests.apps:app",
              args: tuple[str, ...] = (), env: dict | None = None,
              nofile: int | None = None) -> Server:
        port = free_port()
        cwd = ROOT
        extra_env = env
        env = server_env(heartbeat)
        env.update(extra_env or {})
        if kind == "gunicorn":
            argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"),
                    "-b", f"127.0.0.1:{port}", "--no-control-socket",
                    *args, app]
        elif kind == "gunicorn-plain":  # no config file: `gunicorn -k gevent wsgi_hijack:app`
            cwd = tmp_path  # gunicorn reads ./gunicorn.conf.py by itself: not this one
            argv = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-b", f"127.0.0.1:{port}",
                    "--no-control-socket", *args, app]
        elif kind == "pywsgi":
            argv = [sys.executable, str(ROOT / "tests" / "pywsgi_server.py"), str(port)]
        else:
            raise ValueError(kind)
        if nofile is not None:  # the server's own fd limit, soft and hard
            argv = ["bash", "-c", f'ulimit -n {nofile} && exec "$@"', "server", *argv]
        server = Server(argv, port, env, tmp_path, cwd)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(params=["gunicorn", "pywsgi"])
def server(request, start_server):
    """The test app under each gevent server, heartbeat 0.5 s."""
    return start_server(request.param)


ERROR_MARKERS = ("Traceback", "[ERROR]", "ERROR:", "Error handling request", " 500 ")


def assert_clean_log(server: Server) -> None:
    log = server.log()
    for marker in ERROR_MARKERS:
        assert marker not in log, f"{marker!r} in server log:\n{log}"


class RedisServer:
    """A real redis-server on loopback, persisting to an append-only file so
    that a restart keeps the ids and streams (as production must)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.dir = tmp / f"redis-{self.port}"
        self.dir.mkdir()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--protected-mode", "no"],
            stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(100).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.kill()
