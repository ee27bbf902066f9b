"""WebSocket (RFC 6455) frames on a held connection, sans-IO, with wsproto.

The handshake is done before the connection reaches the reactor
(:mod:`wsgi_hijack.websocket`); from then on this module turns events into
bytes. Frames are parsed and built by wsproto_ (``wsproto.connection.
Connection`` in its low-level server mode and its ``FrameProtocol``); nothing
here parses frames by hand.

Three kinds of object, so that an idle connection costs almost nothing
(benchmarks/results/websocket_latency.md, server RSS per connection):

:class:`WebSocketFramer` -- shared, one per payload format
    Frames a published message once, as an unmasked server text frame, for
    every WebSocket subscriber (``Protocol.framer``; the bytes are cached on
    the message). ``JSON_FRAMER`` sends ``{"id", "channel", "event", "data"}``
    (ids let a client resume with ``?last_id=``); ``TEXT_FRAMER`` sends the
    message's data alone.

:class:`Endpoint` -- shared, one per app configuration
    The app's ``on_message`` callback, the message size limit, the pong
    timeout and the framer. Made once and reused for every connection that
    has the same settings.

:class:`WebSocketProtocol` -- one per connection, the ``protocol`` the reactor holds
    ``__slots__`` only. The app's handle, :class:`wsgi_hijack.websocket.WebSocket`,
    is this class with what the app may do added (reply, close, its callback's
    greenlets): one object per connection, and nothing here knows gevent or
    the reactor. While the connection is idle it holds no parser: the
    wsproto ``Connection``, several times this object's size, is made when
    bytes arrive and dropped again as soon as nothing is left half-parsed (no
    partial frame buffered, no fragmented message in progress). An idle
    WebSocket is this object plus the reactor's own
    :class:`~wsgi_hijack.connection.Connection`
    (``tests/test_websocket.py::test_idle_connection_holds_no_parser_and_little_memory``
    measures both).

Decisions:

- Heartbeats are pings (one shared frame); each round the reactor then asks
  :meth:`WebSocket.liveness`, and a peer from which nothing at all (pong or
  any frame) arrived for ``WSGI_HIJACK_WS_PONG_TIMEOUT`` seconds gets a close
  frame with code 1011 ("ping timeout", as the ``websockets`` library does)
  and is closed.
- Close codes: 1001 when the server shuts down (``goodbye``), 1009 for a
  message over ``WSGI_HIJACK_WS_MAX_MESSAGE`` (refused from its frame header,
  before its payload is read), 1007 for text that is not UTF-8, 1002 for any
  other protocol error wsproto reports (unmasked client frame, reserved bits,
  bad opcode, fragmented control frame...), 1008 when a client sends faster
  than its callback can take (``WSGI_HIJACK_WS_MAX_QUEUE`` messages waiting).
  A client's Close is answered with the same code (the close handshake), then
  the connection is closed once that answer is flushed.
- No extension is negotiated (no permessage-deflate), so the frames of a
  published message are the same bytes for every subscriber.
- A held connection can move to another worker process mid-message:
  :meth:`WebSocketProtocol.handoff_state` exports the parser's state as a
  JSON-safe dict plus synthesised client frames, and
  :meth:`WebSocketProtocol.resume` takes them up in a fresh object, so that
  nothing the client sent is lost or delivered twice.
- Each complete message the client sends (``str`` for text, ``bytes`` for
  binary) goes to :meth:`WebSocketProtocol.message_received`; when that
  refuses it (the app's queue is full), the connection is closed with 1008.

.. _wsproto: https://python-hyper.org/projects/wsproto/
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from wsproto.connection import Connection as _WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

from .. import config
from .base import ConnectionDone, Protocol, ProtocolError, framed

if TYPE_CHECKING:
    from ..bus.base import Message, Replay

log = logging.getLogger("wsgi_hijack.websocket")

_monotonic = time.monotonic
_SERVER = ConnectionType.SERVER
_OPEN = ConnectionState.OPEN

# Builds unmasked server frames. With fin=True on every data frame it keeps no
# state between calls, so one instance serves every connection.
_frames = FrameProtocol(client=False, extensions=[])


def text_frame(text: str) -> bytes:
    """One unmasked server text frame carrying ``text``."""
    return bytes(_frames.send_data(text, True))


def binary_frame(data: bytes) -> bytes:
    """One unmasked server binary frame carrying ``data``."""
    return bytes(_frames.send_data(bytes(data), True))


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame with ``code`` and ``reason`` (truncated to fit 125 bytes)."""
    return bytes(_frames.close(code, reason))


