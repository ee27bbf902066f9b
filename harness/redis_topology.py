"""Real Redis Sentinel and Cluster topologies on loopback, for tests and
benchmarks of failover: a mock cannot show what a client sees while the
primary moves, so these start real redis-server processes (each a
:class:`~harness.servers.Server`, kept so a test can kill any one of them).

Construction returns only once a failover can happen at once: replicas are
in sync and every sentinel (or cluster node) knows its peers. Every wait is
bounded and fails with what it awaited and the last state it saw.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from redis.connection import Connection
from redis.exceptions import RedisError

from . import wire
from .servers import Server, free_port, redis_ping

HOST = wire.HOST
# Every data node: its own dir, an append-only file (a restart keeps data),
# reachable from the other nodes on loopback.
DATA_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--protected-mode", "no", "--bind", HOST)
BUS_OFFSET = 10000  # redis cluster's bus port is the client port + 10000


def command(port: int, *args: str | int, timeout: float = 2.0) -> Any:
    """One command on a fresh connection, answered raw (RESP2, no client
    parsing): the helpers below need the server's own replies, and a fresh
    connection never carries a dead node's state over a failover."""
    conn = Connection(host=HOST, port=port, socket_timeout=timeout,
                      socket_connect_timeout=timeout, decode_responses=True, protocol=2)
    try:
        conn.send_command(*args)
        return conn.read_response()
    finally:
        conn.disconnect()


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def info(port: int, section: str) -> dict[str, str]:
    return _fields(command(port, "INFO", section))


def cluster_state(port: int) -> str | None:
    return _fields(command(port, "CLUSTER", "INFO")).get("cluster_state")


def wait_until(what: str, check: Callable[[], tuple[bool, Any]], timeout: float,
               interval: float = 0.1) -> Any:
    """Poll ``check() -> (done, state)`` until done; return the last state.
    A Redis or socket error counts as not yet (nodes come and go here)."""
    deadline = time.monotonic() + timeout
    state: Any = None
    while True:
        try:
            done, state = check()
            if done:
                return state
        except (RedisError, OSError) as exc:
            state = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}; "
                               f"last state: {state!r}")
        time.sleep(interval)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_port(taken: set[int], bus: bool = False) -> int:
    """A free port not already handed out (ours are not bound until the
    server starts); with ``bus``, port + 10000 must be free too."""
    for _ in range(500):
        port = free_port()
        if port in taken or (bus and port >= 55000):
            continue
        if bus and (port + BUS_OFFSET in taken or not _bindable(port + BUS_OFFSET)):
            continue
        taken.update((port, port + BUS_OFFSET) if bus else (port,))
        return port
    raise RuntimeError("no free port found")


