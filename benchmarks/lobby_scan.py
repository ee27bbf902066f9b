"""What a request head split into 1-byte segments costs the lobby, against
the same head in one segment (issue 22).

    python benchmarks/lobby_scan.py --baseline-repo DIR --out lobby_scan.json --md lobby_scan.md

For each tree (this one; ``--baseline-repo``: a checkout of the commit before
the change; and this one again with the kernel's peek offset turned off, as
on Linux before 6.9) a child process runs the tree's ``Lobby`` on a loopback
listener -- no gunicorn: the handoff reads the head and closes -- and a
client in the same process:

- one segment: ``--whole`` heads of ``--size`` bytes, each in one ``send``;
- split: ``--split`` heads of ``--size`` bytes at once, one byte per
  segment, each byte sent only once the lobby has looked at the one before,
  so that each byte is a segment and a look of its own whatever the
  machine's speed. (A receiver that peeks and does not read acknowledges
  late, so on loopback this runs at a few hundred bytes a second per
  connection: a 50 KB head takes about two minutes.)

It reports the lobby's CPU: the thread CPU time spent in its steps (accepting
and looking, the wait for events left out), per head, and the ratio of a
split head's to a whole one's in the same run; and how many looks and bytes
peeked. JSON on stdout (``--out`` writes it too); ``--md`` writes the table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[lobby_scan {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def padded_head(size: int) -> bytes:
    start, end = b"GET /nope HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


# -- the child: one tree's lobby and the client -------------------------------------------

def child(size: int, whole: int, split: int, peek_offset: bool) -> dict:
    import gevent

    from wsgi_hijack import lobby as lobby_module

    # Where the peeks are made: the module of the tree's own lobby (not one an
    # import would find elsewhere); wsgi_hijack.lobby before the scan moved out.
    peek = getattr(lobby_module, "peek", None)
    peeking = sys.modules[peek.__module__] if peek is not None else lobby_module

    stdsocket = socket.socket
    counts = {"cpu": 0.0, "looks": 0, "peeks": 0, "peeked": 0}
    looked: set[int] = set()

    class Counted(stdsocket):
        def recv(self, n, flags=0):
            data = super().recv(n, flags)
            if flags & socket.MSG_PEEK:
                counts["peeks"] += 1
                counts["peeked"] += len(data)
            return data

    peeking._stdsocket = Counted
    if not peek_offset:
        peeking._peek_offset_supported = False
    cls = lobby_module.Lobby

    def timed(step):
        def run(self, *args):
            started = time.thread_time()
            try:
                return step(self, *args)
            finally:
                counts["cpu"] += time.thread_time() - started
        return run

    for name in ("_poll", "_accept"):
        setattr(cls, name, timed(getattr(cls, name)))
    look = cls._look

    def counted_look(self, fd, mask):
        counts["looks"] += 1
        looked.add(fd)
        return look(self, fd, mask)

    cls._look = counted_look

    head = padded_head(size)
    listener = stdsocket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    handed: list[int] = []

    def handoff(sock, _listener) -> bool:
        handed.append(len(sock.recv(size, socket.MSG_WAITALL)))  # the head is all in
        sock.close()
        return True

    lobby = cls([listener], handoff, head_timeout=3600, room=lambda: 10000,
                socket_class=stdsocket).start()

    def wait(condition) -> None:
        deadline = time.monotonic() + 600
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            gevent.sleep(0.0005)

    def connect() -> socket.socket:
        client = socket.create_connection(listener.getsockname())
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client

    def measure(run) -> dict:
        for key in counts:
            counts[key] = 0
        handed.clear()
        started = time.monotonic()
        run()
        return {"lobby_cpu_s": counts["cpu"], "looks": counts["looks"],
                "peeks": counts["peeks"], "peeked_bytes": counts["peeked"],
                "wall_s": round(time.monotonic() - started, 3)}

    def run_whole() -> None:
        for i in range(whole):
            client = connect()
            client.sendall(head)
            wait(lambda n=i + 1: len(handed) == n)
            client.close()

    def run_split() -> None:
        clients = [connect() for _ in range(split)]
        wait(lambda: lobby.waiting == split)
        for i in range(size):
            looked.clear()
            for client in clients:
                client.send(head[i:i + 1])
            wait(lambda: len(looked) >= split or len(handed) == split)
        wait(lambda: len(handed) == split)
        for client in clients:
            client.close()

    result = {"lobby": lobby_module.__file__, "peeks_in": peeking.__file__,
              "whole": measure(run_whole)}
    assert handed == [size] * whole, handed
    result["split"] = measure(run_split)
    assert handed == [size] * split, handed
    lobby.close()
    return result


# -- the parent: each tree in a child of its own ------------------------------------------

def run_tree(label: str, root: Path, args, peek_offset: bool = True) -> dict:
    log(f"{label}: {args.split} heads of {args.size} bytes in 1-byte segments, "
        f"{args.whole} in one segment")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--size", str(args.size),
           "--whole", str(args.whole), "--split", str(args.split)]
    if not peek_offset:
        cmd.append("--no-peek-offset")
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout)
    per_whole = result["whole"]["lobby_cpu_s"] / args.whole
    per_split = result["split"]["lobby_cpu_s"] / args.split
    result.update(tree=label, cpu_per_whole_head_s=per_whole, cpu_per_split_head_s=per_split,
                  ratio=per_split / per_whole if per_whole else None)
    log(f"{label}: {per_split:.3f} s per split head, {per_whole * 1e6:.0f} us per whole one")
    return result


def commit_of(root: Path) -> str:
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or "?"


NOTE = """\
What each look costs is what the lobby does per segment -- a wake-up, an
`epoll` poll, a peek -- and what the kernel does to find the new bytes. A
peek copies from the start of the receive queue, or with `SO_PEEK_OFF` from
the offset, walking the queue to it; a queue nobody reads is never merged
while the kernel can grow its buffer instead. So the lobby peeks from the
offset and, after 16 looks, fixes the connection's receive buffer
(`SO_RCVBUF`, 256 KiB) so that the kernel merges the tiny segments: each
look then costs the same however far into the head it is. "this, no
SO_PEEK_OFF" is this tree as on Linux before 6.9: each look copies the
buffer again (in the kernel), and scans only the new bytes.
"""


def markdown(data: dict) -> str:
    lines = [
        "# The lobby's scan of a split head",
        "",
        "`python benchmarks/lobby_scan.py --baseline-repo DIR --out lobby_scan.json "
        "--md lobby_scan.md`: the lobby in-process on loopback; "
        f"{data['split']} head(s) of {data['size']:,} bytes sent one byte per segment (each "
        "byte sent once the lobby has looked at the one before), and "
        f"{data['whole']} heads of the same size in one segment each. Lobby CPU: the "
        "thread CPU time of its steps (accepting, looking), per head. Ratio: a split "
        "head's CPU over a whole one's, in the same run.",
        "",
        NOTE,
        f"Trees: this = {data['commits']['this']}, baseline = "
        f"{data['commits'].get('baseline', '-')}; kernel {os.uname().release}.",
        "",
        "| tree | split head: lobby CPU | looks | bytes peeked | whole head: lobby CPU | "
        "bytes peeked | ratio split / whole |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        s, w = r["split"], r["whole"]
        lines.append(
            f"| {r['tree']} | {r['cpu_per_split_head_s']:.3f} s | {s['looks'] // data['split']:,}"
            f" | {s['peeked_bytes'] // data['split']:,} | {r['cpu_per_whole_head_s'] * 1e6:.0f} us"
            f" | {w['peeked_bytes'] // data['whole']:,} | {r['ratio']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=50_000, help="bytes per head")
    parser.add_argument("--whole", type=int, default=200, help="heads sent in one segment")
    parser.add_argument("--split", type=int, default=1,
                        help="heads sent in 1-byte segments (at once)")
    parser.add_argument("--baseline-repo", type=Path, help="a checkout of the commit before")
    parser.add_argument("--no-fallback", action="store_true",
                        help="skip the run of this tree without the kernel's peek offset")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-peek-offset", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.whole, args.split, not args.no_peek_offset)))
        return
    runs = [run_tree("this", REPO, args)]
    commits = {"this": commit_of(REPO)}
    if not args.no_fallback:
        runs.append(run_tree("this, no SO_PEEK_OFF", REPO, args, peek_offset=False))
    if args.baseline_repo:
        runs.append(run_tree("baseline", args.baseline_repo, args))
        commits["baseline"] = commit_of(args.baseline_repo)
    data = {"size": args.size, "whole": args.whole, "split": args.split, "commits": commits,
            "runs": runs}
    text = json.dumps(data, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.md:
        args.md.write_text(markdown(data))


if __name__ == "__main__":
    main()
