"""The Python cost of the fan-out loop, apart from the kernel's.

    python benchmarks/fanout_loop.py [-n 9000] [--rounds 15]

Writes the same 5 bytes to N Unix socketpairs (nobody reads them: the
kernel's work per write is small, but real, as on a round, where it
evicts the interpreter from the caches between two writes), with the
reactor's loops -- the C extension's (:mod:`wsgi_hijack._fanout`, one
``send()`` each) and its Python fallback
(:func:`wsgi_hijack.reactor.fanout.write_each_py`) -- and with the bytecode loop
they replaced, which read each connection's protocol for its heartbeat:
once with the connections in the order they were made, once shuffled, so
that each object is a cache miss. Prints nanoseconds of CPU per write,
median of ``--rounds``, and the ratio to a bare
``for fd in fds: os.write(fd, data)``. Figures on this machine are in
docs/benchmarks.rst ("How the round gets to the floor").
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import socket
import statistics
import time

from wsgi_hijack.connection import Connection
from wsgi_hijack.protocols.plain import PlainStream
from wsgi_hijack.reactor import fanout

DATA = b"BEEP\n"


def bare(fds: list[int], conns: list[Connection]) -> None:
    write = os.write
    for fd in fds:
        write(fd, DATA)


def write_each_py(fds: list[int], conns: list[Connection]) -> None:
    assert fanout.write_each_py(fds, DATA) == []


def write_each_c(fds: list[int], conns: list[Connection]) -> None:
    assert fanout.write_each_c(fds, DATA) == []


def bytecode_loop(fds: list[int], conns: list[Connection]) -> None:
    """The round as a bytecode loop over the connections, the alternative to write_each."""
    write = os.write
    for conn in conns:
        beat = conn.protocol.heartbeat
        fd = conn.fd
        if not beat or fd < 0 or conn.outbuf:
            continue
        try:
            sent = write(fd, beat)
        except OSError:
            continue
        if sent != len(beat):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=9000,
                    help="socketpairs (two fds each: at most 9,990 here)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pairs = [socket.socketpair() for _ in range(args.n)]
    fds = [ours.fileno() for ours, _ in pairs]
    # One protocol object per connection, as a per-connection protocol
    # (WebSocket, or PlainStream made per request) has.
    conns = [Connection(fd, PlainStream(DATA)) for fd in fds]
    shuffled = random.sample(conns, len(conns))
    try:
        loops = [("bare", bare, conns), ("write_each_py", write_each_py, conns)]
        if fanout.write_each_c is not None:
            loops.append(("write_each_c", write_each_c, conns))
        loops += [("bytecode_loop", bytecode_loop, conns),
                  ("bytecode_loop, shuffled", bytecode_loop, shuffled)]
        # Interleaved, round by round: the unread queues grow as rounds pass,
        # and each loop should see the same queues.
        times: dict[str, list[float]] = {name: [] for name, _, _ in loops}
        for _ in range(args.rounds):
            for name, loop, order in loops:
                start = time.process_time()
                loop(fds, order)
                times[name].append(time.process_time() - start)
        results = {name: statistics.median(t) / args.n * 1e9 for name, t in times.items()}
        for name, ns in results.items():
            print(f"{name:24} {ns:8.0f} ns per write   {ns / results['bare']:5.2f} x bare")
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
