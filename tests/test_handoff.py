"""Held connections survive worker restarts (wsgi_hijack.handoff), on real gunicorn.

Each test deploys ``tests/handoff_app.py`` (copied, so that a test can change
its code between the old worker and the new), holds real client connections
of every protocol, publishes through ``POST /publish`` and from an OS thread
in the app ten times a second, restarts the worker the way an operator or
gunicorn does, and checks what each client received: no close, no second
head, every message once and in order, heartbeats on, the new code framing
what follows.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import wsproto
from wsproto.events import AcceptConnection, Message, Request, TextMessage

from harness import servers, wire
from harness.clients import wait_for
from harness.recorder import Recorder, Stream
from wsgi_hijack.handoff import rendezvous, transport
from wsgi_hijack.handoff.codec import ConnectionState, HandoffError, encode_batch
from wsgi_hijack.handoff.successors import parent

HERE = Path(__file__).parent
HEARTBEAT = 2.0


class Deployment:
    """The test app under gunicorn, with its own handoff directory."""

    def __init__(self, tmp: Path, workers: int = 1, args: tuple[str, ...] = (),
                 env: dict | None = None, kind: str = "gunicorn") -> None:
        self.tmp = tmp
        self.code = tmp / "code"
        self.code.mkdir(exist_ok=True)
        self.ticks = tmp / "ticks"
        self.ticks.mkdir(exist_ok=True)
        self.rendezvous = tmp / "rendezvous"
        self.set_version("v1")
        self.env = {"PYTHONPATH": f"{servers.ROOT}:{self.code}",
                    "WSGI_HIJACK_HANDOFF_DIR": str(self.rendezvous),
                    "HANDOFF_TICKS": str(self.ticks), "WEB_CONCURRENCY": str(workers),
                    **(env or {})}
        self.server = servers.start(kind, tmp, app="handoff_app:app",
                                    args=("--workers", str(workers), *args),
                                    env=self.env, heartbeat=HEARTBEAT,
                                    ready=servers.workers_ready(workers),
                                    raise_fd_limit=True)
        self.master = self.server.proc.pid
        wait_for(lambda: len(self.listening()) == workers, "workers listening for handoffs")

    def set_version(self, version: str, boot_delay: float = 0.0) -> None:
        source = (HERE / "handoff_app.py").read_text()
        source = source.replace('VERSION = "v1"', f'VERSION = "{version}"')
        if boot_delay:
            source += f"\ntime.sleep({boot_delay})\n"
        (self.code / "handoff_app.py").write_text(source)
        shutil.rmtree(self.code / "__pycache__", ignore_errors=True)

    def credentials(self) -> tuple[str, bytes]:
        """The deployment's ident and secret (its key file, in the rendezvous)."""
        key = next(self.rendezvous.glob("deployment-*.key"))
        return key.name[len("deployment-"):-len(".key")], key.read_bytes().strip()

    def listening(self) -> list[int]:
        """Pids of the workers that take connections now."""
        return sorted(int(p.name[7:-5]) for p in self.rendezvous.glob("worker-*.sock"))

    def park(self, master: int | None = None) -> int:
        """The park's pid: the master's child that runs the park (found by its
        parent, which /proc's children lists do not always show at once)."""
        master = master or self.master
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and parent(int(entry.name)) == master:
                try:
                    if b"wsgi_hijack.handoff.park" in (entry / "cmdline").read_bytes():
                        return int(entry.name)
                except OSError:
                    continue
        raise AssertionError("no park process")

    def stats(self) -> dict:
        return wire.get_json(self.server.port, "/_stats")

    def publish(self, channel: str, data: str) -> int | None:
        try:
            resp = httpx.post(f"http://{wire.HOST}:{self.server.port}/publish",
                              params={"channel": channel}, content=data, timeout=10)
        except httpx.HTTPError:
            return None
        return resp.json()["id"] if resp.status_code == 202 else None

    def ticks_published(self) -> dict[int, str]:
        found = {}
        for path in self.ticks.glob("ticks-*"):
            for line in path.read_text().splitlines():
                message_id, data = line.split(" ", 1)
                found[int(message_id)] = data
        return found

    def signal(self, sig: int, pid: int | None = None) -> None:
        os.kill(pid or self.master, sig)


