"""Where does a reconnect storm's server time go? cProfile in the gunicorn worker.

    python benchmarks/profile_storm.py -n 5000 [--top 30]

Starts the demo under gunicorn (``gunicorn.conf.py``) with a profiler switched on
in the worker (``post_worker_init``) and dumped at exit (``worker_exit``),
connects N clients at once with the load client, and prints the functions with
the most own time, then the same grouped by where they live (gunicorn, gevent,
wsgi_hijack, the standard library). Under gevent the profiler sees every
greenlet, so "own time" is what each function cost across all requests; it
counts CPU time (``time.process_time``), not wall time.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from wsgi_hijack import loadclient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PROFILE_CONF = '''
import cProfile, os, runpy, time
_base = runpy.run_path({conf!r})
globals().update({{k: v for k, v in _base.items() if not k.startswith("__")}})
# CPU time, not wall time: a loopback send() that wakes a client would
# otherwise be charged with the time the client then runs on our core.
_profile = cProfile.Profile(time.process_time)

def post_worker_init(worker):
    _base["post_worker_init"](worker)
    _profile.enable()

def worker_exit(server, worker):
    _profile.disable()
    _profile.dump_stats({out!r})
    _base["worker_exit"](server, worker)
'''


def _where(filename: str) -> str:
    for key in ("wsgi_hijack", "gunicorn", "gevent", "greenlet"):
        if f"/{key}/" in filename:
            return key
    if filename.startswith("~") or filename == "<built-in>":
        return "builtins (C: syscalls, socket methods)"
    return "standard library / other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="wsgi-hijack-prof-") as tmp:
        out = Path(tmp) / "worker.prof"
        conf = Path(tmp) / "profile.conf.py"
        conf.write_text(PROFILE_CONF.format(conf=str(REPO / "gunicorn.conf.py"), out=str(out)))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, WSGI_HIJACK_HEARTBEAT="60")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"127.0.0.1:{port}",
             "--no-control-socket", "wsgi_hijack:app"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while not loadclient.children(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
            report = loadclient.run(f"http://127.0.0.1:{port}/", args.n, duration=0.5,
                                    window=args.n, progress=0,
                                    gunicorn_master=proc.pid)
            print(f"storm of {args.n}: all heads in {report['time_to_all_heads']:.2f} s, "
                  f"server CPU {report['server'][0]['cpu_per_connection_us']:.0f} us per "
                  f"connection (profiler on: slower than without)")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        stats = pstats.Stats(str(out))
        stats.sort_stats("tottime").print_stats(args.top)
        by_where: dict[str, float] = defaultdict(float)
        for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
            by_where[_where(filename)] += tottime
        total = sum(by_where.values())
        print("own time by where it lives:")
        for where, t in sorted(by_where.items(), key=lambda kv: -kv[1]):
            print(f"  {where:<45} {t:8.3f} s  {t / total:6.1%}")
        ours = sorted(((tottime, calls, f"{Path(filename).name}:{line}({name})")
                       for (filename, line, name), (_, calls, tottime, _, _)
                       in stats.stats.items() if _where(filename) == "wsgi_hijack"),
                      reverse=True)
        print(f"wsgi_hijack's own time, per connection (N = {args.n:,}):")
        for tottime, calls, where in ours[:args.top]:
            print(f"  {where:<60} {tottime / args.n * 1e6:8.1f} us  ({calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
