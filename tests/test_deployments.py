"""One deployment never sees another's clients or messages (issue 22, item 1).

Two deployments of one user on one host: at a reload, the connections of
one move to its own new worker only (each deployment has its own private
rendezvous, and a successor proves it belongs to the deployment before it
gets anything); on one Redis, each hears its own messages only (the key and
channel prefix, ``WSGI_HIJACK_REDIS_PREFIX``, by default apart per db).
Real gunicorn and redis-server on loopback; the rendezvous is the default
one unless a test names it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness import servers, wire
from harness.clients import published_id, wait_for, wait_total_held
from harness.recorder import Recorder, Stream
from harness.redis_topology import ClusterSet, command
from wsgi_hijack.handoff import rendezvous, transport
from wsgi_hijack.handoff.successors import parent
from wsgi_hijack.loadclient import children

from .test_handoff import sse_events

HERE = Path(__file__).parent
HEARTBEAT = 2.0
NOBODY = 65534
TOKEN = "isolation-test"


class Site:
    """The handoff test app (``tests/handoff_app.py``) under gunicorn with
    the package's settings, on one bind: ``unix:/path`` or ``host:port``;
    one worker, the in-process bus unless ``env`` says otherwise."""

    def __init__(self, tmp: Path, name: str, bind: str, env: dict | None = None,
                 workers: int = 1, script: bool = False) -> None:
        self.name = name
        self.bind = bind
        self.workers = workers
        if bind.startswith("unix:"):
            self.address: tuple | str = bind[len("unix:"):]
            self.family = socket.AF_UNIX
        else:
            host, port = bind.rsplit(":", 1)
            self.address = (host, int(port))
            self.family = socket.AF_INET
        # script: the console script, which a binary upgrade can execute again
        # (harness.servers.argv_for says why).
        program = [str(Path(sys.executable).parent / "gunicorn")] if script \
            else [sys.executable, "-m", "gunicorn"]
        argv = [*program, "-c", str(servers.GUNICORN_CONF), "-b", bind,
                "--no-control-socket", "--workers", str(workers), "handoff_app:app"]
        # (a Unix socket's client is no loopback address: publish with a token)
        environ = servers.server_env(HEARTBEAT, PYTHONPATH=f"{servers.ROOT}:{HERE}",
                                     WEB_CONCURRENCY=str(workers),
                                     WSGI_HIJACK_PUBLISH_TOKEN=TOKEN, **(env or {}))
        for name_ in ("WSGI_HIJACK_HANDOFF_DIR", "WSGI_HIJACK_DEPLOYMENT",
                      "WSGI_HIJACK_REDIS_PREFIX", "WSGI_HIJACK_HANDOFF_DIR_MADE"):
            if name_ not in (env or {}):
                environ.pop(name_, None)
        self.server = servers.Server(argv, 0, tmp / f"gunicorn-{name}.log", env=environ,
                                     ready=self._ready, timeout=60, raise_fd_limit=True,
                                     name=f"gunicorn {name}")
        self.master = self.server.proc.pid
        wait_for(lambda: len(self.listening()) == workers, f"{name}'s workers listening", 30)

    def _ready(self, server: servers.Server) -> bool:
        return self.stats() is not None and len(server.workers()) >= self.workers

    # -- as a client ----------------------------------------------------------------

    def connect(self, data: bytes = b"", timeout: float = 10.0) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.address)
            if data:
                sock.sendall(data)
        except BaseException:
            sock.close()
            raise
        return sock

    def request(self, target: str, headers: str = "", method: str = "GET",
                body: bytes = b"") -> socket.socket:
        length = f"Content-Length: {len(body)}\r\n" if method == "POST" else ""
        head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n{length}{headers}\r\n"
        return self.connect(head.encode() + body)

    def answer(self, target: str, method: str = "GET", body: bytes = b"",
               headers: str = "") -> tuple[int, bytes]:
        with self.request(target, "Connection: close\r\n" + headers, method, body) as sock:
            data = wire.recv_until_closed(sock)
        head, _, rest = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), rest

    def stats(self) -> dict | None:
        status, body = self.answer("/_stats")
        return json.loads(body) if status == 200 else None

    def publish(self, channel: str, data: str) -> int:
        status, body = self.answer(f"/publish?channel={channel}", "POST", data.encode(),
                                   f"Authorization: Bearer {TOKEN}\r\n")
        assert status == 202, (status, body)
        return json.loads(body)["id"]

    # -- the deployment's private directory ---------------------------------------------

    @property
    def rendezvous(self) -> Path:
        found = re.findall(r"handoff: held connections move .* \(park pid \d+, in ([^,)]+)",
                           self.server.log())
        assert found, f"{self.name}: no private directory in the log:\n{self.server.log()}"
        return Path(found[0])

    def listening(self) -> list[int]:
        """This master's workers that listen for handoffs."""
        return sorted(pid for p in self.rendezvous.glob("worker-*.sock")
                      if parent(pid := int(p.name[7:-5])) == self.master)

    def stop(self) -> None:
        self.server.stop(30)


