"""Hold N connections to GET PATH on 127.0.0.1:PORT until killed.

``python tests/hold_clients.py PORT N PATH``: prints ``ready`` once every
connection got its response head. Tests SIGKILL it to make clients vanish
without a FIN handshake from the application.
"""

import sys
import time

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from harness import wire  # noqa: E402


def main() -> None:
    port, count, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    socks = wire.open_streams(port, count, path)
    for s in socks:
        try:
            wire.read_head(s)
        except wire.Closed:
            raise SystemExit("server closed a connection before its head") from None
    print("ready", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