def servers_children(pid: int, helpers: bool = False) -> list[int]:
    from wsgi_hijack.loadclient import children

    return children(pid, helpers)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Publisher:
    """``POST /publish`` on ``news`` ten times a second, keeping what was accepted."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.accepted: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            message_id = self.deployment.publish("news", f"news {n}")
            if message_id is not None:
                self.accepted[message_id] = f"news {n}"
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def open_stream(deployment: Deployment, recorder: Recorder, target: str, name: str,
                headers: str = "") -> Stream:
    sock = wire.request(deployment.server.port, target, headers)
    return recorder.add(sock, name)


def sse_events(data: bytes) -> list[tuple[int, str]]:
    """``(id, data)`` of each SSE event with an id."""
    body = data.split(b"\r\n\r\n", 1)[1].decode()
    found = []
    for block in body.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line
                      and not line.startswith(":"))
        if "id" in fields:
            found.append((int(fields["id"]), fields["data"]))
    return found


def chunks(data: bytes) -> list[str]:
    """The data of each chunk that is not a heartbeat."""
    body = data.split(b"\r\n\r\n", 1)[1]
    found = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunk, body = rest[:size], rest[size + 2:]
        if chunk != b"\n":
            found.append(chunk.decode().rstrip("\n"))
    return found


class WsClient:
    """A raw WebSocket client (wsproto's client side) on a recorded socket."""

    def __init__(self, deployment: Deployment, recorder: Recorder, target: str) -> None:
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        sock = socket.create_connection((wire.HOST, deployment.server.port), timeout=10)
        sock.sendall(self.ws.send(Request(host="localhost", target=target,
                                          subprotocols=["v"])))
        self.sock = sock
        self.stream = recorder.add(sock, target)
        self._fed = 0
        self.texts: list[str] = []
        self.pings = 0
        self.closes: list = []
        self._lock = threading.Lock()
        wait_for(self._accepted, "WebSocket handshake")
        # Pongs as a real client sends them: at once, whatever the test is doing.
        self._running = True
        threading.Thread(target=self._answer_pings, daemon=True).start()

    def _answer_pings(self) -> None:
        while self._running and self.stream.closed_at is None:
            self.poll()
            time.sleep(0.05)

    def _events(self) -> list:
        data = self.stream.data
        new, self._fed = data[self._fed:], len(data)
        if not new:  # (b"" would tell wsproto the peer closed)
            return []
        self.ws.receive_data(new)
        events = list(self.ws.events())
        for event in events:
            if isinstance(event, TextMessage):
                self.texts.append(event.data)
            elif type(event).__name__ == "CloseConnection":
                self.closes.append((event.code, event.reason))
            elif type(event).__name__ == "Ping" and self.ws.state.name == "OPEN":
                self.pings += 1
                try:
                    self.sock.sendall(self.ws.send(event.response()))
                except OSError:  # the test has closed its end
                    pass
        return events

    def _accepted(self) -> bool:
        return any(isinstance(e, AcceptConnection) for e in self._events())

    def poll(self) -> None:
        with self._lock:
            self._events()

    def send(self, text: str, finished: bool = True) -> None:
        with self._lock:
            self.sock.sendall(self.ws.send(Message(data=text, message_finished=finished)))

    def stop(self) -> None:
        self._running = False


@pytest.fixture
def deploy(tmp_path):
    started: list[Deployment] = []

    def make(**kwargs) -> Deployment:
        deployment = Deployment(tmp_path, **kwargs)
        started.append(deployment)
        return deployment

    yield make
    for deployment in started:
        deployment.server.stop(30)
        # A binary upgrade's new master outlives the old one, in its process
        # group (gunicorn forks it from the old master).
        try:
            os.killpg(deployment.master, signal.SIGTERM)
        except ProcessLookupError:
            continue
        wait_for(lambda d=deployment: not _group_alive(d.master), "the process group's end", 60)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def expected(publisher: Publisher, deployment: Deployment, after: int) -> list[tuple[int, str]]:
    messages = {**publisher.accepted, **deployment.ticks_published()}
    return sorted((i, d) for i, d in messages.items() if i > after)


def test_reload_moves_every_connection_to_the_new_code(deploy):
    deployment = deploy(env={"WSGI_HIJACK_POLL_TIMEOUT": "14"})
    recorder = Recorder()
    try:
        start_id = deployment.publish("news", "before")
        assert start_id is not None
        since = f"Last-Event-ID: {start_id}\r\n"
        sse = [open_stream(deployment, recorder, "/events?channel=news&channel=tick",
                           f"sse{i}", since) for i in range(3)]
        chunked = [open_stream(deployment, recorder, "/stream?channel=news&channel=tick",
                               f"chunked{i}", since) for i in range(2)]
        tagged = open_stream(deployment, recorder, f"/tagged?channel=news&since={start_id}",
                             "tagged")
        plain = open_stream(deployment, recorder, "/", "plain")
        fixed = open_stream(deployment, recorder, "/fixed", "fixed")
        quiet = open_stream(deployment, recorder, f"/poll?channel=quiet&since={start_id}",
                            "long-poll (message)")
        never = open_stream(deployment, recorder, f"/poll?channel=never&since={start_id}",
                            "long-poll (deadline)")
        poll_opened = time.monotonic()
        ws = WsClient(deployment, recorder, "/echo?channel=news")
        for stream in sse:
            recorder.wait_for(stream, b"retry: 2000\n\n")
        old = deployment.stats()
        assert old["held"] == 11
        publisher = Publisher(deployment)
        ws.send("hello ", finished=False)  # half a message, across the move
        # Late enough that a deadline started again at the move (>= 5 + 14 s
        # after the long-poll opened) could not pass for the kept one (14 s).
        time.sleep(5)

        deployment.set_version("v2")
        old_worker, park = old["pid"], deployment.park()
        park_fds = fds(park)
        moved_at = time.monotonic()
        deployment.signal(signal.SIGHUP)
        wait_for(lambda: deployment.listening() and deployment.listening() != [old_worker],
                 "the new worker", 30)
        wait_for(lambda: not os.path.exists(f"/proc/{old_worker}"), "the old worker's exit", 30)
        new = wait_for(lambda: (s := deployment.stats())["version"] == "v2" and s["held"] == 10
                       and s, "the new worker holding the moved connections", 30)
        ws.send("world")
        wait_for(lambda: ws.poll() or "v2: hello world" in ws.texts, "the echo, new code")
        quiet_id = deployment.publish("quiet", "for the long-poll")
        time.sleep(2)
        publisher.stop()
        last = deployment.publish("news", "last")
        for stream in [*sse, *chunked, tagged]:
            recorder.wait_for(stream, b"last")
        wait_for(lambda: never.closed_at, "the long-poll's deadline", 20)
        recorder.wait_for(quiet, b"for the long-poll")
        end = time.monotonic()
    finally:
        ws.stop()
        recorder.stop()

    assert new["pid"] != old_worker and new["moved"] == 0 and new["adopted"] == 10
    # Every message after the clients' Last-Event-ID up to the last one (the
    # app's thread goes on publishing after it).
    want = [m for m in sorted([*expected(publisher, deployment, start_id), (last, "last")])
            if m[0] <= last]
    # Ids go on increasing in the new worker: its bus took the old one's counter.
    old_ticks = (deployment.ticks / f"ticks-{old_worker}").read_text().split()[::3]
    new_ticks = (deployment.ticks / f"ticks-{new['pid']}").read_text().split()[::3]
    assert min(map(int, new_ticks)) > max(map(int, old_ticks))
    for stream in [*sse, *chunked, tagged, plain, ws.stream]:
        assert stream.closed_at is None, (f"{stream.name} was closed", ws.closes)
        assert stream.heads() == 1, stream.name  # (the WebSocket's is its 101)
        # The bound: heartbeats keep coming, no gap over two intervals.
        assert stream.longest_silence(moved_at - HEARTBEAT, end) <= 2 * HEARTBEAT, stream.name
    for stream in sse:
        received = each_once(sse_events(stream.data), want, stream.name)
    for stream in chunked:  # chunks carry the data alone, in the same order
        got = chunks(stream.data)
        assert got[:got.index("last") + 1] == [d for _, d in received], stream.name
    lines = tagged.data.split(b"\r\n\r\n", 1)[1].decode().splitlines()
    tagged_news = [line for line in lines if line != "BEAT"]
    news = [(i, d) for i, d in want if d.startswith("news") or d in ("last",)]
    assert [line.split(" ", 2)[1:] for line in tagged_news] == [[str(i), d] for i, d in news]
    versions = [line.split(" ")[0] for line in tagged_news]
    assert versions == sorted(versions) and versions[-1] == "v2" and versions[0] == "v1"
    # The long-polls: one answer each, one head; the deadline kept, not restarted.
    assert quiet.heads() == 1 and f'"id":{quiet_id}'.encode() in quiet.data
    assert never.heads() == 1 and b'"messages":[]' in never.data
    assert never.closed_at - poll_opened < 14 + 3 < moved_at - poll_opened + 14, \
        "the long-poll's deadline was restarted"
    # The own protocol that cannot move said its goodbye.
    assert fixed.data.endswith(b"bye\n") and fixed.closed_at is not None
    assert ws.pings >= 1
    # No fd left behind: the park is back where it was.
    wait_for(lambda: fds(park) == park_fds, "the park holding what it held before")
    assert "Traceback" not in deployment.server.log()


# -- the other restarts ---------------------------------------------------------------


def _sse_clients(deployment: Deployment, recorder: Recorder, count: int,
                 since: int) -> list[Stream]:
    streams = [open_stream(deployment, recorder, "/events?channel=news&channel=tick", f"sse{i}",
                           f"Last-Event-ID: {since}\r\n") for i in range(count)]
    for stream in streams:
        recorder.wait_for(stream, b"retry: 2000\n\n")
    return streams


def _finish(deployment: Deployment, recorder: Recorder, publisher: Publisher,
            streams: list[Stream], since: int) -> list[tuple[int, str]]:
    """Stop publishing, publish ``last``, wait for it everywhere; what each should have."""
    time.sleep(1)
    publisher.stop()
    last = wait_for(lambda: deployment.publish("news", "last"), "a publish after the restart")
    for stream in streams:
        recorder.wait_for(stream, b"data: last\n")
    return [m for m in sorted([*expected(publisher, deployment, since), (last, "last")])
            if m[0] <= last]


def _assert_untouched(streams: list[Stream], want: list[tuple[int, str]]) -> None:
    first = None
    for stream in streams:
        assert stream.closed_at is None, f"{stream.name} was closed"
        assert stream.heads() == 1, stream.name
        got = each_once(sse_events(stream.data), want, stream.name)
        assert first is None or got == first, stream.name  # every client the same
        first = got


def each_once(got: list[tuple[int, str]], want: list[tuple[int, str]],
              name: str) -> list[tuple[int, str]]:
    """``got`` up to the last of ``want``: every accepted message, once, in id
    order. A tick may be there that its worker's thread published but had no
    time to write down before its process exited (the old worker, at the
    move): received, so not lost, only not listed in ``want``."""
    got = [m for m in got if m[0] <= want[-1][0]]
    ids = [i for i, _ in got]
    assert ids == sorted(set(ids)), f"{name}: not once each, in order"
    extra = set(got) - set(want)
    assert set(want) <= set(got), f"{name} missed {sorted(set(want) - set(got))}"
    assert all(d.startswith("tick") for _, d in extra), f"{name}: unexpected {extra}"
    return got


@pytest.mark.parametrize("how", ["max_requests", "worker_exits"])
def test_a_recycled_worker_hands_its_connections_to_its_replacement(deploy, how):
    """max_requests (with jitter), or a worker that exits on its own: the worker
    leaves first and the master forks its replacement after; the park keeps
    the connections in between."""
    args = ("--max-requests", "40", "--max-requests-jitter", "10") if how == "max_requests" \
        else ()
    deployment = deploy(args=args)
    recorder = Recorder()
    try:
        since = deployment.publish("news", "before")
        streams = _sse_clients(deployment, recorder, 4, since)
        old = deployment.stats()["pid"]
        publisher = Publisher(deployment)
        if how == "worker_exits":
            deployment.signal(signal.SIGTERM, old)
        # Requests count towards max_requests (the publisher's too).
        wait_for(lambda: deployment.stats()["pid"] != old, "the replacement", 60)
        wait_for(lambda: deployment.stats()["held"] == 4, "the moved connections", 30)
        want = _finish(deployment, recorder, publisher, streams, since)
    finally:
        recorder.stop()
    _assert_untouched(streams, want)
    assert f"gave 4 held connections to the park of master {deployment.master}" in \
        deployment.server.log()


def test_binary_upgrade_moves_connections_to_the_new_masters_workers(deploy):
    """USR2 starts a new master (with its own park); WINCH and QUIT to the old
    one. gunicorn ignores WINCH when it is not daemonized; QUIT stops the old
    workers at once, and as another master runs, their connections move to
    its workers (with the in-process bus, its history and ids too)."""
    deployment = deploy(kind="gunicorn-script")
    recorder = Recorder()
    try:
        since = deployment.publish("news", "before")
        streams = _sse_clients(deployment, recorder, 4, since)
        old_worker = deployment.stats()["pid"]
        publisher = Publisher(deployment)
        deployment.signal(signal.SIGUSR2)
        new_master = wait_for(lambda: [int(p.name[7:-5]) for p in
                                       deployment.rendezvous.glob("master-*.sock")
                                       if int(p.name[7:-5]) != deployment.master],
                              "the new master's park", 30)[0]
        wait_for(lambda: servers_children(new_master), "the new master's worker", 30)
        deployment.signal(signal.SIGWINCH)
        deployment.signal(signal.SIGQUIT)
        wait_for(lambda: deployment.server.proc.poll() is not None, "the old master's exit", 60)
        wait_for(lambda: (s := deployment.stats())["pid"] != old_worker and s["held"] == 4,
                 "the new master's worker holding the connections", 30)
        want = _finish(deployment, recorder, publisher, streams, since)
    finally:
        recorder.stop()
    _assert_untouched(streams, want)
    assert parent(deployment.stats()["pid"]) == new_master


def test_shutdown_says_goodbye(deploy):
    """SIGTERM to the master: nobody to hand to, so every client gets its goodbye
    (SSE: a retry hint, then the close), and nothing is left behind."""
    deployment = deploy()
    recorder = Recorder()
    try:
        streams = _sse_clients(deployment, recorder, 3, 0)
        park = deployment.park()
        deployment.signal(signal.SIGTERM)
        for stream in streams:
            wait_for(lambda s=stream: s.closed_at, "the goodbye", 30)
        deployment.server.proc.wait(30)
    finally:
        recorder.stop()
    for stream in streams:
        assert stream.data.endswith(b"retry: 1000\n\n"), stream.data[-100:]
    assert not os.path.exists(f"/proc/{park}")
    assert sorted(p.name for p in deployment.rendezvous.iterdir()) == []
    log = deployment.server.log()
    assert "gave" not in log and "Traceback" not in log


# -- faults ----------------------------------------------------------------------------

DYING_SUCCESSOR = """
import os, socket, sys
sys.path.insert(0, sys.argv[2])
from wsgi_hijack.handoff import transport
path = sys.argv[1] + f"/worker-{os.getpid()}.sock"
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
transport.expect(conn, sys.argv[3], sys.argv[4].encode())  # one of the deployment's
socket.recv_fds(conn, 1, 250)  # the first chunk of fds, then it dies
os.unlink(path)
os._exit(1)
"""


def test_a_successor_that_dies_mid_handoff_costs_nothing(deploy):
    """A process that looks like a successor takes the first chunk of fds and
    dies: the park still holds every connection and gives them to the real
    replacement; no client sees anything, no fd is left behind."""
    deployment = deploy()
    recorder = Recorder()
    try:
        since = deployment.publish("news", "before")
        streams = _sse_clients(deployment, recorder, 4, since)
        old = deployment.stats()["pid"]
        park = deployment.park()
        park_fds = fds(park)
        ident, key = deployment.credentials()
        dying = subprocess.Popen([sys.executable, "-c", DYING_SUCCESSOR,
                                  str(deployment.rendezvous), str(servers.ROOT), ident,
                                  key.decode()], stdout=subprocess.PIPE)
        assert dying.stdout.readline() == b"listening\n"
        publisher = Publisher(deployment)
        deployment.signal(signal.SIGTERM, old)  # replaced after it exits
        assert dying.wait(30) == 1
        wait_for(lambda: (s := deployment.stats())["pid"] != old and s["held"] == 4,
                 "the replacement holding the connections", 30)
        want = _finish(deployment, recorder, publisher, streams, since)
    finally:
        recorder.stop()
    _assert_untouched(streams, want)
    log = deployment.server.log()
    assert "did not take 4 connections" in log
    wait_for(lambda: fds(park) == park_fds, "the park holding what it held before")


def test_without_a_successor_in_time_clients_get_the_goodbye_and_lose_nothing(deploy):
    """The new worker boots too slowly for WSGI_HIJACK_HANDOFF_TIMEOUT: the
    park says each connection's goodbye; clients reconnect with Last-Event-ID
    and get everything (the bus's ids and history still move)."""
    deployment = deploy(env={"WSGI_HIJACK_HANDOFF_TIMEOUT": "2"})
    recorder = Recorder()
    try:
        since = deployment.publish("news", "before")
        streams = _sse_clients(deployment, recorder, 3, since)
        publisher = Publisher(deployment)
        for stream in streams:  # an id to reconnect from
            recorder.wait_for(stream, b"\nid: ")
        deployment.set_version("v2", boot_delay=6)
        deployment.signal(signal.SIGHUP)
        for stream in streams:
            wait_for(lambda s=stream: s.closed_at, "the goodbye", 30)
        assert all(s.data.endswith(b"retry: 1000\n\n") for s in streams)
        # Each client reconnects as EventSource does, from the last id it saw.
        again = []
        for i, stream in enumerate(streams):
            last = sse_events(stream.data)[-1][0]
            again.append(open_stream(deployment, recorder, "/events?channel=news&channel=tick",
                                     f"again{i}", f"Last-Event-ID: {last}\r\n"))
        for stream in again:
            recorder.wait_for(stream, b"retry: 2000\n\n", 30)
        want = _finish(deployment, recorder, publisher, again, since)
    finally:
        recorder.stop()
    for first, second in zip(streams, again, strict=True):
        each_once(sse_events(first.data) + sse_events(second.data), want, second.name)
    assert "no successor took them in time" in deployment.server.log()


def test_clients_that_leave_while_parked_are_dropped_and_the_rest_move(deploy):
    """Clients close while their connections wait in the park (the successor
    boots slowly): the successor finds them closed and drops them; the others
    move as usual."""
    deployment = deploy()
    recorder = Recorder()
    try:
        since = deployment.publish("news", "before")
        streams = _sse_clients(deployment, recorder, 6, since)
        old = deployment.stats()["pid"]
        publisher = Publisher(deployment)
        deployment.set_version("v2", boot_delay=3)
        deployment.signal(signal.SIGHUP)
        wait_for(lambda: "park: took 6 connections" in deployment.server.log(), "the park", 30)
        for stream in streams[:3]:  # gone while parked
            stream.sock.shutdown(socket.SHUT_RDWR)
        new = wait_for(lambda: (s := deployment.stats())["pid"] != old and s["held"] == 3 and s,
                       "the new worker holding the 3 left", 30)
        want = _finish(deployment, recorder, publisher, streams[3:], since)
    finally:
        recorder.stop()
    _assert_untouched(streams[3:], want)
    assert new["adopted"] == 6 and new["dropped_closed"] == 3


def _give_plain(path: Path, count: int,
                credentials: tuple[str, bytes]) -> tuple[int, list[socket.socket]]:
    """Give ``count`` socketpair ends to the worker at ``path`` as plain streams
    of ``GET /``; returns what it took and our ends."""
    ours, theirs = [], []
    for _ in range(count):
        a, b = socket.socketpair()
        ours.append(a)
        theirs.append(b)
    states = [ConnectionState(i, "plain", "GET / HTTP/1.1") for i in range(count)]
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(path))
            transport.prove(sock, *credentials)
            taken = transport.give(sock, [s.fileno() for s in theirs], encode_batch(states))
    finally:
        for s in theirs:
            s.close()  # the worker has its own copies
    return taken, ours