@pytest.fixture
def sites(tmp_path):
    started: list[Site] = []

    def make(name: str, bind: str, **kwargs) -> Site:
        site = Site(tmp_path, name, bind, **kwargs)
        started.append(site)
        return site

    yield make
    for site in started:
        site.stop()


def hold_sse(site: Site, recorder: Recorder, count: int, since: int) -> list[Stream]:
    streams = [recorder.add(site.request("/events?channel=news", f"Last-Event-ID: {since}\r\n"),
                            f"{site.name}{i}") for i in range(count)]
    for stream in streams:
        recorder.wait_for(stream, b"retry: 2000\n\n")
    return streams


def reload_and_wait(site: Site, held: int) -> dict:
    """HUP the site's master; wait until its park has placed the ``held``
    connections of the old worker (or said their goodbye). Returns the new
    worker's stats, with ``gave``: how many the park gave to which pid."""
    old = site.stats()["pid"]
    os.kill(site.master, signal.SIGHUP)
    wait_for(lambda: not os.path.exists(f"/proc/{old}"), f"{site.name}'s old worker's exit", 60)

    def placed() -> tuple[dict[int, int]] | None:
        log = site.server.log()
        gave: dict[int, int] = {}
        for count, taker in re.findall(rf"park: gave (\d+) connections of pid {old} to pid "
                                       r"(\d+)", log):
            gave[int(taker)] = gave.get(int(taker), 0) + int(count)
        goodbye = re.search(rf"park: \d+ connections of pid {old} get their goodbye", log)
        return (gave,) if sum(gave.values()) == held or goodbye else None

    gave = wait_for(placed, f"{site.name}'s park placing {held} connections", 60)[0]
    new = wait_for(lambda: (s := site.stats())["pid"] != old and s, f"{site.name}'s new worker")
    return {**new, "gave": gave}


def a_reload_moves_all(site: Site, count: int) -> None:
    """``count`` SSE clients held on ``site``, then a reload: its new worker
    holds every one, none was closed, each gets what is published after."""
    recorder = Recorder()
    try:
        since = site.publish("news", "first")
        clients = hold_sse(site, recorder, count, since)
        new = reload_and_wait(site, count)
        last = site.publish("news", "last")
        for stream in clients:
            recorder.wait_for(stream, b"data: last\n")
        held = site.stats()["held"]
    finally:
        recorder.stop()
    assert new["gave"] == {new["pid"]: count}, new  # all to its own new worker
    assert held == count
    for stream in clients:
        assert stream.closed_at is None and stream.heads() == 1, stream.name
        assert sse_events(stream.data) == [(last, "last")], stream.name


# -- two deployments at a reload -------------------------------------------------------------


