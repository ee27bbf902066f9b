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
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a file: the harness, and this tree's wsgi_hijack

from harness import servers  # noqa: E402
from wsgi_hijack import loadclient  # noqa: E402

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
        server = servers.start("gunicorn", Path(tmp), config=conf, heartbeat=60,
                               ready=servers.workers_ready(1), timeout=30, stop_timeout=60)
        try:
            time.sleep(1.0)
            report = loadclient.run(server.url, args.n, duration=0.5, window=args.n, progress=0,
                                    gunicorn_master=server.proc.pid)
            print(f"storm of {args.n}: all heads in {report['time_to_all_heads']:.2f} s, "
                  f"server CPU {report['server'][0]['cpu_per_connection_us']:.0f} us per "
                  f"connection (profiler on: slower than without)")
        finally:
            server.stop()  # SIGTERM: the worker dumps its profile on the way out
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