def test_two_gives_at_once_to_one_worker_both_land(deploy):
    """Two departing workers hand to the same new worker at the same moment:
    it takes one give after the other, and holds both."""
    deployment = deploy()
    worker = deployment.listening()[0]
    path = rendezvous.worker_socket(deployment.rendezvous, worker)
    results: list = []
    credentials = deployment.credentials()
    threads = [threading.Thread(target=lambda: results.append(_give_plain(path, 5, credentials)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [taken for taken, _ in results] == [5, 5]
    wait_for(lambda: deployment.stats()["held"] == 10, "both gives held")
    for _, ours in results:
        for sock in ours:  # each resumed: a heartbeat at once
            sock.settimeout(10)
            assert sock.recv(100).startswith(b"BEEP\n")
            sock.close()


def test_bad_handoffs_are_refused_and_cost_nothing(deploy):
    """A stranger, a corrupted batch, a truncated one, a give to a worker that
    is itself leaving: each is refused with its reason; the park and the
    worker keep running with the fds they had, and the held clients see
    nothing."""
    deployment = deploy()
    recorder = Recorder()
    try:
        streams = _sse_clients(deployment, recorder, 2, 0)
        park = deployment.park()
        worker = deployment.listening()[0]
        park_path = rendezvous.park_socket(deployment.rendezvous, deployment.master)
        before = fds(park), fds(worker)
        # A stranger: the socket is this user's only (0600), and the peer is checked.
        stranger = subprocess.run(
            [sys.executable, "-c", "import os, socket, sys; os.setgid(65534); os.setuid(65534);"
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])", str(park_path)],
            capture_output=True, text=True)
        assert "PermissionError" in stranger.stderr
        # A corrupted batch, then a truncated one.
        a, b = socket.socketpair()
        message = bytearray(encode_batch([ConnectionState(0, "plain", "GET / HTTP/1.1")]))
        message[-3] ^= 0xFF
        credentials = deployment.credentials()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(park_path))
            transport.prove(sock, *credentials)
            sock.sendall(b"G")
            with pytest.raises(HandoffError, match="corrupted payload"):
                transport.give(sock, [b.fileno()], bytes(message))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(park_path))
            transport.prove(sock, *credentials)
            sock.sendall(b"G")
            socket.send_fds(sock, [b"F"], [b.fileno()])
            sock.sendall(b"E" + bytes(message[:20]))  # and then the giver is gone
        wait_for(lambda: "truncated" in deployment.server.log() or
                 "connection closed" in deployment.server.log(), "the truncated one refused")
        b.send(b"still ours")  # our fd was never taken from us
        assert a.recv(100) == b"still ours"
        wait_for(lambda: fds(park) == before[0], "the park holding what it held before")
        # A give to a worker that is leaving itself: refused, the giver keeps its fds.
        # The worker is reading the give (it has our first chunk) when it is told
        # to stop; the rest comes after.
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(rendezvous.worker_socket(deployment.rendezvous, worker)))
            transport.prove(sock, *credentials)
            socket.send_fds(sock, [b"F"], [b.fileno()])
            wait_for(lambda: fds(worker) >= before[1] + 2, "the worker reading the give")
            deployment.signal(signal.SIGTERM, worker)
            wait_for(lambda: worker not in deployment.listening(), "the worker leaving")
            sock.sendall(b"E" + encode_batch([ConnectionState(0, "plain", "GET / HTTP/1.1")]))
            answer = transport.recv_exactly(sock, 5)
            reason = sock.recv(4096)
            assert answer[:1] == b"R" and b"shutting down itself" in reason, (answer, reason)
        b.send(b"still ours")
        assert a.recv(100) == b"still ours"
        a.close()
        b.close()
        wait_for(lambda: (s := deployment.stats())["pid"] != worker and s["held"] == 2,
                 "the replacement")
        # The leaving worker's own connections went through the park: none stays.
        wait_for(lambda: fds(park) == before[0], "the park back to what it held before")
    finally:
        recorder.stop()
    for stream in streams:
        assert stream.closed_at is None and stream.heads() == 1


