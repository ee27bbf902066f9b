"""Arrival at the edges: a storm at the fd limit, slow heads beside a storm.

    python benchmarks/arrival.py fdlimit --n 2500 --nofile 2000
    python benchmarks/arrival.py fdlimit --n 2500 --nofile 2000 --worker gthread
    python benchmarks/arrival.py slow --storm 17000 --slow 2000

Each scenario starts the demo under gunicorn (``gunicorn.conf.py``) on a free
port, puts every client's connect in flight at once from one epoll loop (no
pacing: a paced client hides what a storm does at the fd limit), and reports
what every client saw, as JSON on stdout (``--out`` also writes it to a
file, and ``--table`` appends a Markdown table to a file).

``fdlimit``
    The worker's fd limit (soft and hard) set to ``--nofile``, and ``--n``
    clients at once on ``/events``; every 50th asks ``/metrics`` instead.
    Reports how many were held (``200``), refused (``503`` with
    ``Retry-After``), answered otherwise, closed without an answer, or left
    unanswered, the slowest answer after connecting, whether the log has
    ``EMFILE`` or a traceback, and whether new clients are held again once
    ``--leave`` held clients leave.
``slow``
    ``--slow`` clients send a partial head and then one byte every
    ``--byte-every`` seconds (never finishing it); once the worker has
    accepted them all, its RSS growth per slow head is read, and then
    ``--storm`` clients connect at once. Reports storm clients held, and for
    the slow ones how they ended (``408``) and how long after connecting.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness import servers, wire  # noqa: E402
from wsgi_hijack import loadclient  # noqa: E402

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
EPOLLIN, EPOLLOUT, EPOLLRDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP


def log(msg: str) -> None:
    print(f"[arrival {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the server ---------------------------------------------------------------------------

def _metrics_answer(server: servers.Server) -> bool:
    """Ready once gunicorn has its worker and ``/metrics`` answers."""
    return bool(server.workers()) and wire.http_get(server.port, "/metrics")[0] > 0


class Gunicorn:
    """The demo under gunicorn with ``repo``'s settings and code
    (:mod:`harness.servers`); its worker found in /proc."""

    def __init__(self, workdir: Path, nofile: int | None = None, worker: str = "gevent",
                 env: dict | None = None, heartbeat: float = 10.0, repo: Path = REPO) -> None:
        args = ["-k", worker] + (["--threads", "4"] if worker == "gthread" else [])
        # bash execs gunicorn (nofile): the same pid, its child the worker.
        self.server = servers.start("gunicorn", workdir, args=args, env=env,
                                    heartbeat=heartbeat, nofile=nofile, root=repo,
                                    ready=_metrics_answer, timeout=30, stop_timeout=15)
        self.port = self.server.port
        self.worker = self.server.workers()[0]
        self.log = self.server.log
        self.stop = self.server.stop

    def rss(self) -> int:
        return loadclient.proc_stats(self.worker)["rss"]

    def fds(self) -> int | None:
        """The worker's open fds; None once it has exited (gunicorn's gthread
        worker ends on EMFILE in accept)."""
        try:
            return len(os.listdir(f"/proc/{self.worker}/fd"))
        except FileNotFoundError:
            return None


# -- the clients --------------------------------------------------------------------------

class Client:
    __slots__ = ("sock", "group", "request", "sent", "buf", "status", "head", "started",
                 "answered", "ended", "next_byte", "error")

    def __init__(self, sock: socket.socket, group: str, request: bytes, now: float) -> None:
        self.sock = sock
        self.group = group
        self.request = request
        self.sent = False
        self.buf = b""
        self.status: int | None = None
        self.head = b""
        self.started = now
        self.answered: float | None = None
        self.ended: float | None = None  # the server closed it (EOF or reset)
        self.next_byte: float | None = None
        self.error: str | None = None


class Crowd:
    """Many raw clients in one epoll loop: every connect in flight at once."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.port = port
        self.source = source
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.byte_every = 2.0

    def open(self, n: int, group: str, request: bytes) -> list[Client]:
        now = time.monotonic()
        made = []
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            if self.source:
                s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((self.source, 0))
            err = s.connect_ex(("127.0.0.1", self.port))
            c = Client(s, group, request, now)
            if err not in (0, errno.EINPROGRESS):
                c.error, c.ended = errno.errorcode.get(err, str(err)), now
                s.close()
                continue
            self.clients[s.fileno()] = c
            self.ep.register(s.fileno(), EPOLLOUT | EPOLLIN | EPOLLRDHUP)
            made.append(c)
        return made

    def run(self, until, timeout: float) -> None:
        """Serve events until ``until()`` is true or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            for fd, mask in self.ep.poll(0.05, 4096):
                c = self.clients.get(fd)
                if c is not None:
                    self._event(fd, c, mask)
            self._trickle()

    def _event(self, fd: int, c: Client, mask: int) -> None:
        now = time.monotonic()
        if not c.sent and mask & EPOLLOUT:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._end(fd, c, now, errno.errorcode.get(err, str(err)))
                return
            try:
                c.sock.send(c.request)
            except OSError as exc:
                self._end(fd, c, now, type(exc).__name__)
                return
            c.sent = True
            if c.group == "slow":
                c.next_byte = now + self.byte_every
            self.ep.modify(fd, EPOLLIN | EPOLLRDHUP)
            return
        if mask & (EPOLLIN | EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            while True:
                try:
                    data = c.sock.recv(65536)
                except BlockingIOError:
                    return
                except OSError as exc:
                    self._end(fd, c, now, type(exc).__name__)
                    return
                if not data:
                    self._end(fd, c, now, None)
                    return
                if c.status is None:
                    c.buf += data
                    if b"\r\n\r\n" in c.buf:
                        c.head = c.buf.partition(b"\r\n\r\n")[0]
                        c.buf = b""
                        c.answered = now
                        try:
                            c.status = int(c.head.split(b" ", 2)[1])
                        except (IndexError, ValueError):
                            c.status = -1

    def _trickle(self) -> None:
        now = time.monotonic()
        for c in list(self.clients.values()):
            if c.next_byte is None or now < c.next_byte or c.ended is not None:
                continue
            c.next_byte = now + self.byte_every
            if c.status is not None or _has_input(c.sock):
                continue  # the answer is in: a byte now would meet a closed socket (reset)
            try:
                c.sock.send(b"a")
            except OSError:
                pass

    def _end(self, fd: int, c: Client, now: float, error: str | None) -> None:
        c.ended, c.error = now, error
        self.ep.unregister(fd)
        del self.clients[fd]
        c.sock.close()

    def close(self, clients: list[Client]) -> None:
        for c in clients:
            if c.ended is None:
                fd = c.sock.fileno()
                self.clients.pop(fd, None)
                try:
                    self.ep.unregister(fd)
                except OSError:
                    pass
                c.sock.close()
                c.ended = time.monotonic()


def _has_input(sock: socket.socket) -> bool:
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True  # data, or EOF


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def answered_or_ended(clients: list[Client]):
    return lambda: all(c.status is not None or c.ended is not None for c in clients)


def outcome(clients: list[Client]) -> dict:
    """What a group of clients saw."""
    statuses: dict[str, int] = {}
    for c in clients:
        if c.status is not None:
            statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
    latencies = [c.answered - c.started for c in clients if c.answered is not None]
    return {
        "clients": len(clients),
        "statuses": statuses,
        "retry_after_on_503": sum(1 for c in clients if c.status == 503
                                  and b"\r\nretry-after:" in c.head.lower()),
        "closed_without_answer": sum(1 for c in clients
                                     if c.status is None and c.ended is not None),
        "unanswered": sum(1 for c in clients if c.status is None and c.ended is None),
        "slowest_answer_s": round(max(latencies), 3) if latencies else None,
    }


def log_problems(text: str) -> dict:
    found = {"emfile": "EMFILE" in text or "Too many open files" in text,
             "traceback": "Traceback" in text}
    if any(found.values()):
        at = min(i for i in (text.find("Traceback"), text.find("Too many")) if i >= 0)
        found["log_excerpt"] = text[max(0, at - 500):at + 2500]
    return found


ARRIVAL_NOTE = """\
`python benchmarks/arrival.py all --baseline-repo DIR --out arrival.json --md arrival.md`:
each scenario on this tree and on the baseline (a checkout of the commit before
the lobby), every client's connect in flight at once. "Slowest answer" is from
the client's connect to its response head; a storm past the listen backlog
(4,096) includes TCP's SYN retransmissions (1, 3, 7 s).
"""


# -- the scenarios ------------------------------------------------------------------------

def fdlimit(args, workdir: Path) -> dict:
    server = Gunicorn(workdir, nofile=args.nofile, worker=args.worker, repo=args.repo)
    try:
        crowd = Crowd(server.port, args.source)
        ordinary_every = 50
        n_ordinary = args.n // ordinary_every
        log(f"fdlimit: {args.n} clients at once ({n_ordinary} of them on /metrics), worker "
            f"{args.worker}, fd limit {args.nofile}")
        streams = crowd.open(args.n - n_ordinary, "stream", request("/events?channel=storm"))
        ordinary = crowd.open(n_ordinary, "ordinary", request("/metrics"))
        everyone = streams + ordinary
        crowd.run(answered_or_ended(everyone), args.client_timeout)
        held = [c for c in streams if c.status == 200 and c.ended is None]
        result = {"scenario": "fdlimit", "worker": args.worker, "nofile": args.nofile,
                  "n": args.n, "streams": outcome(streams), "ordinary": outcome(ordinary),
                  "held": len(held), "worker_fds": server.fds()}
        result["worker_exited"] = result["worker_fds"] is None
        # Room again once clients leave: close some held, then as many new
        # ones. The worker notices a close at once, but "at once" is a moment:
        # a client refused meanwhile tries again, as Retry-After tells it to
        # (here sooner), up to 20 times.
        leave = held[:args.leave]
        crowd.close(leave)
        again: list[Client] = []
        wanted, tries = len(leave), 0
        while wanted and tries < 20:
            tries += 1
            batch = crowd.open(wanted, "again", request("/events?channel=storm"))
            crowd.run(answered_or_ended(batch), args.client_timeout)
            refused = [c for c in batch if c.status == 503]
            crowd.close(refused)
            again += [c for c in batch if c.status != 503]
            wanted = len(refused)
            if wanted:
                time.sleep(0.25)
        result["held_again"] = outcome(again)
        result["held_again"]["tries"] = tries
        result.update(log_problems(server.log()))
        crowd.close([c for c in everyone + again])
        return result
    finally:
        server.stop()


def slow(args, workdir: Path) -> dict:
    server = Gunicorn(workdir, worker=args.worker, repo=args.repo,
                      env={"WSGI_HIJACK_HEAD_TIMEOUT": str(args.head_timeout)})
    try:
        crowd = Crowd(server.port, args.source)
        crowd.byte_every = args.byte_every
        time.sleep(1.0)
        rss0, fds0 = server.rss(), server.fds()
        log(f"slow: {args.slow} slow heads (a byte every {args.byte_every:g} s), then a storm "
            f"of {args.storm}; head deadline {args.head_timeout:g} s")
        partial = b"GET /events?channel=slow HTTP/1.1\r\nHost: x\r\nX-Slow: "
        slow_clients = crowd.open(args.slow, "slow", partial)
        # All accepted and parked (a few fds of the worker's own may come and go).
        crowd.run(lambda: (server.fds() or 0) >= fds0 + args.slow - 5, 30)
        parked_fds = server.fds() - fds0
        rss1 = server.rss()
        storm = crowd.open(args.storm, "stream", request("/events?channel=storm"))
        crowd.run(answered_or_ended(storm), args.client_timeout)
        crowd.run(lambda: all(c.ended is not None for c in slow_clients),
                  args.head_timeout + 20)
        ends = [c.ended - c.started for c in slow_clients if c.ended is not None]
        result = {
            "scenario": "slow", "worker": args.worker, "head_timeout": args.head_timeout,
            "storm": outcome(storm),
            "storm_held": sum(1 for c in storm if c.status == 200 and c.ended is None),
            "slow": outcome(slow_clients),
            "slow_parked_fds": parked_fds,
            "slow_closed_after_s": {"min": round(min(ends), 2) if ends else None,
                                    "max": round(max(ends), 2) if ends else None},
            "slow_still_open": sum(1 for c in slow_clients if c.ended is None),
            "rss_per_slow_head": round((rss1 - rss0) / max(1, args.slow), 1),
        }
        result.update(log_problems(server.log()))
        crowd.close(storm + slow_clients)
        return result
    finally:
        server.stop()


def run_all(args, workdir: Path) -> dict:
    """Every scenario, on this tree and on ``--baseline-repo`` if given, each
    run from its own client source address (TIME_WAIT holds a reused one's
    ports for 60 s, and the next storm would measure that)."""
    trees = [("this", REPO)] + ([("baseline", args.baseline_repo)] if args.baseline_repo else [])
    runs = []
    k = 0
    for label, repo in trees:
        for scenario, worker in (("fdlimit", "gevent"), ("fdlimit", "gthread"),
                                 ("slow", "gevent")):
            k += 1
            one = argparse.Namespace(**vars(args))
            one.repo, one.worker, one.source = repo, worker, f"127.0.{40 + k}.1"
            result = (fdlimit if scenario == "fdlimit" else slow)(one, workdir)
            result.pop("log_excerpt", None)
            result["tree"] = label
            runs.append(result)
    return {"scenario": "all", "commit": _commit(REPO),
            "baseline_commit": _commit(args.baseline_repo) if args.baseline_repo else None,
            "runs": runs}


def _commit(repo: Path) -> str:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def table(result: dict) -> str:
    """The Markdown table of an ``all`` run."""
    lines = [f"Trees: this = {result['commit']}, baseline = {result['baseline_commit']}.", "",
             "| scenario | tree | worker | held | 503 (with Retry-After) | other answers | "
             "closed without answer | unanswered | slowest answer | EMFILE / traceback in log "
             "| slow heads: answer, closed after | RSS per slow head |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r["scenario"] == "fdlimit":
            s, o = r["streams"], r["ordinary"]
            other = {k: v for k, v in s["statuses"].items() if k not in ("200", "503")}
            lines.append(
                f"| fd limit {r['nofile']:,}, {r['n']:,} at once | {r['tree']} | {r['worker']} "
                f"| {r['held']:,} | {s['statuses'].get('503', 0)} ({s['retry_after_on_503']}) "
                f"| {other or '-'}; /metrics {o['statuses']} "
                f"| {s['closed_without_answer'] + o['closed_without_answer']} "
                f"| {s['unanswered'] + o['unanswered']} "
                f"| {s['slowest_answer_s']} s (/metrics {o['slowest_answer_s']} s) "
                f"| {'yes' if r['emfile'] else 'no'} / {'yes' if r['traceback'] else 'no'}"
                f"{'; the worker exited' if r.get('worker_exited') else ''} | - | - |")
        else:
            s, w = r["storm"], r["slow"]
            closed = r["slow_closed_after_s"]
            lines.append(
                f"| {w['clients']:,} slow heads + storm of {s['clients']:,} | {r['tree']} "
                f"| {r['worker']} | {r['storm_held']:,} of the storm | - | - "
                f"| {s['closed_without_answer']} of the storm | {s['unanswered']} "
                f"| {s['slowest_answer_s']} s "
                f"| {'yes' if r['emfile'] else 'no'} / {'yes' if r['traceback'] else 'no'} "
                f"| {w['statuses'] or 'none'}, {w['closed_without_answer']} closed without; "
                f"after {closed['min']}-{closed['max']} s (deadline {r['head_timeout']:g} s) "
                f"| {r['rss_per_slow_head']:,.0f} B |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="scenario", required=True)
    a = sub.add_parser("fdlimit")
    a.add_argument("--n", type=int, default=2500)
    a.add_argument("--nofile", type=int, default=2000)
    a.add_argument("--leave", type=int, default=100)
    b = sub.add_parser("slow")
    b.add_argument("--storm", type=int, default=17000)
    b.add_argument("--slow", type=int, default=2000)
    b.add_argument("--byte-every", type=float, default=2.0)
    b.add_argument("--head-timeout", type=float, default=30.0)
    c = sub.add_parser("all", help="every scenario, here and on --baseline-repo")
    c.add_argument("--n", type=int, default=2500)
    c.add_argument("--nofile", type=int, default=2000)
    c.add_argument("--leave", type=int, default=100)
    c.add_argument("--storm", type=int, default=17000)
    c.add_argument("--slow", type=int, default=2000)
    c.add_argument("--byte-every", type=float, default=2.0)
    c.add_argument("--head-timeout", type=float, default=30.0)
    c.add_argument("--baseline-repo", type=Path, default=None,
                   help="a checkout of an earlier commit, run the same way")
    c.add_argument("--md", type=Path, default=None, help="write the Markdown table here")
    for p in (a, b, c):
        p.add_argument("--worker", default="gevent", choices=["gevent", "gthread"])
        p.add_argument("--source", default=None,
                       help="client source address (fresh per run: TIME_WAIT holds ports)")
        p.add_argument("--client-timeout", type=float, default=60.0)
        p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
        p.add_argument("--logs", type=Path, default=None,
                       help="keep the server's log in this directory")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # every client is an fd

    with tempfile.TemporaryDirectory(prefix="arrival-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        args.repo = REPO
        scenarios = {"fdlimit": fdlimit, "slow": slow, "all": run_all}
        result = scenarios[args.scenario](args, workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.scenario == "all" and args.md:
        args.md.write_text("# Arrival at the edges\n\n" + ARRIVAL_NOTE + "\n" + table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
