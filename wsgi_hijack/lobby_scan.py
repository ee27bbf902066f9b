"""What the lobby looks at in a waiting connection (:mod:`wsgi_hijack.lobby`):
the end of a request head, or on a TLS listener the client's first record,
and the peeks that read them without taking them from the kernel.

A head may come in one segment (the common case: one peek, one scan) or in
many. Then each look resumes where the last stopped: the scan keeps a count
and a *carry* -- the last 3 bytes of a head, where its end may straddle two
segments, or a TLS record's first 5 -- so that each byte is scanned once
(:func:`resume_head`, :func:`resume_hello`), and the kernel keeps the peek
offset (``SO_PEEK_OFF``, for TCP since Linux 6.9), so that each byte is
copied out once. Without it each look copies the whole buffer again (in the
kernel: the bytes stay there) and still scans only what is new. A head that
took many segments also gets a fixed receive buffer, so that the kernel
merges its tiny segments and a peek's walk to its offset stays short
(:func:`bound_receive_queue`). Measured in benchmarks/results/lobby_scan.md.
"""

from __future__ import annotations

import errno
import socket

from gevent import monkey

_stdsocket = monkey.get_original("socket", "socket")
_PEEK_FLAGS = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an enum's | costs a look more

#: The largest request head waited for, in bytes. nginx's default allows
#: 32 KiB of headers (``large_client_header_buffers 4 8k``), Puma 112 KB;
#: gunicorn's own limits (``limit_request_line``, ``limit_request_fields``,
#: ``limit_request_field_size``) still apply to what is handed over.
MAX_HEAD = 64 * 1024

def head_state(data: bytes, limit: int = MAX_HEAD) -> str:
    """``"complete"``, ``"partial"`` or ``"too_large"``, for the bytes a client sent.

    Empty lines before the request line are allowed (RFC 9112, section 2.2)
    and are not an end of head.
    """
    body = data.lstrip(b"\r\n")
    if b"\r\n\r\n" in body:
        return "complete"
    return "too_large" if len(data) >= limit else "partial"


def head_carry(data: bytes) -> bytes | None:
    """What a scan of a partial head carries to the next bytes: the last 3
    bytes after the leading empty lines (an end of head may straddle the
    boundary), or None while only CR and LF came."""
    body = data.lstrip(b"\r\n")
    return body[-3:] if body else None


def resume_head(carry: bytes | None, new: bytes, seen: int,
                limit: int = MAX_HEAD) -> tuple[str, bytes | None]:
    """:func:`head_state` of a head whose first bytes were scanned already:
    ``carry`` from that scan (:func:`head_carry`), ``new`` the bytes since,
    ``seen`` all the bytes so far. Looks at each byte once; returns the state
    and the carry for the next bytes."""
    if carry is None:
        new = new.lstrip(b"\r\n")
        if not new:
            return ("too_large" if seen >= limit else "partial"), None
        carry = b""
    window = carry + new
    if b"\r\n\r\n" in window:
        return "complete", None
    return ("too_large" if seen >= limit else "partial"), window[-3:]


#: TLS record type of a handshake message (RFC 8446, section 5.1).
_TLS_HANDSHAKE = 0x16
#: The largest TLS record a client may send: 2^14 bytes of plain text plus
#: the largest expansion (RFC 8446, section 5.2).
_TLS_MAX_RECORD = (1 << 14) + 2048
_HTTP_METHOD_START = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def hello_state(data: bytes) -> str:
    """For a TLS listener: ``"complete"`` once the client's first TLS record
    is in (its handshake can start without waiting), ``"partial"`` before;
    ``"plain_http"`` for a clear-text request, ``"not_tls"`` for anything else."""
    return _hello(data[:5], len(data))


def _hello(first: bytes, seen: int) -> str:
    """:func:`hello_state` from the first 5 bytes and how many came in all."""
    if not first:
        return "partial"
    if first[0] != _TLS_HANDSHAKE:
        return "plain_http" if first[0] in _HTTP_METHOD_START else "not_tls"
    if len(first) < 5:
        return "partial"
    length = int.from_bytes(first[3:5], "big")
    if length > _TLS_MAX_RECORD:
        return "not_tls"
    return "complete" if seen >= 5 + length else "partial"


def resume_hello(first: bytes, new: bytes, seen: int) -> tuple[str, bytes]:
    """:func:`hello_state` resumed: ``first`` holds the first (up to 5) bytes
    seen before; returns the state and the first bytes now."""
    if len(first) < 5:
        first = (first + new)[:5]
    return _hello(first, seen), first


def peek(fd: int) -> bytes | None:
    """What the client sent so far, left in the kernel's buffer; None when
    nothing is there yet, b"" at EOF or after a reset."""
    data = peek_new(fd, MAX_HEAD)
    return b"" if isinstance(data, OSError) else data


def peek_new(fd: int, size: int) -> bytes | None | OSError:
    """Up to ``size`` bytes from the fd's peek offset (its start when none is
    set), left in the kernel's buffer; None when nothing is there yet, b"" at
    EOF, the error after a reset."""
    sock = _stdsocket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        return sock.recv(size, _PEEK_FLAGS)
    except BlockingIOError:
        return None
    except OSError as exc:
        return exc
    finally:
        sock.detach()


#: Looks after which a head counts as sent in tiny segments.
MANY_LOOKS = 16
#: The receive buffer such a connection then gets (the kernel doubles it).
_TINY_SEGMENTS_RCVBUF = 4 * MAX_HEAD


def bound_receive_queue(fd: int) -> None:
    """Fix the fd's receive buffer (``SO_RCVBUF``) at a size that makes the
    kernel merge a queue of tiny segments into a few buffers.

    A peek walks the receive queue from its start, offset or not, so each
    look at a head sent one byte per segment would cost as many steps as
    segments came before. Linux merges the queue only when it outgrows the
    buffer, and while the queue is never read it grows the buffer instead
    (up to ``tcp_rmem``'s maximum) unless it is set. Twice
    ``_TINY_SEGMENTS_RCVBUF`` holds ``MAX_HEAD`` merged, with room; the
    setting stays for the connection's life, which only clients that sent
    their head in many segments get."""
    sock = _stdsocket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _TINY_SEGMENTS_RCVBUF)
    except OSError:
        pass
    finally:
        sock.detach()


#: Linux's ``SO_PEEK_OFF`` (not in Python's ``socket`` module): once set, each
#: ``MSG_PEEK`` goes on from where the last one stopped.
_SO_PEEK_OFF = 42
#: Whether this kernel keeps a peek offset for TCP (Linux 6.9 and later);
#: learned from the first try.
_peek_offset_supported = True


def set_peek_offset(fd: int, offset: int) -> bool:
    """Set (or with -1 clear) the fd's peek offset; False where TCP has none."""
    global _peek_offset_supported
    if not _peek_offset_supported:
        return False
    sock = _stdsocket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, offset)
        return True
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            _peek_offset_supported = False
        return False
    finally:
        sock.detach()
