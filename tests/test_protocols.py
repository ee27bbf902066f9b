"""Sans-IO protocol framing, checked against independent parsers (httpx-sse, h11)."""

from __future__ import annotations

import json
import re

import h11
import pytest
from httpx_sse._decoders import SSEDecoder
from hypothesis import given
from hypothesis import strategies as st

from wsgi_hijack.bus import InProcessBus, Message, PublishError, check_event
from wsgi_hijack.protocols import ChunkedStream, LongPoll, ServerSentEvents, encode_event
from wsgi_hijack.protocols.chunked import HEAD_HEADERS as CHUNKED_HEAD
from wsgi_hijack.protocols.chunked import LAST_CHUNK

# Start no subprocess, need no redis, chromium or uWSGI: `pytest -m unit`.
pytestmark = pytest.mark.unit

SAFE_NAME = st.text(st.characters(exclude_characters="\r\n\x00", exclude_categories=("Cs",)),
                    min_size=1, max_size=40)


def parse_sse(data: bytes) -> list:
    decoder = SSEDecoder()
    events = []
    # Every line ends in LF, so the piece after the last LF is not a line.
    for line in data.decode("utf-8").split("\n")[:-1]:
        sse = decoder.decode(line)
        if sse is not None:
            events.append(sse)
    return events


@given(text=st.text(), event=st.one_of(st.none(), SAFE_NAME), id=st.integers(1, 2**63))
def test_any_text_survives_sse_framing(text, event, id):
    events = parse_sse(encode_event(text, event, id))
    assert len(events) == 1
    # SSE turns CR, LF and CRLF alike into LF: that is the one change allowed.
    assert events[0].data == re.sub(r"\r\n|\r", "\n", text)
    assert events[0].event == (event if event is not None else "message")
    assert events[0].id == str(id)


@given(st.text(max_size=10), st.sampled_from(["\r", "\n", "\r\n"]), st.text(max_size=10))
def test_newline_in_event_name_can_never_inject_a_field(before, newline, after):
    name = before + newline + after
    with pytest.raises(PublishError):
        check_event(name)
    with pytest.raises(ValueError):
        encode_event("x", event=name)
    with pytest.raises(ValueError):
        encode_event("x", id=name)


def test_sse_message_frame_is_made_once_and_shared():
    sse = ServerSentEvents(retry_ms=1000)
    message = Message(7, "c", "hi", "ev", 0.0)
    from wsgi_hijack.protocols import framed

    first = framed(sse, message)
    assert first == b"id: 7\nevent: ev\ndata: hi\n\n"
    assert framed(sse, message) is first  # the same bytes object for every subscriber


def _parse_http(response: bytes) -> tuple[h11.Response, bytes, bool]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(response)
    head, body, ended = None, b"", False
    while True:
        event = client.next_event()
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            ended = True
            break
        else:
            break
    return head, body, ended


@given(st.lists(st.text(), min_size=1, max_size=8))
def test_chunked_stream_parses_with_h11(texts):
    proto = ChunkedStream()
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(
        f"{k}: {v}\r\n".encode() for k, v in CHUNKED_HEAD) + b"\r\n"
    frames = [proto.frame(Message(i + 1, "c", t, None, 0.0)) for i, t in enumerate(texts)]
    wire = head + proto.heartbeat + b"".join(frames) + proto.heartbeat + proto.goodbye
    response, body, ended = _parse_http(wire)
    assert response.status_code == 200 and ended
    assert body == b"\n" + "".join(t + "\n" for t in texts).encode() + b"\n"
    assert proto.goodbye == LAST_CHUNK


@given(st.text(), st.one_of(st.none(), SAFE_NAME))
def test_long_poll_response_parses_with_h11(text, event):
    message = Message(3, "chan", text, event, 0.0)
    response, body, ended = _parse_http(LongPoll().frame(message))
    assert response.status_code == 200 and ended
    assert json.loads(body) == {"messages": [message.as_dict()], "last_id": 3, "gap": False}
    response, body, ended = _parse_http(LongPoll().timeout(9))
    assert json.loads(body) == {"messages": [], "last_id": 9, "gap": False} and ended


OPS = st.lists(st.tuples(st.sampled_from("abc"), st.text(max_size=3)), max_size=40)


@given(ops=OPS, size=st.integers(1, 6), after=st.integers(0, 45),
       channels=st.sets(st.sampled_from("abc"), min_size=1))
def test_replay_matches_a_model(ops, size, after, channels):
    """Replay returns exactly the retained messages after ``after`` on the
    channels, in id order, and flags a gap iff an evicted one was missed."""
    bus = InProcessBus(history_size=size, history_age=1e9, clock=lambda: 0)  # ids 1, 2, ...
    published = [(bus.publish(ch, data), ch, data) for ch, data in ops]
    replay = bus.replay(sorted(channels), after)
    retained = {}
    for ch in "abc":
        retained[ch] = [p for p in published if p[1] == ch][-size:]
    expect = sorted(p for ch in channels for p in retained[ch] if p[0] > after)
    assert [(m.id, m.channel, m.data) for m in replay.messages] == expect
    missed_evicted = any(p[0] > after and p not in retained[p[1]]
                         for p in published if p[1] in channels)
    assert replay.gap == (missed_evicted or after > len(published))


def test_publish_validation():
    bus = InProcessBus(clock=lambda: 0)
    with pytest.raises(PublishError, match="channel"):
        bus.publish("", "x")
    with pytest.raises(PublishError, match="UTF-8"):
        bus.publish("c", "\ud800")  # a lone surrogate cannot be sent
    with pytest.raises(PublishError, match="limit"):
        InProcessBus(max_message=10).publish("c", "x" * 11)
    with pytest.raises(PublishError, match="str or UTF-8 bytes"):
        bus.publish("c", 12)
    assert bus.publish("c", b"bytes are decoded") == 1
