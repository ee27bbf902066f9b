"""A held connection's state, as bytes that another process can trust.

What moves with a connection is small: the request line it was hijacked
for (the successor runs it through the app again, so the new code frames
what follows), its protocol's name and per-connection state, its channels,
the last id it was given, the bytes still waiting to be sent, for a one-shot
protocol the seconds left until its deadline, and its goodbye (what whoever
holds it writes if it cannot be resumed: the client then reconnects and
replays, so nothing is lost). The fd itself travels
beside the batch (``SCM_RIGHTS``); a state names its fd by its index in the
batch.

A batch is framed so that a truncated or corrupted message is refused as a
whole, with the reason, before anything is adopted: a magic and version,
the payload's length, its CRC-32, then the payload (JSON, with the waiting
bytes in base64). Sans-IO: bytes in, states out.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..bus.positions import parse_position

MAGIC = b"WHH1"
_HEADER = struct.Struct("!4sII")  # magic+version, payload length, CRC-32
HEADER_SIZE = _HEADER.size
#: A batch larger than this is refused unread (a state is a few hundred bytes).
MAX_PAYLOAD = 64 << 20
#: ``METHOD /target HTTP/x.y``: what the successor runs through the app.
REQUEST_LINE = re.compile(r"[A-Z]{1,16} /[!-~]* HTTP/1\.[01]")


class HandoffError(ValueError):
    """A handoff message that cannot be trusted; the text says why."""


@dataclass(slots=True)
class ConnectionState:
    """One held connection, as it moves. ``fd_index`` is its fd's place in the batch."""

    fd_index: int
    protocol: str
    request: str = "GET / HTTP/1.1"
    channels: tuple[str, ...] = ()
    last_id: int | str | None = None
    outbuf: bytes = b""
    deadline_in: float | None = None
    protocol_state: dict[str, Any] = field(default_factory=dict)
    #: Client bytes to parse before anything new from the socket (WebSocket:
    #: a half-received frame, synthesised by the protocol).
    input: bytes = b""
    goodbye: bytes = b""

    def as_json(self) -> dict[str, Any]:
        return {"fd": self.fd_index, "protocol": self.protocol, "request": self.request,
                "channels": list(self.channels), "last_id": self.last_id,
                "outbuf": base64.b64encode(self.outbuf).decode("ascii"),
                "deadline_in": self.deadline_in, "state": self.protocol_state,
                "input": base64.b64encode(self.input).decode("ascii"),
                "goodbye": base64.b64encode(self.goodbye).decode("ascii")}


def encode_batch(states: list[ConnectionState], meta: dict[str, Any] | None = None) -> bytes:
    """The message for ``states`` (and ``meta``: what the batch carries besides,
    such as the bus's history); its fds are sent beside it."""
    payload = json.dumps({"meta": meta or {}, "connections": [s.as_json() for s in states]},
                         separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(payload) > MAX_PAYLOAD:
        raise HandoffError(f"batch of {len(payload)} bytes is over {MAX_PAYLOAD}: "
                           "send the connections in several batches")
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def payload_size(header: bytes) -> int:
    """The payload length a header announces (checked); raises HandoffError."""
    if len(header) < HEADER_SIZE:
        raise HandoffError(f"truncated header: {len(header)} of {HEADER_SIZE} bytes")
    magic, size, _ = _HEADER.unpack_from(header)
    if magic != MAGIC:
        raise HandoffError(f"not a handoff message (magic {magic!r}, expected {MAGIC!r})")
    if size > MAX_PAYLOAD:
        raise HandoffError(f"announced payload of {size} bytes is over {MAX_PAYLOAD}")
    return size


def decode_batch(data: bytes, fds: int) -> tuple[dict[str, Any], list[ConnectionState]]:
    """``(meta, states)`` from a whole message that arrived with ``fds`` fds.

    Raises :class:`HandoffError` for anything short of a complete, intact,
    well-formed batch whose states name each fd once. The states come back
    in fd order."""
    size = payload_size(data)
    _, _, crc = _HEADER.unpack_from(data)
    payload = data[HEADER_SIZE:]
    if len(payload) != size:
        raise HandoffError(f"truncated payload: {len(payload)} of {size} bytes")
    if zlib.crc32(payload) != crc:
        raise HandoffError("corrupted payload: its CRC-32 does not match")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HandoffError(f"payload is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("connections"), list) \
            or not isinstance(body.get("meta", {}), dict):
        raise HandoffError("payload must be an object with a list of connections")
    states = [_state(item, fds) for item in body["connections"]]
    seen = [s.fd_index for s in states]
    if len(set(seen)) != len(seen):
        raise HandoffError("two connections name the same fd")
    if len(states) != fds:
        raise HandoffError(f"the batch names {len(states)} connections but carries {fds} fds")
    states.sort(key=lambda s: s.fd_index)  # the i-th state is the i-th fd's
    return body.get("meta", {}), states


def _state(item: Any, fds: int) -> ConnectionState:
    if not isinstance(item, dict):
        raise HandoffError(f"a connection must be an object, not {type(item).__name__}")
    fd = item.get("fd")
    if type(fd) is not int or not 0 <= fd < fds:
        raise HandoffError(f"connection names fd {fd!r}; the batch carries {fds}")
    protocol, request = item.get("protocol"), item.get("request", "GET / HTTP/1.1")
    if not isinstance(protocol, str) or not protocol:
        raise HandoffError(f"connection {fd}: protocol must be a name, not {protocol!r}")
    if not isinstance(request, str) or not REQUEST_LINE.fullmatch(request):
        raise HandoffError(f"connection {fd}: request must be a request line "
                           f"'GET /path HTTP/1.1', not {request!r}")
    channels = item.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise HandoffError(f"connection {fd}: channels must be a list of names")
    last_id = item.get("last_id")
    if type(last_id) is str:  # a position per channel (Redis Cluster)
        try:
            parse_position(last_id)
        except ValueError as exc:
            raise HandoffError(f"connection {fd}: last_id: {exc}") from None
    elif last_id is not None and (type(last_id) is not int or last_id < 0):
        raise HandoffError(f"connection {fd}: last_id must be a non-negative int or "
                           "channel=id,... positions")
    deadline = item.get("deadline_in")
    if deadline is not None and (type(deadline) not in (int, float) or deadline < 0):
        raise HandoffError(f"connection {fd}: deadline_in must be seconds >= 0")
    state = item.get("state", {})
    if not isinstance(state, dict):
        raise HandoffError(f"connection {fd}: state must be an object")
    outbuf, input_, goodbye = (_bytes(item, fd, name) for name in ("outbuf", "input", "goodbye"))
    return ConnectionState(fd, protocol, request, tuple(channels), last_id, outbuf,
                           None if deadline is None else float(deadline), state, input_, goodbye)


def _bytes(item: dict, fd: int, name: str) -> bytes:
    try:
        return base64.b64decode(item.get(name, ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise HandoffError(f"connection {fd}: {name} is not base64") from None
