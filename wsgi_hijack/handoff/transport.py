"""The handoff's wire: fds and their states over a Unix socket, one user only.

One exchange, started by the process that gives its connections away:

1. the fds, in chunks of at most :data:`FDS_PER_CHUNK` (``SCM_RIGHTS``; the
   kernel takes at most 253 per message), each chunk one byte ``F`` with its
   fds, then one byte ``E``;
2. the encoded batch (:mod:`.codec`), which names each fd by its index;
3. the answer: ``A`` and the count taken, or ``R`` and the reason.

Before anything else on a connection, the connecting process proves it
belongs to the same deployment as the one it connects to, and the other
way round (:func:`prove`, :func:`expect`): a challenge-response on the
deployment's secret (HMAC-SHA256, a fresh nonce from each side), which the
processes of other deployments, even of the same user, do not have.

The giver keeps its own copies of the fds until the answer: if the taker
dies or refuses, the giver still holds every connection and says its
goodbye (the clients reconnect and replay; nothing is lost). A taker that
refuses closes every fd it received, so neither side leaks.

The socket is a filesystem Unix socket (never reachable from the network),
made ``0600``, and each side checks its peer's credentials
(``SO_PEERCRED``): only a process of the same user is answered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import resource
import socket
import stat
import struct
from pathlib import Path

from .codec import HEADER_SIZE, HandoffError, payload_size

FDS_PER_CHUNK = 250
_CRED = struct.Struct("3i")  # pid, uid, gid
_COUNT = struct.Struct("!I")
_NONCE = 16
_IDENT = 16  # hex characters of a deployment's ident
_MAC = hashlib.sha256().digest_size


def listen(path: str | Path, backlog: int = 16) -> socket.socket:
    """A handoff socket at ``path``, readable and writable by this user only."""
    path = Path(path)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # a predecessor's, left behind
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return sock


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end."""
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))


def check_peer(sock: socket.socket) -> int:
    """The peer's pid, if it runs as this user; else HandoffError."""
    pid, uid, _ = peer(sock)
    if uid != os.getuid():
        raise HandoffError(f"peer pid {pid} runs as uid {uid}, not {os.getuid()}: refused")
    return pid


def give(sock: socket.socket, fds: list[int], message: bytes) -> int:
    """Send ``fds`` and their batch ``message``; return how many the peer took.

    Raises HandoffError when the peer refuses (with its reason) or goes away;
    the caller's fds stay open either way."""
    check_peer(sock)
    for start in range(0, len(fds), FDS_PER_CHUNK):
        socket.send_fds(sock, [b"F"], fds[start:start + FDS_PER_CHUNK])
    sock.sendall(b"E" + message)
    kind = recv_exactly(sock, 1)
    if kind == b"A":
        return _COUNT.unpack(recv_exactly(sock, _COUNT.size))[0]
    if kind == b"R":
        size = _COUNT.unpack(recv_exactly(sock, _COUNT.size))[0]
        raise HandoffError("successor refused: " + recv_exactly(sock, size).decode(
            "utf-8", "replace"))
    raise HandoffError(f"successor answered {kind!r}")


def take(sock: socket.socket, max_fds: int) -> tuple[list[int], bytes]:
    """Receive a giver's fds (at most ``max_fds``) and its batch message.

    On any failure every fd received so far is closed and HandoffError
    raised; the giver learns why through :func:`refuse`."""
    received: list[int] = []
    try:
        check_peer(sock)
        while True:
            data, fds, flags, _ = socket.recv_fds(sock, 1, FDS_PER_CHUNK)
            received.extend(fds)
            if flags & socket.MSG_CTRUNC:
                raise HandoffError("fds were cut off in transit (this process's fd limit)")
            if data == b"F":
                if len(received) > max_fds:
                    raise HandoffError(f"more than {max_fds} fds offered: no room for them")
                continue
            if data == b"E":
                break
            raise HandoffError("giver closed mid-handoff" if not data
                               else f"unexpected chunk {data!r}")
        header = recv_exactly(sock, HEADER_SIZE)
        payload = recv_exactly(sock, payload_size(header))
        return received, header + payload
    except BaseException:
        for fd in received:
            os.close(fd)
        raise


def fd_room() -> int:
    """Fds this process can still open (less a few for its own use): what a
    taker may receive. Whether each moved connection may then be held is the
    admission's call, as for any hijack (a refused one gets its goodbye), so
    a successor with the same limits holds what its predecessor held."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - len(os.listdir("/proc/self/fd")) - 16


def accept_answer(sock: socket.socket, count: int) -> None:
    sock.sendall(b"A" + _COUNT.pack(count))


def refuse(sock: socket.socket, reason: str) -> None:
    text = reason.encode("utf-8")[:4096]
    try:
        sock.sendall(b"R" + _COUNT.pack(len(text)) + text)
    except OSError:
        pass  # the giver is gone: it has kept its fds, nothing to tell


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise HandoffError(f"connection closed {size - left} bytes into {size}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def expect(sock: socket.socket, ident: str, key: bytes) -> int:
    """The accepting side: the peer must prove it has deployment ``ident``'s
    ``key``; then this side proves it too. Returns the peer's pid. A peer
    that fails is told why (``R``) and HandoffError raised."""
    pid = check_peer(sock)
    challenge = os.urandom(_NONCE)
    sock.sendall(b"D" + challenge)
    answer = recv_exactly(sock, _IDENT + _NONCE + _MAC)
    theirs, nonce, proof = answer[:_IDENT], answer[_IDENT:_IDENT + _NONCE], \
        answer[_IDENT + _NONCE:]
    if theirs != ident.encode("ascii"):
        reason = (f"pid {pid} belongs to deployment {theirs.decode('ascii', 'replace')!r}, "
                  f"not {ident!r}: refused")
    elif not hmac.compare_digest(proof, _mac(key, b"join", challenge, nonce)):
        reason = f"pid {pid} did not prove it belongs to deployment {ident!r}: refused"
    else:
        sock.sendall(b"K" + _mac(key, b"welcome", nonce, challenge))
        return pid
    refuse(sock, reason)
    raise HandoffError(reason)


def prove(sock: socket.socket, ident: str, key: bytes) -> int:
    """The connecting side of :func:`expect`: prove this process has
    deployment ``ident``'s ``key``, and check that the peer has it too.
    Returns the peer's pid; HandoffError if either proof fails."""
    pid = check_peer(sock)
    kind = recv_exactly(sock, 1)
    if kind == b"R":
        size = _COUNT.unpack(recv_exactly(sock, _COUNT.size))[0]
        raise HandoffError("refused: " + recv_exactly(sock, size).decode("utf-8", "replace"))
    if kind != b"D":
        raise HandoffError(f"pid {pid} answered {kind!r}, not a deployment's challenge")
    challenge = recv_exactly(sock, _NONCE)
    nonce = os.urandom(_NONCE)
    sock.sendall(ident.encode("ascii") + nonce + _mac(key, b"join", challenge, nonce))
    kind = recv_exactly(sock, 1)
    if kind == b"R":
        size = _COUNT.unpack(recv_exactly(sock, _COUNT.size))[0]
        raise HandoffError(recv_exactly(sock, size).decode("utf-8", "replace"))
    if kind != b"K" or not hmac.compare_digest(recv_exactly(sock, _MAC),
                                               _mac(key, b"welcome", nonce, challenge)):
        raise HandoffError(f"pid {pid} did not prove it belongs to deployment {ident!r}")
    return pid
