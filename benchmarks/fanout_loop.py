"""The Python cost of the fan-out loop, apart from the kernel's.

    python benchmarks/fanout_loop.py [-n 19900] [--rounds 15]

Writes the same 5 bytes to N fds of ``/dev/null`` (a syscall that costs
little, so the loop around it shows), with the reactor's own
:func:`wsgi_hijack.reactor._write_each` and with the bytecode loop it replaced,
which read each connection's protocol for its heartbeat: once with the
connections in the order they were made (warm caches), once shuffled, so
that each object is a cache miss, as it is on a real round, where the
kernel's send path between two connections evicts them. Prints nanoseconds
of CPU per fd, median of ``--rounds``, and the ratio to a bare
``for fd in fds: os.write(fd, data)``. On this 2-core machine, N = 19,900,
three runs on 2026-11-28: _write_each 1.01-1.03 x bare; the old loop
1.30-1.31 x in order and 2.09-3.6 x shuffled.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import time

from wsgi_hijack.connection import Connection
from wsgi_hijack.protocols.plain import PlainStream
from wsgi_hijack.reactor import _write_each

DATA = b"BEEP\n"


def bare(fds: list[int], conns: list[Connection]) -> None:
    write = os.write
    for fd in fds:
        write(fd, DATA)


def write_each(fds: list[int], conns: list[Connection]) -> None:
    assert _write_each(fds, DATA) == []


def bytecode_loop(fds: list[int], conns: list[Connection]) -> None:
    """The round as it was before _write_each (session 1)."""
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
    ap.add_argument("-n", type=int, default=19900)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    null = os.open(os.devnull, os.O_WRONLY)
    fds = [os.dup(null) for _ in range(args.n)]
    # One protocol object per connection, as a per-connection protocol
    # (WebSocket, or PlainStream made per request) has.
    conns = [Connection(fd, PlainStream(DATA)) for fd in fds]
    shuffled = random.sample(conns, len(conns))
    try:
        results = {}
        for name, loop, order in (("bare", bare, conns), ("write_each", write_each, conns),
                                  ("bytecode_loop", bytecode_loop, conns),
                                  ("bytecode_loop, shuffled", bytecode_loop, shuffled)):
            times = []
            for _ in range(args.rounds):
                start = time.process_time()
                loop(fds, order)
                times.append(time.process_time() - start)
            results[name] = statistics.median(times) / args.n * 1e9
        for name, ns in results.items():
            print(f"{name:24} {ns:8.0f} ns per fd   {ns / results['bare']:5.2f} x bare")
    finally:
        for fd in fds:
            os.close(fd)
        os.close(null)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
