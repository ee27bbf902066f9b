"""A WebSocket's parsing state moves to another process mid-message.

``WebSocketProtocol.handoff_state`` in the old process, ``resume`` and the
synthesised ``input`` in the new one: whatever byte the client's stream was
cut at (mid-header, mid-payload, mid-character, between fragments, inside a
ping), the messages of the old object followed by those of the new one are
exactly the messages sent, and every ping is answered once. Sans-IO: no
socket, no subprocess.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import Pong
from wsproto.frame_protocol import FrameProtocol, Opcode

from wsgi_hijack.protocols import websocket as wsmod
from wsgi_hijack.protocols.websocket import Endpoint, WebSocketProtocol

pytestmark = pytest.mark.unit

ENDPOINT = Endpoint(on_message=None, max_message=1 << 20, pong_timeout=30)
_client = FrameProtocol(client=True, extensions=[])  # masked client frames, random keys


def client_frame(opcode: Opcode, payload: bytes, fin: bool = True) -> bytes:
    return bytes(_client._serialize_frame(opcode, payload, fin))


class Recorder(WebSocketProtocol):
    """Records the complete messages it parses."""

    def __init__(self, endpoint: Endpoint = ENDPOINT, subprotocol: str | None = None) -> None:
        super().__init__(endpoint, subprotocol)
        self.got: list[str | bytes] = []

    def message_received(self, message: str | bytes) -> bool:
        self.got.append(message)
        return True


def encode(messages) -> tuple[bytes, list[int], list, list[bytes]]:
    """``messages``: ``(data, cuts, between)`` each: ``data`` (str: text, bytes:
    binary) is sent in fragments cut at the byte offsets ``cuts`` (mid-character
    included), and ``between[i]`` lists the control frames ``(opcode, payload)``
    sent after fragment ``i``. Returns the stream, where each frame starts, the
    messages and the payloads of the pings, in order."""
    frames, sent, pinged = [], [], []
    for data, cuts, between in messages:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        bounds = [0, *sorted(cuts), len(raw)]
        pieces = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        for i, piece in enumerate(pieces):
            opcode = Opcode.CONTINUATION if i else (
                Opcode.TEXT if isinstance(data, str) else Opcode.BINARY)
            frames.append(client_frame(opcode, piece, i == len(pieces) - 1))
            for control, payload in between.get(i, ()):
                frames.append(client_frame(control, payload))
                if control is Opcode.PING:
                    pinged.append(payload)
        sent.append(data)
    starts, at = [], 0
    for frame in frames:
        starts.append(at)
        at += len(frame)
    return b"".join(frames), starts, sent, pinged


PING, PONG = Opcode.PING, Opcode.PONG
UTF8 = "añb€c🎉d and more ✓✓"  # ñ: bytes 1-2, €: 4-6, 🎉: 8-11
SMALL_MESSAGES = [
    ("héllo wörld ✓", [], {}),
    (UTF8, [2, 5, 9, 10], {0: [(PING, b"p1")], 2: [(PONG, b"unasked")],
                           3: [(PING, b"x" * 125)]}),
    (bytes(range(256)) * 2, [10, 210, 500], {1: [(PING, b"")]}),
    ("ü" * 150, [], {}),  # 300 bytes: a 16-bit length
    ("", [], {0: [(PING, b"after empty")]}),
    (b"", [0, 0], {1: [(PING, b"between empty fragments")]}),
    ("tail 🎉", [], {}),
]
BIG_MESSAGES = SMALL_MESSAGES[:4] + [
    (bytes(range(251)) * 279, [], {}),  # 70,029 bytes in one frame: a 64-bit length
    ("x" * 10 + "€" * 30000, [5, 11, 80000], {1: [(PING, b"in a big one")]}),
] + SMALL_MESSAGES[4:]
SMALL = encode(SMALL_MESSAGES)
BIG = encode(BIG_MESSAGES)


def feed(proto: WebSocketProtocol, data: bytes, splits=()) -> bytes:
    """``data`` to ``proto`` in pieces cut at ``splits``; what it answers."""
    bounds = sorted({0, len(data), *(s for s in splits if 0 < s < len(data))})
    out = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        reply = proto.receive_data(data[a:b])
        assert reply is None or isinstance(reply, bytes), reply
        if reply:
            out.append(reply)
    return b"".join(out)


def pongs(out: bytes) -> list[bytes]:
    parser = WsConnection(ConnectionType.CLIENT)
    parser.receive_data(out)
    events = list(parser.events())
    assert all(isinstance(e, Pong) for e in events), events
    return [bytes(e.payload) for e in events]


def move(stream: bytes, cut: int, before=(), after=()) -> tuple[Recorder, Recorder, bytes]:
    """The first ``cut`` bytes to A (in pieces), A's state through JSON to a new
    B, then B gets ``input`` and the rest (in pieces). Returns A, B and all
    that A and B answered."""
    a = Recorder()
    out = feed(a, stream[:cut], before)
    state, data = a.handoff_state(a._seen + 1.5)
    assert isinstance(data, bytes)
    assert (state["parts"] is None) == (a._parts is None) and state["size"] == a._size
    assert a._ws is None or all(spare is not a._ws for spare in wsmod._spare)
    state = json.loads(json.dumps(state))
    b = Recorder()
    b.resume(state, 100.0)
    assert b._seen == pytest.approx(98.5) and b._size == a._size
    if data:
        out += feed(b, data)
    out += feed(b, stream[cut:], after)
    return a, b, out


def check_move(encoded, cut: int, before=(), after=()) -> None:
    stream, _starts, sent, pinged = encoded
    a, b, out = move(stream, cut, before, after)
    assert a.got + b.got == sent, (cut, a.got, b.got)
    assert pongs(out) == pinged, cut  # each ping answered once, by A or by B
    assert b._ws is None and b._parts is None and b._size == 0  # the stream ends idle


# -- whatever the cut, nothing lost, nothing twice ----------------------------------------


def test_every_cut_of_a_small_stream():
    stream = SMALL[0]
    for cut in range(len(stream) + 1):
        check_move(SMALL, cut)
        check_move(SMALL, cut, before=range(7, cut, 7), after=range(3, len(stream), 11))


def _interesting(starts: list[int]) -> list[int]:
    """Offsets in and around each frame's header (at most 14 bytes)."""
    return sorted({s + i for s in starts for i in range(16)})