PING = bytes(_frames.ping(b""))
GOING_AWAY = close_frame(CloseReason.GOING_AWAY, "server shutting down")
PING_TIMEOUT = close_frame(CloseReason.INTERNAL_ERROR, "ping timeout")


class WebSocketFramer(Protocol):
    """Frames published messages once for all WebSocket subscribers (shared)."""

    name = "websocket"

    def __init__(self, envelope: bool = True) -> None:
        self.envelope = envelope

    def frame(self, message: Message) -> bytes:
        if self.envelope:
            return text_frame(json.dumps(message.as_dict(), ensure_ascii=False))
        return text_frame(message.data)

    def opening_frames(self, replay: Replay) -> list[bytes]:
        out = []
        if replay.gap and self.envelope:
            # Some of what the client missed is gone from the history.
            out.append(text_frame(json.dumps({"gap": True, "last_id": replay.last_id})))
        out.extend(framed(self, m) for m in replay.messages)
        return out


JSON_FRAMER = WebSocketFramer(envelope=True)
TEXT_FRAMER = WebSocketFramer(envelope=False)

OnMessage = Callable[[Any, "str | bytes"], Any]


class Endpoint:
    """Settings shared by every connection of one WebSocket route."""

    __slots__ = ("on_message", "max_message", "pong_timeout", "max_queue", "framer",
                 "__weakref__")

    def __init__(self, on_message: OnMessage | None = None, max_message: int | None = None,
                 pong_timeout: float | None = None, max_queue: int | None = None,
                 envelope: bool = True) -> None:
        self.on_message = on_message
        self.max_message = max_message if max_message is not None else config.ws_max_message()
        self.pong_timeout = (pong_timeout if pong_timeout is not None
                             else config.ws_pong_timeout())
        self.max_queue = max_queue if max_queue is not None else config.ws_max_queue()
        self.framer = JSON_FRAMER if envelope else TEXT_FRAMER
        if self.max_message <= 0 or self.pong_timeout <= 0 or self.max_queue <= 0:
            raise ValueError("max_message, pong_timeout and max_queue must be positive")
        if self.pong_timeout <= config.heartbeat_interval():
            log.warning("WebSocket pong timeout %.3g s is not longer than the heartbeat "
                        "interval (%.3g s): every peer will be closed as dead",
                        self.pong_timeout, config.heartbeat_interval())