def _binds(kind: str, tmp: Path) -> tuple[str, str]:
    if kind == "unix":
        return f"unix:{tmp}/a.sock", f"unix:{tmp}/b.sock"
    port = servers.free_port()  # one port, two addresses: the old name had only the port
    return f"127.0.0.1:{port}", f"127.0.0.2:{port}"


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_reload_moves_a_deployments_clients_to_its_own_new_worker_only(sites, tmp_path,
                                                                         kind):
    """Apps A and B of one user, on two Unix sockets (or one port on two
    addresses), SSE clients held on both; HUP A's master: A's clients stay
    with A's new worker and get A's messages only; B's worker takes nothing
    and its clients get B's messages only."""
    bind_a, bind_b = _binds(kind, tmp_path)
    a = sites("a", bind_a)
    b = sites("b", bind_b)  # its worker is younger than A's: a successor, by age
    recorder = Recorder()
    try:
        since_a, since_b = a.publish("news", "a0"), b.publish("news", "b0")
        a_clients = hold_sse(a, recorder, 4, since_a)
        b_clients = hold_sse(b, recorder, 2, since_b)
        sent_a = [(a.publish("news", f"a{i}"), f"a{i}") for i in (1, 2)]
        sent_b = [(b.publish("news", f"b{i}"), f"b{i}") for i in (1, 2)]
        b_before = b.stats()
        new_a = reload_and_wait(a, 4)
        sent_a += [(a.publish("news", f"a{i}"), f"a{i}") for i in (3, 4)]
        sent_b += [(b.publish("news", f"b{i}"), f"b{i}") for i in (3, 4)]
        for stream in a_clients:
            recorder.wait_for(stream, b"data: a4\n")
        for stream in b_clients:
            recorder.wait_for(stream, b"data: b4\n")
        b_after, a_after = b.stats(), a.stats()
    finally:
        recorder.stop()
    # All of A's to A's new worker: none to B's, which is younger than A's old one.
    assert new_a["gave"] == {new_a["pid"]: 4}, (new_a["gave"], "B's worker:", b_before["pid"])
    assert a_after["held"] == 4
    assert b_after["pid"] == b_before["pid"]
    # B's own two only, and nothing taken over.
    assert b_after["adopted"] == b_before["adopted"] == 2 and b_after["held"] == 2, b_after
    assert "took" not in b.server.log()
    for stream in a_clients:
        assert stream.closed_at is None and stream.heads() == 1, stream.name
        assert sse_events(stream.data) == sent_a, stream.name
    for stream in b_clients:
        assert stream.closed_at is None and stream.heads() == 1, stream.name
        assert sse_events(stream.data) == sent_b, stream.name
    assert "Traceback" not in a.server.log() + b.server.log()
    assert a.rendezvous != b.rendezvous


def test_two_deployments_told_to_share_a_directory_still_keep_their_clients(sites, tmp_path):
    """A bad input: A and B named the same WSGI_HIJACK_HANDOFF_DIR. A's park
    sees B's worker as a successor by age; B's worker cannot prove it belongs
    to A (it has B's key, not A's) and gets nothing; A's new worker gets
    every connection. B's worker never waits for A's bus either."""
    shared = {"WSGI_HIJACK_HANDOFF_DIR": str(tmp_path / "shared")}
    a = sites("a", f"unix:{tmp_path}/a.sock", env=shared)
    b = sites("b", f"unix:{tmp_path}/b.sock", env=shared)
    assert a.rendezvous == b.rendezvous == tmp_path / "shared"
    a_reload_moves_all(a, 4)
    assert b.stats()["adopted"] == 0 and b.stats()["held"] == 0  # (it held none)
    assert "took" not in b.server.log()
    assert len(list((tmp_path / "shared").glob("deployment-*.key"))) == 2