@given(st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_cut_of_a_big_stream_in_any_chunks(data):
    stream, starts = BIG[0], BIG[1]
    cut = data.draw(st.one_of(st.integers(0, len(stream)),
                              st.sampled_from(_interesting(starts))), label="cut")
    before = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="before")
    after = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="after")
    check_move(BIG, cut, before, after)


_text = st.text(max_size=40)  # no surrogates: any of it is UTF-8


@st.composite
def _message(draw):
    data = draw(st.one_of(_text, st.binary(max_size=300)))
    size = len(data.encode("utf-8") if isinstance(data, str) else data)
    cuts = draw(st.lists(st.integers(0, size), max_size=3))
    controls = st.lists(st.tuples(st.sampled_from([PING, PONG]), st.binary(max_size=125)),
                        max_size=2)
    between = draw(st.dictionaries(st.integers(0, len(cuts)), controls, max_size=2))
    return data, cuts, between


@given(st.lists(_message(), min_size=1, max_size=5), st.data())
@settings(max_examples=300, deadline=None)
def test_any_messages_cut_anywhere(messages, data):
    encoded = encode(messages)
    stream = encoded[0]
    cut = data.draw(st.integers(0, len(stream)), label="cut")
    before = data.draw(st.lists(st.integers(0, len(stream)), max_size=8), label="before")
    check_move(encoded, cut, before)


# -- what the input is made of -------------------------------------------------------------


@pytest.mark.parametrize(("size", "consumed", "code"), [
    (200, 75, 125), (200, 74, 126), (130, 0, 126),
    (65546, 11, 126), (65546, 10, 127), (65546, 0, 127),
])
def test_rest_of_frame_header_uses_the_shortest_length(size, consumed, code):
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    frame = client_frame(Opcode.BINARY, payload)
    head = 6 if size <= 125 else 8 if size <= 0xFFFF else 14
    a = Recorder()
    a.receive_data(frame[:head + consumed])
    state, data = a.handoff_state(time.monotonic())
    full = data
    if consumed:  # the message is in progress: an empty binary frame first
        assert data[:6] == b"\x02\x80\0\0\0\0" and state["binary"]
        assert base64.b64decode(state["parts"]) == payload[:consumed]
        data = data[6:]
        assert data[0] == 0x80  # fin, CONTINUATION
    else:
        assert state["parts"] is None and data[0] == 0x82  # fin, BINARY
    assert data[1] == 0x80 | code
    remaining = size - consumed
    if code == 126:
        assert struct.unpack("!H", data[2:4])[0] == remaining and len(data) == 8
    elif code == 127:
        assert struct.unpack("!Q", data[2:10])[0] == remaining and len(data) == 14
    else:
        assert code == remaining and len(data) == 6
    b = Recorder()
    b.resume(state, time.monotonic())
    feed(b, full)
    feed(b, frame[head + consumed:])
    assert a.got == [] and b.got == [payload]