class WebSocketProtocol(Protocol):
    """One WebSocket connection's framing and parsing (its ``protocol``)."""

    __slots__ = ("endpoint", "subprotocol", "_seen", "_ws", "_parts", "_size")

    name = "websocket"
    heartbeat = PING
    goodbye = GOING_AWAY
    checks_liveness = True
    movable = True

    def __init__(self, endpoint: Endpoint, subprotocol: str | None = None) -> None:
        self.endpoint = endpoint
        self.subprotocol = subprotocol
        self._seen = _monotonic()
        self._ws: _WsConnection | None = None  # the parser, only while busy
        self._parts: list | None = None  # a fragmented message's data so far
        self._size = 0

    # -- what the reactor asks ---------------------------------------------------

    @property
    def framer(self) -> Protocol:
        return self.endpoint.framer

    def frame(self, message: Message) -> bytes:
        return self.endpoint.framer.frame(message)

    def opening_frames(self, replay: Replay) -> list[bytes]:
        return self.endpoint.framer.opening_frames(replay)

    def liveness(self, now: float) -> bytes | None:
        if now - self._seen > self.endpoint.pong_timeout:
            return PING_TIMEOUT
        return None

    def receive_data(self, data: bytes) -> bytes | ConnectionDone | None:
        try:
            return self._receive(data)
        except ProtocolError:
            raise
        except Exception as exc:  # a bug here or in wsproto: close this one, not the loop
            log.exception("websocket input failed")
            self._ws = self._parts = None
            raise ProtocolError(f"websocket internal error: {exc!r}",
                                close_frame(CloseReason.INTERNAL_ERROR, "internal error")) from exc

    def _receive(self, data: bytes) -> bytes | ConnectionDone | None:
        self._seen = _monotonic()
        ws = self._ws
        if ws is None:
            ws = self._ws = _spare.pop() if _spare else _WsConnection(_SERVER)
        ws.receive_data(data)
        out = []
        limit = self.endpoint.max_message
        for event in ws.events():
            kind = type(event)
            if kind is TextMessage or kind is BytesMessage:
                chunk = event.data
                self._size += len(chunk.encode("utf-8", "surrogatepass")) \
                    if kind is TextMessage else len(chunk)
                if self._size > limit:
                    self._too_big(out)
                if not event.message_finished:
                    if self._parts is None:
                        self._parts = []
                    self._parts.append(chunk)
                    continue
                if self._parts is not None:
                    self._parts.append(chunk)
                    chunk = ("" if kind is TextMessage else b"").join(self._parts)
                    self._parts = None
                self._size = 0
                self._incoming(chunk, out)
            elif kind is Ping:
                out.append(ws.send(event.response()))
            elif kind is CloseConnection:
                self._ws = None
                if ws.state is _OPEN:  # not the peer's Close: wsproto refused the input
                    code = int(event.code)
                    raise ProtocolError(f"websocket close {code}: {event.reason}",
                                        b"".join(out) + close_frame(code, event.reason or ""))
                # The peer's Close: answer it (same code), then close.
                out.append(ws.send(event.response()))
                return ConnectionDone(b"".join(out))
            # Pong: nothing to do but remember that the peer is alive (above).
        # A frame whose header announces more than the limit: refuse it now.
        # (Its part already read is in self._size; control frames are at most 125.)
        decoder = ws._proto._frame_decoder
        header = decoder.header
        if header is not None and not header.opcode.iscontrol() and \
                self._size + header.payload_len - decoder.payload_consumed > limit:
            self._too_big(out)
        if self._parts is None and _idle(ws):
            # Nothing half-parsed: let go of the parser until more comes. An idle
            # parser is as good as a new one: keep it for the next connection.
            self._ws = None
            if not _spare:
                _spare.append(ws)
        return b"".join(out) if out else None

    def _too_big(self, out: list) -> None:
        self._ws = self._parts = None
        limit = self.endpoint.max_message
        raise ProtocolError(f"websocket message over {limit} bytes",
                            b"".join(out) + close_frame(CloseReason.MESSAGE_TOO_BIG,
                                                        f"message over {limit} bytes"))

    # -- the app's side -------------------------------------------------------------

    def message_received(self, message: str | bytes) -> bool:
        """A complete message from the client. Return False to refuse it (the
        connection is then closed with 1008). Here: dropped, accepted."""
        return True

    def _incoming(self, message: str | bytes, out: list) -> None:
        if not self.message_received(message):
            self._ws = self._parts = None
            raise ProtocolError("websocket client sends faster than its callback takes",
                                b"".join(out) + close_frame(CloseReason.POLICY_VIOLATION,
                                                            "too many messages waiting"))

    # -- moving to another process ----------------------------------------------------

    def handoff_state(self, now: float) -> tuple[dict, bytes]:
        """This connection's parsing state, for :meth:`resume` in another process.

        Returns ``(state, input)``. ``state`` is JSON-safe: ``subprotocol``,
        ``seen_ago`` (seconds since the peer was last heard, ``now`` on the
        clock of ``_seen``), ``size`` (bytes of the message in progress so far),
        ``parts`` (that message's data so far, joined: a ``str``, base64 when
        ``binary``; None when no message is in progress) and ``binary``.
        ``input`` is client frames (masked) that bring a fresh wsproto parser
        to where this one is: a non-final frame of the message's opcode with
        the bytes of a partly received UTF-8 character, the header of the
        frame being read (for what is left of its payload), then the bytes
        wsproto has not parsed yet. An idle parser gives ``b""``.

        Read only: this object and its parser are left as they are (a busy
        parser is never put in the pool of spare ones). Reads wsproto 1.3's
        internals, as :func:`_idle` does."""
        state = {"subprotocol": self.subprotocol, "seen_ago": max(0.0, now - self._seen),
                 "size": self._size, "parts": None, "binary": False}
        ws = self._ws
        if ws is None:
            return state, b""
        if ws.state is not _OPEN:
            raise RuntimeError("websocket is closing: nothing to hand off")
        proto = ws._proto
        decoder = proto._frame_decoder
        message = proto._message_decoder
        out = bytearray()
        if message.opcode is not None:  # a message in progress
            binary = message.opcode is Opcode.BINARY
            parts = self._parts or ()
            if binary:
                state["parts"] = base64.b64encode(b"".join(parts)).decode("ascii")
            else:
                state["parts"] = "".join(parts)
            state["binary"] = binary
            pending = b"" if message.decoder is None else bytes(message.decoder.getstate()[0])
            out += _client_header(message.opcode, False, (False, False, False), len(pending),
                                  _ZERO_KEY) + pending  # a zero key: masked is as clear
        header = decoder.header
        if header is not None:  # a frame whose header is read, its payload not all
            opcode = header.opcode
            if message.opcode is not None and not opcode.iscontrol():
                opcode = Opcode.CONTINUATION
            masker = getattr(decoder.masker, "_masking_key", None)  # rotated as consumed
            key = masker if masker is not None else header.masking_key or _ZERO_KEY
            out += _client_header(opcode, header.fin, header.rsv,
                                  header.payload_len - decoder.payload_consumed, key)
        buffer = decoder.buffer  # wsproto's Buffer: its bytes from bytes_used on are unread
        out += buffer.buffer[buffer.bytes_used:]
        return state, bytes(out)

    def resume(self, state: dict, now: float) -> None:
        """Take up :meth:`handoff_state`'s ``state`` in this new object; ``now``
        is on this process's monotonic clock. Then feed the ``input`` that came
        with it through :meth:`receive_data`, before any new bytes from the
        client. That is the normal path: a ping whose frame ``input``
        completes is answered here (were a whole ping in it, answering it a
        second time would be harmless: an extra pong). Receiving ``input``
        counts as hearing from the peer, as any input does.

        Raises ValueError naming the field when ``state`` is not one that
        :meth:`handoff_state` makes, or when its subprotocol is not this one's;
        RuntimeError when this object has already parsed input."""
        if self._ws is not None or self._parts is not None:
            raise RuntimeError("resume() needs a WebSocketProtocol that has parsed nothing")
        if not isinstance(state, dict):
            raise ValueError(f"websocket state must be a dict, not {type(state).__name__}")
        fields = {"subprotocol", "seen_ago", "size", "parts", "binary"}
        if state.keys() != fields:
            missing, unknown = sorted(fields - state.keys()), sorted(state.keys() - fields)
            raise ValueError(f"websocket state: missing fields {missing}, unknown {unknown}")
        subprotocol, seen_ago, size = state["subprotocol"], state["seen_ago"], state["size"]
        parts, binary = state["parts"], state["binary"]
        if subprotocol is not None and not isinstance(subprotocol, str):
            raise ValueError(f"websocket state: subprotocol must be a str or null: {subprotocol!r}")
        if subprotocol is not None and self.subprotocol not in (None, subprotocol):
            raise ValueError(f"websocket state: subprotocol {subprotocol!r} is not this "
                             f"connection's {self.subprotocol!r}")
        if isinstance(seen_ago, bool) or not isinstance(seen_ago, int | float) \
                or not math.isfinite(seen_ago) or seen_ago < 0:
            raise ValueError(f"websocket state: seen_ago must be a finite number >= 0: "
                             f"{seen_ago!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"websocket state: size must be an int >= 0: {size!r}")
        if not isinstance(binary, bool):
            raise ValueError(f"websocket state: binary must be a bool: {binary!r}")
        if parts is None:
            if binary or size:
                raise ValueError("websocket state: no parts (no message in progress) "
                                 "but binary or size set")
        elif not isinstance(parts, str):
            raise ValueError(f"websocket state: parts must be a str or null, not "
                             f"{type(parts).__name__}")
        elif binary:
            try:
                parts = base64.b64decode(parts.encode("ascii"), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"websocket state: parts is not base64: {exc}") from None
        if parts is not None:
            length = len(parts) if binary else len(parts.encode("utf-8", "surrogatepass"))
            if size != length:
                raise ValueError(f"websocket state: size {size} is not the {length} bytes "
                                 f"of parts")
        if self.subprotocol is None:
            self.subprotocol = subprotocol
        self._seen = now - seen_ago
        self._size = size
        self._parts = None if parts is None else [parts]


# One idle wsproto parser, reused by whichever idle connection receives next
# (most incoming data is one whole frame: a pong, a short message). Only the
# reactor's thread parses.
_spare: list[_WsConnection] = []


def _idle(ws: _WsConnection) -> bool:
    """Nothing half-parsed in wsproto: no partial frame buffered, no fragmented
    message in progress. (Reads wsproto's internals; checked by the tests.)"""
    proto = ws._proto
    decoder = proto._frame_decoder
    return (ws.state is _OPEN and decoder.header is None and not len(decoder.buffer)
            and proto._message_decoder.opcode is None)


_ZERO_KEY = b"\0\0\0\0"


def _client_header(opcode: Opcode, fin: bool, rsv: tuple, length: int, key: bytes) -> bytes:
    """A masked client frame's header (RFC 6455 5.2: the shortest length encoding,
    which wsproto insists on), for :meth:`WebSocketProtocol.handoff_state`."""
    first = (fin << 7) | (rsv[0] << 6) | (rsv[1] << 5) | (rsv[2] << 4) | int(opcode)
    if length <= 125:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length <= 0xFFFF:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + bytes(key)
