"""What ``benchmarks/handoff.py`` does to the server and reads from it: the
publisher, the CPU of the master's children, the held count of ``/metrics``."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time

from harness import wire
from wsgi_hijack.loadclient import children

CHANNEL = "bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the publisher -------------------------------------------------------------------------

class Publisher:
    """``POST /publish`` ``rate`` times a second, each from a thread of its own, so
    that a POST waiting through the reload does not hold back the next ones.
    A refused connect or a 503 (the old worker handed its bus over) is retried
    every 0.1 s with the same body; a POST whose answer is lost is recorded as
    ``unknown`` (it may or may not be published) and not retried."""

    def __init__(self, port: int, rate: float) -> None:
        self.port = port
        self.rate = rate
        self.records: dict[int, dict] = {}
        self.started: float | None = None
        self._threads: list[threading.Thread] = []
        self._halt = threading.Event()
        self._loop = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._loop.start()

    def _run(self) -> None:
        seq, due = 0, time.monotonic()
        while not self._halt.is_set():
            seq += 1
            thread = threading.Thread(target=self._publish, args=(seq,), daemon=True)
            thread.start()
            self._threads.append(thread)
            due += 1.0 / self.rate
            self._halt.wait(max(0.0, due - time.monotonic()))

    def _publish(self, seq: int) -> None:
        t_pub = time.monotonic()
        rec: dict = {"seq": seq, "t": t_pub, "tries": 0, "status": None, "id": None}
        body = f"{seq} {t_pub:.6f}".encode()
        while True:
            rec["tries"] += 1
            conn = http.client.HTTPConnection(wire.HOST, self.port, timeout=60)
            try:
                conn.request("POST", f"/publish?channel={CHANNEL}", body=body)
                resp = conn.getresponse()
                answer = resp.read()
            except ConnectionRefusedError:
                status, answer = "refused", b""
            except OSError as exc:
                rec["status"] = f"unknown: {type(exc).__name__}: {exc}"
                break
            else:
                status = resp.status
            finally:
                conn.close()
            if status == 202:
                rec["status"], rec["id"] = 202, json.loads(answer)["id"]
                break
            if status in ("refused", 503) and time.monotonic() - t_pub < 60:
                rec.setdefault("retried", []).append(status)
                time.sleep(0.1)
                continue
            rec["status"] = status
            break
        rec["done"] = time.monotonic()
        self.records[seq] = rec

    def stop(self) -> None:
        self._halt.set()

    def done(self) -> bool:
        return self._halt.is_set() and not self._loop.is_alive() and \
            not any(t.is_alive() for t in self._threads)


# -- CPU of the master's children -----------------------------------------------------------

def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def kids(master: int) -> list[int]:
    """The master's children, the park included."""
    return children(master, helpers=True)


class CpuSampler(threading.Thread):
    """Every ``interval`` s: each child's utime + stime, and the master's
    cutime + cstime (its reaped children), in seconds. The children are
    looked for again every ``rescan`` s (a HUP forks a new worker)."""

    def __init__(self, master: int, interval: float = 0.02, rescan: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.master = master
        self.interval = interval
        self.rescan = rescan
        self.pids: list[int] = kids(master)
        self.scanned = time.monotonic()
        self.samples: list[dict] = []
        self._halt = threading.Event()

    def sample(self) -> dict:
        t = time.monotonic()
        try:
            fields = _stat(self.master)
        except OSError:
            return {"t": t, "reaped": None, "procs": {}}
        if t - self.scanned >= self.rescan:
            self.pids, self.scanned = kids(self.master), t
        procs = {}
        for pid in self.pids:
            try:
                f = _stat(pid)
            except OSError:
                continue
            procs[pid] = (int(f[11]) + int(f[12])) / _CLK_TCK
        s = {"t": t, "reaped": (int(fields[13]) + int(fields[14])) / _CLK_TCK, "procs": procs}
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def metrics_held(port: int) -> int | None:
    """``wsgi_hijack_held_connections`` summed over protocols, from ``/metrics``."""
    try:
        status, _, body = wire.http_get(port, "/metrics", 10)
    except OSError:
        return None
    total = None
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("wsgi_hijack_held_connections{"):
            total = (total or 0) + int(float(line.rsplit(" ", 1)[1]))
    return total if status == 200 else None