GREEDY_SUCCESSOR = """
import os, socket, sys
path = sys.argv[1] + f"/worker-{os.getpid()}.sock"
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(8)
print("listening", flush=True)
while True:
    conn, _ = listener.accept()
    conn.settimeout(10)
    got = []
    try:
        conn.sendall(b"D" + os.urandom(16))        # a challenge, as a worker sends
        got += socket.recv_fds(conn, 4096, 250)[1]  # the park's proof (or fds)
        conn.sendall(b"K" + os.urandom(32))         # no key: a made-up answer
        got += socket.recv_fds(conn, 1, 250)[1]
    except OSError:
        pass
    print(f"got {len(got)} fds", flush=True)
    for fd in got:
        os.close(fd)
    conn.close()
"""


def test_a_successor_without_the_deployments_key_gets_nothing(sites, tmp_path):
    """A bad input: a process of the same user listens in A's own directory
    as a worker would, younger than A's worker, and does not know A's key.
    The park asks it to prove itself; it cannot, and gets no fd; A's new
    worker gets every connection."""
    a = sites("a", f"127.0.0.1:{servers.free_port()}")
    greedy = subprocess.Popen([sys.executable, "-c", GREEDY_SUCCESSOR, str(a.rendezvous)],
                              stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        assert greedy.stdout.readline() == "listening\n"
        threading.Thread(target=lambda: lines.extend(greedy.stdout), daemon=True).start()
        a_reload_moves_all(a, 4)
    finally:
        greedy.kill()
        greedy.wait()
    assert not any(line.startswith("got") and line != "got 0 fds\n" for line in lines), lines
    assert "not a worker of this deployment" in a.server.log()


# -- a directory another user made first -----------------------------------------------------


@pytest.mark.parametrize("how", ["predictable name", "named, another user's",
                                 "named, open to all"])
def test_a_directory_made_first_by_another_user_does_not_turn_the_handoff_off(
        sites, tmp_path, how):
    """A bad input: another local user (uid 65534) made the directory first:
    at the name earlier versions used (``/tmp/wsgi_hijack-<uid>-<port>``), or
    at the one WSGI_HIJACK_HANDOFF_DIR names; or that one is open to all.
    The deployment makes a private one of its own instead, says so, and a
    reload still moves every connection."""
    port = servers.free_port()
    env = {}
    if how == "predictable name":
        taken = Path(f"/tmp/wsgi_hijack-{os.getuid()}-{port}")
        shutil.rmtree(taken, ignore_errors=True)  # (an earlier version's, left behind)
    else:
        taken = tmp_path / "taken"
        env["WSGI_HIJACK_HANDOFF_DIR"] = str(taken)
    taken.mkdir(mode=0o777)
    os.chmod(taken, 0o777)
    if how != "named, open to all":
        os.chown(taken, NOBODY, NOBODY)
    try:
        a = sites("a", f"127.0.0.1:{port}", env=env)
        where = a.rendezvous
        assert where != taken and where.name.startswith(f"wsgi_hijack-{os.getuid()}-")
        info = where.stat()
        assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700
        a_reload_moves_all(a, 3)
        log = a.server.log()
        assert "handoff off" not in log
        if how != "predictable name":
            assert f"{taken} is" in log and "private directory of its own instead" in log
        assert not any(taken.iterdir())  # nothing of ours went there
    finally:
        shutil.rmtree(taken, ignore_errors=True)


def test_a_binary_upgrade_finds_the_private_directory(sites, tmp_path):
    """USR2: gunicorn executes the new master with the environment the old
    one was started with; the deployment's name and directory still reach it
    (``pre_exec``), so the old workers' connections move to its workers. The
    directory stays while the new master runs, and goes with it."""
    a = sites("a", f"127.0.0.1:{servers.free_port()}", script=True)
    where = a.rendezvous
    recorder = Recorder()
    try:
        since = a.publish("news", "first")
        clients = hold_sse(a, recorder, 4, since)
        old_worker = a.stats()["pid"]
        os.kill(a.master, signal.SIGUSR2)
        new_master = wait_for(lambda: [int(p.name[7:-5]) for p in where.glob("master-*.sock")
                                       if int(p.name[7:-5]) != a.master],
                              "the new master's park in the same directory", 30)[0]
        # (its worker listens once it has the old worker's bus: after the QUIT)
        wait_for(lambda: children(new_master), "the new master's worker", 30)
        os.kill(a.master, signal.SIGQUIT)
        wait_for(lambda: a.server.proc.poll() is not None, "the old master's exit", 60)
        new = wait_for(lambda: (s := a.stats())["pid"] != old_worker and s["held"] == 4 and s,
                       "the new master's worker holding the connections", 30)
        last = a.publish("news", "last")
        for stream in clients:
            recorder.wait_for(stream, b"data: last\n")
    finally:
        recorder.stop()
    assert parent(new["pid"]) == new_master and new["adopted"] == 4
    for stream in clients:
        assert stream.closed_at is None and stream.heads() == 1, stream.name
        assert sse_events(stream.data) == [(last, "last")], stream.name
    assert where.is_dir()  # the new master's now
    os.kill(new_master, signal.SIGTERM)
    wait_for(lambda: not where.exists(), "the directory's removal with the last master", 60)


def test_the_private_directory_goes_with_the_last_master(sites, tmp_path):
    """The directory the master made is gone once it exits (a shutdown),
    with what a worker killed by SIGKILL left there."""
    a = sites("a", f"127.0.0.1:{servers.free_port()}")
    where = a.rendezvous
    assert any(where.glob("deployment-*.key"))
    killed = a.listening()[0]
    os.kill(killed, signal.SIGKILL)
    wait_for(lambda: a.listening() and a.listening() != [killed], "the replacement")
    assert rendezvous.worker_socket(where, killed).exists()  # left behind
    a.stop()
    assert not where.exists()


# -- gunicorn's own listening socket, with a worker per SO_REUSEPORT socket --------------------


def test_the_shared_listening_socket_is_in_the_private_directory_and_0600(sites, tmp_path):
    """With two workers each listens on the public address itself, and
    gunicorn's own socket moves to a Unix socket nobody uses: in the
    deployment's private directory (0700), mode 0600; not at a predictable
    name in /tmp."""
    a = sites("a", f"127.0.0.1:{servers.free_port()}", workers=2,
              env={"WSGI_HIJACK_ALLOW_LOCAL_BUS": "1"})
    found = re.findall(r"gunicorn's shared socket is unix:(\S+)", a.server.log())
    assert found, a.server.log()
    path = Path(found[0])
    assert path.parent == a.rendezvous, (path, a.rendezvous)
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(a.rendezvous.stat().st_mode) == 0o700
    assert not os.path.exists(f"/tmp/wsgi_hijack-{a.master}.sock")


# -- two deployments on one Redis ----------------------------------------------------------------


def _redis_site(start_server, url: str, **env: str) -> servers.Server:
    server = start_server("gunicorn", heartbeat=0.5, args=("--workers", "1"),
                          env={"WSGI_HIJACK_REDIS_URL": url, **env})
    wait_total_held(server, 1, 0, timeout=20)
    return server


def _only_own(start_server, url_a: str, url_b: str, env_a: dict, env_b: dict) -> None:
    a = _redis_site(start_server, url_a, **env_a)
    b = _redis_site(start_server, url_b, **env_b)
    a_clients = [wire.request(a.port, "/events?channel=news") for _ in range(3)]
    b_clients = [wire.request(b.port, "/events?channel=news") for _ in range(3)]
    seen = {s: wire.read_until(s, b"retry: 2000\n\n") for s in a_clients + b_clients}
    wait_total_held(a, 1, 3)
    wait_total_held(b, 1, 3)
    sent_a, sent_b = [], []
    for i in range(3):
        sent_b.append((published_id(b, "news", f"b{i}"), f"b{i}"))
        sent_a.append((published_id(a, "news", f"a{i}"), f"a{i}"))
    # Each one's last message comes after everything the other published:
    # anything of the other's would have arrived before it.
    sent_a.append((published_id(a, "news", "a-end"), "a-end"))
    sent_b.append((published_id(b, "news", "b-end"), "b-end"))
    for clients, sent, end in ((a_clients, sent_a, b"a-end"), (b_clients, sent_b, b"b-end")):
        for s in clients:
            with s:
                data = wire.read_until(s, b"data: " + end + b"\n\n", seen[s])
            assert sse_events(data) == sent, (sent, data)
    # A replay (Last-Event-ID) reads its own history only.
    for server, sent in ((a, sent_a), (b, sent_b)):
        with wire.request(server.port, "/events?channel=news",
                          f"Last-Event-ID: {sent[0][0]}\r\n") as s:
            data = wire.read_until(s, f"data: {sent[-1][1]}\n\n".encode())
        assert sse_events(data) == sent[1:]


def test_two_deployments_on_two_dbs_of_one_redis_hear_only_their_own(start_server,
                                                                    redis_server):
    """Pub/sub ignores the db number: by default each db has its own prefix
    (``wsgi_hijack:`` on db 0, as before; ``wsgi_hijack:<db>:`` on others)."""
    url_b = redis_server.url.rsplit("/", 1)[0] + "/1"
    _only_own(start_server, redis_server.url, url_b, {}, {})
    assert sorted(keys(redis_server, 0)) == ["wsgi_hijack:id", "wsgi_hijack:s:news"]
    assert sorted(keys(redis_server, 1)) == ["wsgi_hijack:1:id", "wsgi_hijack:1:s:news"]


def keys(redis_server, db: int) -> list[str]:
    import redis

    client = redis.Redis(host=wire.HOST, port=redis_server.port, db=db, decode_responses=True)
    try:
        return client.keys("*")
    finally:
        client.close()


def test_two_deployments_with_two_prefixes_on_one_db_hear_only_their_own(start_server,
                                                                         redis_server):
    """WSGI_HIJACK_REDIS_PREFIX: keys, streams and pub/sub channels all carry it."""
    _only_own(start_server, redis_server.url, redis_server.url,
              {"WSGI_HIJACK_REDIS_PREFIX": "app-a:"}, {"WSGI_HIJACK_REDIS_PREFIX": "app-b:"})
    assert sorted(keys(redis_server, 0)) == ["app-a:id", "app-a:s:news", "app-b:id",
                                             "app-b:s:news"]
    channels = command(redis_server.port, "PUBSUB", "CHANNELS", "*")
    assert channels and all(c.startswith(("app-a:", "app-b:")) for c in channels), channels


@pytest.mark.redis
@pytest.mark.slow
def test_two_deployments_with_two_prefixes_on_one_redis_cluster_hear_only_their_own(
        start_server, tmp_path):
    """The same on Redis Cluster (db 0 only): both deployments' channel
    ``news`` hashes to one shard, and each hears its own sharded pub/sub only."""
    cluster = ClusterSet(tmp_path / "cluster")
    try:
        _only_own(start_server, cluster.url(), cluster.url(),
                  {"WSGI_HIJACK_REDIS_PREFIX": "app-a:"}, {"WSGI_HIJACK_REDIS_PREFIX": "app-b:"})
        found = sorted(k for port in cluster.master_ports() for k in command(port, "KEYS", "*"))
        assert found == ["app-a:{news}:id", "app-a:{news}:s", "app-b:{news}:id",
                         "app-b:{news}:s"], found
    finally:
        cluster.stop()


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_redis_prefix_setting(monkeypatch):
    from wsgi_hijack import config

    monkeypatch.delenv("WSGI_HIJACK_REDIS_PREFIX", raising=False)
    assert config.redis_prefix(0) == "wsgi_hijack:"
    assert config.redis_prefix(3) == "wsgi_hijack:3:"
    monkeypatch.setenv("WSGI_HIJACK_REDIS_PREFIX", "shop.prod:")
    assert config.redis_prefix(3) == "shop.prod:"
    for bad in ("a{b}:", "with space", "x" * 65, "ünï:"):
        monkeypatch.setenv("WSGI_HIJACK_REDIS_PREFIX", bad)
        with pytest.raises(ValueError, match="WSGI_HIJACK_REDIS_PREFIX"):
            config.redis_prefix(0)


@pytest.mark.unit
def test_the_buses_use_the_prefix_for_keys_and_channels(monkeypatch):
    from wsgi_hijack.redis_bus import RedisBus
    from wsgi_hijack.redis_cluster_bus import RedisClusterBus

    monkeypatch.delenv("WSGI_HIJACK_REDIS_PREFIX", raising=False)
    assert RedisBus("redis://127.0.0.1:1/0")._keys("n") == (
        "wsgi_hijack:id", "wsgi_hijack:s:n", "wsgi_hijack:c:n", "wsgi_hijack:ev:n")
    assert RedisBus("redis://127.0.0.1:1/2")._keys("n")[2] == "wsgi_hijack:2:c:n"
    assert RedisBus("redis://127.0.0.1:1?db=4").prefix == "wsgi_hijack:4:"
    assert RedisBus("redis+sentinel://127.0.0.1:1/m/5").prefix == "wsgi_hijack:5:"
    assert RedisClusterBus("redis+cluster://127.0.0.1:1")._keys("n")[2] == "wsgi_hijack:{n}:c"
    monkeypatch.setenv("WSGI_HIJACK_REDIS_PREFIX", "a:")
    assert RedisBus("redis://127.0.0.1:1/2")._keys("n") == ("a:id", "a:s:n", "a:c:n", "a:ev:n")
    assert RedisClusterBus("redis+cluster://127.0.0.1:1")._keys("n") == (
        "a:{n}:id", "a:{n}:s", "a:{n}:c", "a:{n}:ev")


@pytest.mark.unit
def test_what_names_a_deployment(monkeypatch, tmp_path):
    monkeypatch.delenv("WSGI_HIJACK_DEPLOYMENT", raising=False)
    monkeypatch.chdir(tmp_path)
    one = rendezvous.deployment_name([("127.0.0.1", 8000), "app.sock"])
    assert one == f"bind:127.0.0.1:8000,unix:{tmp_path}/app.sock"
    assert rendezvous.deployment_name(["app.sock", ("127.0.0.1", 8000)]) == one  # sorted
    assert rendezvous.deployment_name([("127.0.0.2", 8000)]) != \
        rendezvous.deployment_name([("127.0.0.1", 8000)])
    monkeypatch.setenv("WSGI_HIJACK_DEPLOYMENT", "shop")
    assert rendezvous.deployment_name([("127.0.0.1", 8000)]) == "shop"
    assert len(rendezvous.ident_of("shop")) == 16


@pytest.mark.unit
def test_a_proof_needs_the_deployments_key():
    """The handshake both ways: the same ident and key pass; another
    deployment's ident, or the right ident without the key, is refused with
    the reason, on both sides."""
    def run(server_side: tuple[str, bytes], client_side: tuple[str, bytes]):
        a, b = socket.socketpair()
        result: dict = {}

        def serve():
            try:
                result["server"] = transport.expect(a, *server_side)
            except transport.HandoffError as exc:
                result["server"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            result["client"] = transport.prove(b, *client_side)
        except transport.HandoffError as exc:
            result["client"] = exc
        thread.join(10)
        a.close()
        b.close()
        return result["server"], result["client"]

    mine = ("0123456789abcdef", b"k" * 64)
    assert run(mine, mine) == (os.getpid(), os.getpid())
    server, client = run(mine, ("fedcba9876543210", b"k" * 64))
    assert "belongs to deployment 'fedcba9876543210'" in str(server) and \
        "belongs to deployment" in str(client)
    server, client = run(mine, ("0123456789abcdef", b"x" * 64))
    assert "did not prove" in str(server) and "did not prove" in str(client)