def test_partial_character_travels_in_a_text_frame_of_its_own():
    raw = "€uro".encode()
    stream = client_frame(Opcode.TEXT, raw[:1], False) + client_frame(Opcode.CONTINUATION,
                                                                     raw[1:])
    cut = len(stream) - len(client_frame(Opcode.CONTINUATION, raw[1:]))
    a = Recorder()
    a.receive_data(stream[:cut])
    state, data = a.handoff_state(time.monotonic())
    assert state["parts"] == "" and state["size"] == 0 and state["binary"] is False
    assert data == b"\x01\x81\0\0\0\0\xe2"  # TEXT, not fin, masked by a zero key
    b = Recorder()
    b.resume(state, time.monotonic())
    feed(b, data + stream[cut:])
    assert b.got == ["€uro"]


def test_a_half_received_ping_is_answered_once_by_the_new_object():
    ping = client_frame(PING, b"hello?")
    stream = client_frame(Opcode.TEXT, "ab€".encode(), False) + ping \
        + client_frame(Opcode.CONTINUATION, b"cd")
    cut = len(stream) - len(client_frame(Opcode.CONTINUATION, b"cd")) - 3
    a, b, out = move(stream, cut)
    assert a.got == [] and b.got == ["ab€cd"] and pongs(out) == [b"hello?"]


def test_idle_parser_gives_empty_input_and_leaves_the_spare_pool_alone():
    a = Recorder(subprotocol="chat")
    a.receive_data(client_frame(Opcode.TEXT, b"hi"))
    assert a._ws is None and wsmod._spare  # the parser went back to the pool
    pool = list(wsmod._spare)
    state, data = a.handoff_state(a._seen + 2.0)
    assert data == b"" and a._ws is None
    assert state == {"subprotocol": "chat", "seen_ago": 2.0, "size": 0, "parts": None,
                     "binary": False}
    assert len(wsmod._spare) == len(pool) and all(
        x is y for x, y in zip(wsmod._spare, pool, strict=True))


def test_a_busy_parser_is_only_read_and_never_pooled():
    a = Recorder()
    a.receive_data(client_frame(Opcode.TEXT, b"warm the pool"))
    frame = client_frame(Opcode.BINARY, b"z" * 1000)
    a.receive_data(frame[:300])
    busy = a._ws
    decoder = busy._proto._frame_decoder
    before = (bytes(decoder.buffer.buffer), decoder.payload_consumed,
              bytes(decoder.masker._masking_key), list(a._parts), a._size)
    first = a.handoff_state(50.0)
    assert a.handoff_state(50.0) == first  # read only: twice the same
    assert a._ws is busy and (bytes(decoder.buffer.buffer), decoder.payload_consumed,
                              bytes(decoder.masker._masking_key), list(a._parts),
                              a._size) == before
    assert all(spare is not busy for spare in wsmod._spare)
    b = Recorder()
    b.resume(json.loads(json.dumps(first[0])), 10.0)
    feed(b, first[1] + frame[300:])
    assert b.got == [b"z" * 1000] and b._ws is None
    assert all(wsmod._idle(spare) for spare in wsmod._spare)


# -- the state dict ------------------------------------------------------------------------


def _busy_state(binary: bool) -> dict:
    a = Recorder()
    if binary:
        a.receive_data(client_frame(Opcode.BINARY, b"\xff\x00bin", False))
    else:
        a.receive_data(client_frame(Opcode.TEXT, "é🎉\u2028\"\\".encode(), False))
    return a.handoff_state(a._seen)[0]


@pytest.mark.parametrize("binary", [False, True])
def test_state_survives_json(binary):
    state = _busy_state(binary)
    assert json.loads(json.dumps(state)) == state
    assert json.loads(json.dumps(state, ensure_ascii=True)) == state
    b = Recorder()
    b.resume(json.loads(json.dumps(state)), 5.0)
    assert b._parts == [b"\xff\x00bin"] if binary else b._parts == ["é🎉\u2028\"\\"]


