"""Hold N connections to GET PATH on 127.0.0.1:PORT until killed.

``python tests/hold_clients.py PORT N PATH``: prints ``ready`` once every
connection got its response head. Tests SIGKILL it to make clients vanish
without a FIN handshake from the application.
"""

import socket
import sys
import time


def main() -> None:
    port, count, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    socks = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        socks.append(s)
        if i % 100 == 99:
            time.sleep(0.01)  # pace the connects: the listen backlog is finite
    for s in socks:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = s.recv(4096)
            if not data:
                raise SystemExit("server closed a connection before its head")
            buf += data
    print("ready", flush=True)
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