# -- several workers ---------------------------------------------------------------------


def test_four_workers_with_redis_spread_each_old_workers_connections_evenly(deploy,
                                                                           redis_server):
    """Four workers (SO_REUSEPORT) and the Redis bus: on HUP each old worker's
    connections are dealt evenly over the four new workers; every message
    reaches every client once, in order (each worker's own thread publishes
    too)."""
    deployment = deploy(workers=4, env={"WSGI_HIJACK_REDIS_URL": redis_server.url})
    recorder = Recorder()
    try:
        since = deployment.publish("news", "before")
        streams = _sse_clients(deployment, recorder, 41, since)
        old = set(deployment.listening())
        publisher = Publisher(deployment)
        time.sleep(1)
        deployment.signal(signal.SIGHUP)
        wait_for(lambda: len(set(deployment.listening()) - old) == 4
                 and not old & set(deployment.listening()), "four new workers", 60)
        wait_for(lambda: len(re.findall(r"park: gave \d+ connections", deployment.server.log()))
                 >= 1 and all(not os.path.exists(f"/proc/{pid}") for pid in old),
                 "the old workers gone", 60)
        want = _finish(deployment, recorder, publisher, streams, since)
    finally:
        recorder.stop()
    _assert_untouched(streams, want)
    gave: dict[int, dict[int, int]] = {}
    for count, giver, taker in re.findall(r"park: gave (\d+) connections of pid (\d+) to pid "
                                          r"(\d+)", deployment.server.log()):
        gave.setdefault(int(giver), {})[int(taker)] = int(count)
    assert set(gave) <= old and sum(sum(t.values()) for t in gave.values()) == 41
    for giver, takers in gave.items():
        assert len(takers) == 4 or sum(takers.values()) < 4, (giver, takers)
        assert max(takers.values()) - min(takers.values()) <= 1, (giver, takers)
    totals: dict[int, int] = {}
    for takers in gave.values():
        for taker, count in takers.items():
            totals[taker] = totals.get(taker, 0) + count
    assert len(totals) == 4 and max(totals.values()) - min(totals.values()) <= 1, totals