def test_resume_restores_the_clock_and_the_subprotocol():
    state = dict(_busy_state(False), subprotocol="chat", seen_ago=4.0)
    b = Recorder()
    b.resume(state, 1000.0)
    assert b._seen == 996.0 and b.subprotocol == "chat"
    assert b.liveness(996.0 + 29) is None and b.liveness(996.0 + 31) == wsmod.PING_TIMEOUT
    same = Recorder(subprotocol="chat")
    same.resume(state, 0.0)
    assert same.subprotocol == "chat"
    with pytest.raises(ValueError, match="subprotocol"):
        Recorder(subprotocol="other").resume(state, 0.0)
    with pytest.raises(RuntimeError):
        b.resume(state, 0.0)  # b already has a message in progress


def test_seen_ago_is_never_negative():
    a = Recorder()
    assert a.handoff_state(a._seen - 5)[0]["seen_ago"] == 0.0


_BAD = [
    ("subprotocol", 7), ("subprotocol", ["chat"]),
    ("seen_ago", "1"), ("seen_ago", None), ("seen_ago", True), ("seen_ago", -0.5),
    ("seen_ago", math.nan), ("seen_ago", math.inf),
    ("size", "7"), ("size", None), ("size", True), ("size", 1.5), ("size", -1), ("size", 6),
    ("parts", 5), ("parts", ["AAAA"]), ("parts", b"bytes"), ("parts", "not base64!"),
    ("parts", "AAA"), ("parts", "é"),
    ("binary", "yes"), ("binary", 1), ("binary", None),
]


@pytest.mark.parametrize(("field", "value"), _BAD, ids=[f"{f}={v!r}" for f, v in _BAD])
def test_bad_field_raises_value_error_naming_it(field, value):
    state = _busy_state(binary=True)  # parts: 5 bytes in base64, size 5
    state[field] = value
    with pytest.raises(ValueError, match=field):
        Recorder().resume(state, 0.0)


@pytest.mark.parametrize("state", [
    None, [], "state",
    {"subprotocol": None, "seen_ago": 0, "size": 0, "parts": None},
    {"subprotocol": None, "seen_ago": 0, "size": 0, "parts": None, "binary": False, "x": 1},
    {"subprotocol": None, "seen_ago": 0, "size": 3, "parts": None, "binary": False},
    {"subprotocol": None, "seen_ago": 0, "size": 0, "parts": None, "binary": True},
    {"subprotocol": None, "seen_ago": 0, "size": 1, "parts": "é", "binary": False},
])
def test_bad_state_raises_value_error(state):
    with pytest.raises(ValueError):
        Recorder().resume(state, 0.0)


def test_good_idle_state_resumes():
    b = Recorder()
    b.resume({"subprotocol": None, "seen_ago": 0, "size": 0, "parts": None,
              "binary": False}, 3.0)
    assert b._seen == 3.0 and b._parts is None and b._size == 0
    b.receive_data(client_frame(Opcode.TEXT, b"after"))
    assert b.got == ["after"]


# -- the app's handle: messages its callback has not taken yet -----------------------------


def test_queued_messages_lists_what_the_callback_has_not_taken():
    import gevent
    import gevent.event

    from wsgi_hijack.websocket import WebSocket

    release = gevent.event.Event()
    taken = []

    def on_message(ws, message):
        taken.append(message)
        release.wait()

    ws = WebSocket(Endpoint(on_message=on_message, max_message=1000, pong_timeout=30,
                            max_queue=10))
    ws.conn = object()
    assert ws.queued_messages() == []
    ws.receive_data(client_frame(Opcode.TEXT, b"one") + client_frame(Opcode.BINARY, b"two")
                    + client_frame(Opcode.TEXT, b"three"))
    assert ws.queued_messages() == ["one", b"two", "three"]
    assert ws.queued_messages() == ["one", b"two", "three"]  # left in place
    gevent.sleep(0)  # the callback takes "one" and waits
    assert taken == ["one"] and ws.queued_messages() == [b"two", "three"]
    ws.receive_data(client_frame(Opcode.TEXT, b"four"))
    assert ws.queued_messages() == [b"two", "three", "four"]
    release.set()
    gevent.sleep(0.01)
    assert taken == ["one", b"two", "three", "four"] and ws.queued_messages() == []