def _pairs(flat: list) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class _Topology:
    """What both topologies share: their servers by port, and stopping them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.servers: dict[int, Server] = {}
        self._taken: set[int] = set()

    def _dir(self, name: str, port: int) -> Path:
        node_dir = self.tmp / f"{name}-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        return node_dir

    def _start(self, port: int, argv: list[str], name: str) -> Server:
        node_dir = self._dir(name, port)
        server = Server(argv, port, node_dir / f"{name}.log", cwd=node_dir, ready=redis_ping,
                        timeout=15, name=f"{name}:{port}")
        self.servers[port] = server
        return server

    def _data_node(self, port: int, name: str, *extra: str) -> Server:
        return self._start(port, ["redis-server", "--port", str(port), "--dir",
                                  str(self._dir(name, port)), *DATA_ARGS, *extra], name)

    def alive(self, port: int) -> bool:
        return port in self.servers and self.servers[port].proc.poll() is None

    def stop(self) -> None:
        """SIGKILL everything: these hold no data worth a clean shutdown."""
        for server in self.servers.values():
            server.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelSet(_Topology):
    """A primary, its replicas and a quorum-2 set of sentinels watching them."""

    def __init__(self, tmp: Path, replicas: int = 2, sentinels: int = 3,
                 service: str = "mymaster", down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000) -> None:
        super().__init__(tmp)
        self.service = service
        self.sentinel_ports: list[int] = []
        self.data_ports: list[int] = []
        try:
            primary = pick_port(self._taken)
            self._data_node(primary, "primary")
            self.data_ports.append(primary)
            for _ in range(replicas):
                port = pick_port(self._taken)
                self._data_node(port, "replica", "--replicaof", HOST, str(primary))
                self.data_ports.append(port)
            # Sentinels start after the replicas are in sync: their first INFO
            # of the primary then lists them (the next comes 10 s later).
            wait_until("every replica's master_link_status:up", self._replicas_up, 30)
            for _ in range(sentinels):
                self._start_sentinel(primary, down_after_ms, failover_timeout_ms)
            wait_until("every sentinel to know the replicas and the other sentinels",
                       self._sentinels_ready, 30)
        except BaseException:
            self.stop()
            raise

    def _start_sentinel(self, primary: int, down_after_ms: int, failover_ms: int) -> None:
        port = pick_port(self._taken)
        conf_dir = self._dir("sentinel", port)
        conf = conf_dir / "sentinel.conf"  # sentinel rewrites it: its own, writable
        s = self.service
        conf.write_text(f"port {port}\nbind {HOST}\nprotected-mode no\ndir {conf_dir}\n"
                        f"sentinel monitor {s} {HOST} {primary} 2\n"
                        f"sentinel down-after-milliseconds {s} {down_after_ms}\n"
                        f"sentinel failover-timeout {s} {failover_ms}\n"
                        f"sentinel parallel-syncs {s} 1\n")
        self._start(port, ["redis-server", str(conf), "--sentinel"], "sentinel")
        self.sentinel_ports.append(port)

    def _replicas_up(self) -> tuple[bool, Any]:
        links = {p: info(p, "replication").get("master_link_status")
                 for p in self.data_ports[1:]}
        return all(v == "up" for v in links.values()), links

    def _sentinels_ready(self) -> tuple[bool, Any]:
        seen = {}
        for port in self.sentinel_ports:
            replicas = [_pairs(r) for r in command(port, "SENTINEL", "REPLICAS", self.service)]
            peers = [_pairs(r) for r in command(port, "SENTINEL", "SENTINELS", self.service)]
            seen[port] = {"replicas": [(r["port"], r["flags"]) for r in replicas],
                          "sentinels": [(r["port"], r["flags"]) for r in peers]}
        want_replicas = len(self.data_ports) - 1
        want_peers = len(self.sentinel_ports) - 1
        done = all(len(v["replicas"]) == want_replicas and len(v["sentinels"]) == want_peers
                   and all(f == "slave" for _, f in v["replicas"])
                   and all(f == "sentinel" for _, f in v["sentinels"])
                   for v in seen.values())
        return done, seen

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"{HOST}:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/{db}"

    def primary_port(self) -> int:
        """The primary as the sentinels see it, not as it was at start."""
        errors = []
        for port in self.sentinel_ports:
            if not self.alive(port):
                continue
            try:
                addr = command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (RedisError, OSError) as exc:
                errors.append(f"{port}: {exc}")
                continue
            if addr:
                return int(addr[1])
        raise RuntimeError(f"no live sentinel knows the primary of {self.service}: {errors}")

    def kill_primary(self) -> int:
        """SIGKILL, as a crash would: no shutdown for the sentinels to notice."""
        port = self.primary_port()
        self.servers[port].kill()
        return port

    def kill_sentinel(self, i: int) -> int:
        port = self.sentinel_ports[i]
        self.servers[port].kill()
        return port

    def wait_for_failover(self, old_port: int, timeout: float = 30) -> int:
        """Until every live sentinel names one new primary, which says it is
        master and, if any other replica is still alive, has one connected
        (so the test's next write is replicated)."""
        def check() -> tuple[bool, Any]:
            named = {p: int(command(p, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])
                     for p in self.sentinel_ports if self.alive(p)}
            ports = set(named.values())
            if len(ports) != 1 or old_port in ports:
                return False, {"sentinels say": named}
            new = ports.pop()
            role = command(new, "ROLE")[0]
            connected = int(info(new, "replication").get("connected_slaves", 0))
            others = [p for p in self.data_ports if p not in (new, old_port) and self.alive(p)]
            state = {"sentinels say": named, "role": role, "connected_slaves": connected}
            return role == "master" and (connected >= 1 or not others), (new, state)
        return wait_until(f"the sentinels to fail over from {old_port}", check, timeout)[0]


class ClusterSet(_Topology):
    """A Redis Cluster of masters, each with its replicas."""

    def __init__(self, tmp: Path, masters: int = 3, replicas_per_master: int = 1,
                 node_timeout_ms: int = 2000) -> None:
        super().__init__(tmp)
        self.ports: list[int] = []
        # The slot ranges each master owned when last looked at: a killed
        # master cannot be asked what it owned.
        self._slots_of: dict[int, list[tuple[int, int]]] = {}
        try:
            for _ in range(masters * (1 + replicas_per_master)):
                port = pick_port(self._taken, bus=True)
                self._data_node(port, "node", "--cluster-enabled", "yes",
                                "--cluster-config-file", f"nodes-{port}.conf",
                                "--cluster-node-timeout", str(node_timeout_ms))
                self.ports.append(port)
            create = subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"{HOST}:{p}" for p in self.ports),
                 "--cluster-replicas", str(replicas_per_master), "--cluster-yes"],
                capture_output=True, text=True, timeout=120)
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed ({create.returncode}):\n"
                                   f"{create.stdout}\n{create.stderr}")
            wait_until("cluster_state:ok on every node, each master with a connected replica",
                       lambda: self._healthy(replicas_per_master > 0), 60)
            self.initial_masters = self.master_ports()
            self._remember_slots()
        except BaseException:
            self.stop()
            raise

    def _healthy(self, need_replicas: bool) -> tuple[bool, Any]:
        seen = {}
        ok = True
        for port in self.ports:
            state = cluster_state(port)
            nodes = parse_nodes(command(port, "CLUSTER", "NODES"))
            masters = [n for n in nodes if "master" in n["flags"] and n["slots"]]
            unserved = [m["port"] for m in masters if not any(
                n["master"] == m["id"] and n["link"] == "connected"
                and not {"fail", "fail?"} & n["flags"] for n in nodes)]
            seen[port] = {"state": state, "masters without a replica": unserved}
            ok = ok and state == "ok" and not (need_replicas and unserved)
            if "slave" in _own_flags(nodes):
                ok = ok and info(port, "replication").get("master_link_status") == "up"
        return ok, seen

    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.initial_masters)

    def _any_live(self) -> list[int]:
        return [p for p in self.ports if self.alive(p)]

    def _ask(self, *args: str) -> Any:
        """Ask the first live node that answers."""
        errors = []
        for port in self._any_live():
            try:
                return command(port, *args)
            except (RedisError, OSError) as exc:
                errors.append(f"{port}: {exc}")
        raise RuntimeError(f"no live cluster node answered {args}: {errors}")

    def master_ports(self) -> list[int]:
        """Masters serving slots now, failed ones left out."""
        nodes = parse_nodes(self._ask("CLUSTER", "NODES"))
        return sorted(n["port"] for n in nodes if "master" in n["flags"] and n["slots"]
                      and not {"fail", "fail?"} & n["flags"])

    def _slot_owners(self, port: int | None = None) -> dict[int, list[tuple[int, int]]]:
        ask = self._ask if port is None else lambda *a: command(port, *a)
        ranges = ask("CLUSTER", "SLOTS")
        owners: dict[int, list[tuple[int, int]]] = {}
        for start, end, master, *_ in ranges:
            owners.setdefault(int(master[1]), []).append((int(start), int(end)))
        return owners

    def _remember_slots(self) -> None:
        self._slots_of.update(self._slot_owners())

    def master_for_key(self, key: str) -> int:
        slot = int(self._ask("CLUSTER", "KEYSLOT", key))
        for port, ranges in self._slot_owners().items():
            if any(a <= slot <= b for a, b in ranges):
                return port
        raise RuntimeError(f"no master owns slot {slot} (key {key!r})")

    def kill_master(self, port: int) -> None:
        self._remember_slots()
        self.servers[port].kill()

    def wait_for_failover(self, old_port: int, timeout: float = 30) -> int:
        """Until every surviving node says cluster_state:ok and gives all of
        the old master's slots to one other node, which says it is master."""
        slots = self._slots_of.get(old_port)
        if not slots:
            raise ValueError(f"{old_port} owned no slots when last seen (kill it with "
                             "kill_master)")

        def check() -> tuple[bool, Any]:
            seen = {}
            for port in self._any_live():
                owners = self._slot_owners(port)
                holders = {p for p, ranges in owners.items()
                           for r in slots if any(a <= r[0] and r[1] <= b for a, b in ranges)}
                seen[port] = {"state": cluster_state(port),
                              "old slots held by": sorted(holders)}
            holders = {tuple(v["old slots held by"]) for v in seen.values()}
            states = {v["state"] for v in seen.values()}
            if states != {"ok"} or len(holders) != 1:
                return False, seen
            (holder,) = holders
            if len(holder) != 1 or holder[0] == old_port:
                return False, seen
            new = holder[0]
            return command(new, "ROLE")[0] == "master", (new, seen)
        new = wait_until(f"a replica to take over the slots of {old_port}", check, timeout)[0]
        self._remember_slots()
        return new


def parse_nodes(text: str) -> list[dict[str, Any]]:
    """CLUSTER NODES lines: id, port, flags, master id, link state, slots."""
    nodes = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        addr = fields[1].split("@")[0]
        nodes.append({"id": fields[0], "port": int(addr.rsplit(":", 1)[1] or 0),
                      "flags": set(fields[2].split(",")), "master": fields[3],
                      "link": fields[7], "slots": fields[8:]})
    return nodes


def _own_flags(nodes: list[dict[str, Any]]) -> set[str]:
    return next((n["flags"] for n in nodes if "myself" in n["flags"]), set())
