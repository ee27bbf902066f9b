"""Python heap per held connection, counted exactly, through the whole hijack path.

    python benchmarks/heap_per_connection.py [-n 2000]
    PYTHONPATH=/path/to/other/tree python benchmarks/heap_per_connection.py  # another tree

RSS per connection (``benchmarks/run.py``) includes how the allocator lays
out a worker's heap, which moves between invocations of the same code. This
counts instead, with ``tracemalloc``, the Python objects that stay allocated
per held connection: ``gevent.pywsgi`` serves the demo app
(``wsgi_hijack:app``) in this process, N clients connect and are hijacked,
and the traced memory is read before and after (the clients' own sockets
included, the same for every tree). Two trees that keep the same objects
per connection give the same figure to the byte; prints one JSON object.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import tracemalloc  # noqa: E402

import gevent  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="connections to hold")
    ap.add_argument("--path", default="/",
                    help="the demo's route to hold them on (/: plain; /events?channel=c: SSE)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    import wsgi_hijack
    from wsgi_hijack import app
    from wsgi_hijack.reactor import current_reactor

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.server_port))
        sock.sendall(f"GET {args.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return sock

    warm = [connect() for _ in range(10)]  # the reactor started, its first tables made
    gevent.sleep(0.5)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    clients = []
    for i in range(args.n):
        clients.append(connect())
        if i % 100 == 0:
            gevent.sleep(0)
    reactor = current_reactor()
    for _ in range(100):
        gevent.sleep(0.05)
        if reactor is not None and len(reactor) == args.n + len(warm):
            break
    gc.collect()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = len(reactor) - len(warm) if reactor is not None else 0
    print(json.dumps({"package": wsgi_hijack.__file__, "path": args.path, "n": args.n,
                      "held": held,
                      "heap_per_connection": round((after - before) / args.n, 1),
                      "peak_per_connection": round((peak - before) / args.n, 1)}))
    for sock in clients + warm:
        sock.close()
    server.stop()


if __name__ == "__main__":
    main()
