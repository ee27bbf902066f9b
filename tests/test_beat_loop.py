"""The heartbeat round's hot loop: a C-speed loop over fds, with a slow path
for whatever the kernel does not take whole. In-process, on socketpairs."""

from __future__ import annotations

import os
import socket
import time

import gevent
import pytest

from harness.wire import recv_exactly
from wsgi_hijack import reactor as reactor_module
from wsgi_hijack.protocols.plain import PlainStream
from wsgi_hijack.protocols.sse import ServerSentEvents
from wsgi_hijack.reactor import fanout

# Start no subprocess, need no redis, chromium or uWSGI: `pytest -m unit`.
pytestmark = pytest.mark.unit

BEAT = b"BEEP\n"


def _fill(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.send(b"x" * 65536)
    except BlockingIOError:
        pass


def test_the_c_fan_out_loop_was_built_and_is_used():
    """scripts/test.sh installs gcc, so the extension must be there: a silent
    fallback to the Python loop would cost about 1 us per connection."""
    assert fanout.write_each_c is not None
    assert fanout.write_each is fanout.write_each_c


# Both loops, the C one and its Python fallback, must give the same answers.
IMPLEMENTATIONS = [pytest.param(fanout.write_each_py, id="python"),
                   pytest.param(fanout.write_each_c, id="c")]


@pytest.mark.parametrize("write_each", IMPLEMENTATIONS)
def test_write_each_hands_back_only_what_needs_the_slow_path(write_each):
    pairs = [socket.socketpair() for _ in range(6)]
    try:
        for ours, _ in pairs:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pairs[1][1].close()          # the peer is gone: EPIPE
        _fill(pairs[3][0])           # the send buffer is full: would block
        fds = [ours.fileno() for ours, _ in pairs]
        for ours, _ in pairs:
            ours.setblocking(False)
        big = b"y" * (1 << 20)       # more than any send buffer: a partial write
        trouble = write_each(fds, big)
        by_fd = dict(trouble)
        assert by_fd[fds[1]] is None and by_fd[fds[3]] is None
        # every other fd took part of it: the loop went on past the failures
        for i in (0, 2, 4, 5):
            assert 0 < by_fd[fds[i]] < len(big), i
        assert [fd for fd, _ in trouble] == [fds[i] for i in range(6)]

        assert write_each([fds[0], fds[2]], b"") == []
        assert write_each([], BEAT) == []
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


@pytest.mark.parametrize("write_each", IMPLEMENTATIONS)
def test_all_beats_taken_whole_is_the_empty_answer(write_each):
    pairs = [socket.socketpair() for _ in range(50)]
    try:
        assert write_each([a.fileno() for a, _ in pairs], BEAT) == []
        for _, theirs in pairs:
            assert theirs.recv(100) == BEAT
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


@pytest.fixture
def reactor():
    r = reactor_module.Reactor(heartbeat=3600).start()
    yield r
    r.close(goodbye=False)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(5)
    return recv_exactly(sock, n)


def test_a_waiting_connection_gets_each_beat_once_behind_its_bytes(reactor):
    ours, theirs = socket.socketpair()
    other_ours, other_theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn = reactor.hold(ours, PlainStream(BEAT))
        reactor.hold(other_ours, PlainStream(BEAT))
        gevent.sleep(0.05)
        backlog = b"".join(b"%06d\n" % i for i in range(5000))  # 35 KB, over the buffer
        reactor.write(conn, backlog)
        assert conn.outbuf, "the test needs bytes left waiting"
        for _ in range(3):
            reactor.heartbeat_round()
        expected = backlog + BEAT * 3
        got = b""
        while len(got) < len(expected):  # read while the reactor drains the rest
            theirs.settimeout(5)
            got += theirs.recv(65536)
            gevent.sleep(0.01)
        assert got == expected
        assert _read_exactly(other_theirs, 15) == BEAT * 3
        gevent.sleep(0.05)
        assert not conn.outbuf and conn.fd not in reactor._armed
    finally:
        for s in (theirs, other_theirs):
            s.close()


def test_each_protocol_gets_its_own_heartbeat_and_groups_empty_out(reactor):
    plain_ours, plain_theirs = socket.socketpair()
    sse_ours, sse_theirs = socket.socketpair()
    try:
        reactor.hold(plain_ours, PlainStream(BEAT))
        reactor.hold(sse_ours, ServerSentEvents())
        gevent.sleep(0.05)
        assert len(reactor._heartbeats.groups) == 2
        reactor.heartbeat_round()
        assert _read_exactly(plain_theirs, len(BEAT)) == BEAT
        ping = ServerSentEvents.heartbeat
        assert _read_exactly(sse_theirs, len(ping)) == ping
        plain_theirs.close()
        sse_theirs.close()
        reactor.heartbeat_round()  # EPIPE on both: dropped through the slow path
        gevent.sleep(0.05)
        assert len(reactor) == 0 and reactor._heartbeats.groups == {} and reactor._armed == set()
        assert reactor.stats["dropped_closed"] == 2
    finally:
        plain_theirs.close()
        sse_theirs.close()


def test_a_reactor_started_after_another_closed_works():
    """Metrics are process-wide: a second reactor reuses them, it does not crash
    on prometheus's duplicate-name check (the bug this test was written for)."""
    first = reactor_module.Reactor(heartbeat=3600).start()
    first.close(goodbye=False)
    second = reactor_module.Reactor(heartbeat=3600).start()
    try:
        ours, theirs = socket.socketpair()
        second.hold(ours, PlainStream(BEAT))
        gevent.sleep(0.05)
        second.heartbeat_round()
        assert _read_exactly(theirs, len(BEAT)) == BEAT
        theirs.close()
    finally:
        second.close(goodbye=False)


def _read_until(sock: socket.socket, ending: bytes, limit: float = 5) -> bytes:
    sock.settimeout(limit)
    data = b""
    while not data.endswith(ending):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data[-200:]!r}"
        data += chunk
        gevent.sleep(0.01)  # the reactor drains waiting bytes meanwhile
    return data


def test_a_message_fans_out_per_framer_past_waiting_and_dead_subscribers(reactor):
    """One message to SSE, chunked and long-poll subscribers of one channel:
    each framer's frame is made once and written by the C loop; a subscriber
    with bytes waiting gets it behind them, a dead one is dropped, a one-shot
    one completes, and the others are untouched."""
    import time

    from wsgi_hijack.bus import Message
    from wsgi_hijack.streams import CHUNKED, LONG_POLL, SSE

    def held(protocol, channel="news", sndbuf=None):
        ours, theirs = socket.socketpair()
        if sndbuf:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        return reactor.hold(ours, protocol, channels=(channel,)), theirs

    subs = {name: held(p, sndbuf=4096 if name == "sse_waiting" else None) for name, p in
            (("sse", SSE), ("sse_waiting", SSE), ("sse_dead", SSE),
             ("chunked", CHUNKED), ("poll", LONG_POLL))}
    other = held(SSE, channel="other")
    try:
        gevent.sleep(0.05)
        assert reactor.subscriber_count("news") == 5
        # the opening SSE retry line, so what follows is only the message
        for theirs in (subs["sse"][1], subs["sse_dead"][1], other[1]):
            theirs.settimeout(5)
            assert theirs.recv(100).startswith(b"retry: ")
        backlog = b"".join(b": %06d\n" % i for i in range(5000))
        reactor.write(subs["sse_waiting"][0], backlog)
        assert subs["sse_waiting"][0].outbuf
        subs["sse_dead"][1].close()

        message = Message(reactor.bus.last_id() + 1, "news", "hello\nworld", "greeting",
                          time.time())  # above the bus's ids, which start at the clock
        reactor.dispatch(message)
        gevent.sleep(0.1)
        sse_frame = SSE.frame(message)
        assert len(message.frames) == 3  # SSE, chunked, long-poll: once each
        assert _read_until(subs["sse"][1], sse_frame) == sse_frame
        assert _read_until(subs["chunked"][1], CHUNKED.frame(message)) == CHUNKED.frame(message)
        got = _read_until(subs["sse_waiting"][1], sse_frame)
        assert got.endswith(backlog + sse_frame) and got.count(b"hello") == 1
        poll = subs["poll"][1]
        poll.settimeout(5)
        answer = b""
        while chunk := poll.recv(65536):
            answer += chunk
        assert answer == LONG_POLL.frame(message)  # complete, then closed
        other[1].settimeout(0.2)
        with pytest.raises(TimeoutError):  # another channel's subscriber: nothing
            other[1].recv(100)
        assert reactor.stats["deliveries"] == 5
        assert reactor.subscriber_count("news") == 3  # the dead and the completed left
        assert reactor.stats["dropped_closed"] == 1 and reactor.stats["completed"] == 1
    finally:
        for _, theirs in [*subs.values(), other]:
            theirs.close()


@pytest.mark.parametrize("write_each", IMPLEMENTATIONS)
def test_write_each_refuses_what_is_not_a_list_of_fds(write_each):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(TypeError):
            write_each([ours.fileno(), "3"], BEAT)
        with pytest.raises(TypeError):
            write_each([ours.fileno()], "not bytes")


def test_the_python_loop_runs_the_reactor_too(monkeypatch, reactor):
    """Where the extension could not be built: the reactor on the Python loop."""
    monkeypatch.setattr(fanout, "write_each", fanout.write_each_py)
    ours, theirs = socket.socketpair()
    dead_ours, dead_theirs = socket.socketpair()
    try:
        reactor.hold(ours, PlainStream(BEAT))
        reactor.hold(dead_ours, PlainStream(BEAT))
        gevent.sleep(0.05)
        dead_theirs.close()
        reactor.heartbeat_round()
        reactor.heartbeat_round()
        assert _read_exactly(theirs, 2 * len(BEAT)) == BEAT * 2
        assert len(reactor) == 1 and reactor.stats["dropped_closed"] == 1
    finally:
        theirs.close()


# -- found in review: what a protocol or a failure must not be able to break --------------


class _ChangingBeat(PlainStream):
    """A heartbeat that is a new object each time it is read (a counter ping)."""

    name = "changing"
    count = 0

    @property
    def heartbeat(self) -> bytes:
        _ChangingBeat.count += 1
        return b"ping %d\n" % _ChangingBeat.count

    @heartbeat.setter
    def heartbeat(self, value: bytes) -> None:
        pass


def test_a_heartbeat_that_changes_is_read_once_and_its_drop_is_clean(reactor):
    odd_ours, odd_theirs = socket.socketpair()
    ours, theirs = socket.socketpair()
    try:
        reactor.hold(odd_ours, _ChangingBeat())
        reactor.hold(ours, PlainStream(BEAT))
        gevent.sleep(0.05)
        reactor.heartbeat_round()
        odd_theirs.settimeout(5)
        assert odd_theirs.recv(100).startswith(b"ping ")
        odd_theirs.close()
        reactor.heartbeat_round()  # EPIPE on the odd one: dropped cleanly
        gevent.sleep(0.05)
        reactor.heartbeat_round()
        assert _read_exactly(theirs, 3 * len(BEAT)) == BEAT * 3
        assert len(reactor) == 1 and list(reactor._heartbeats.groups) == [BEAT]
    finally:
        theirs.close()


def test_a_heartbeat_that_is_not_bytes_is_refused_at_hold(reactor):
    class Texty(PlainStream):
        heartbeat = "ping"  # str: a mistake to say at once, not at the first round

        def __init__(self) -> None:
            pass

    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(TypeError, match="Texty.heartbeat must be bytes"):
            reactor.hold(ours, Texty())


class _PollWithSharedFramer(PlainStream):
    """A one-shot protocol whose frames come from a shared framer that is not."""

    name = "poll-shared"
    one_shot = True

    def __init__(self, framer: PlainStream) -> None:
        super().__init__(b"")
        self._framer = framer

    @property
    def framer(self) -> PlainStream:
        return self._framer


def test_one_shot_subscribers_complete_even_with_a_streaming_framer(reactor):
    import time

    from wsgi_hijack.bus import Message

    shared = PlainStream(BEAT)
    poll_ours, poll_theirs = socket.socketpair()
    stream_ours, stream_theirs = socket.socketpair()
    try:
        reactor.hold(poll_ours, _PollWithSharedFramer(shared), channels=("c",))
        reactor.hold(stream_ours, shared, channels=("c",))
        gevent.sleep(0.05)
        top = reactor.bus.last_id()  # the bus's ids start at the clock
        for i in (1, 2):
            reactor.dispatch(Message(top + i, "c", f"m{i}", None, time.time()))
            gevent.sleep(0.05)
        poll_theirs.settimeout(5)
        answer = b""
        while chunk := poll_theirs.recv(100):
            answer += chunk
        assert answer == b"m1\n"  # complete after one message, then closed
        assert _read_exactly(stream_theirs, 6) == b"m1\nm2\n"
        assert reactor.stats["completed"] == 1
    finally:
        poll_theirs.close()
        stream_theirs.close()


def test_nothing_follows_a_goodbye_that_is_still_waiting(reactor):
    """A connection finishing (its protocol said goodbye) while bytes wait:
    no heartbeat and no message may be written after them."""
    import time

    from wsgi_hijack.bus import Message
    from wsgi_hijack.streams import CHUNKED

    ours, theirs = socket.socketpair()
    try:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn = reactor.hold(ours, CHUNKED, channels=("c",))
        gevent.sleep(0.05)
        backlog = b"".join(b"%06d\n" % i for i in range(5000))
        reactor.write(conn, backlog)
        reactor.close_connection(conn, CHUNKED.goodbye)  # as on ConnectionDone
        assert conn.closing and conn.outbuf
        reactor.heartbeat_round()
        reactor.dispatch(Message(reactor.bus.last_id() + 1, "c", "late", None, time.time()))
        gevent.sleep(0.05)
        got = b""
        theirs.settimeout(5)
        while chunk := theirs.recv(65536):
            got += chunk
            gevent.sleep(0.01)
        assert got.endswith(backlog + CHUNKED.goodbye), got[-80:]
        assert b"late" not in got
    finally:
        theirs.close()


def test_a_failing_sender_thread_does_not_stall_the_round(monkeypatch):
    """An exception in a sender thread: its part goes the slow way, the round ends."""
    import threading

    monkeypatch.setenv("WSGI_HIJACK_SEND_THREADS", "2")
    monkeypatch.setattr(fanout, "THREADED_MIN", 1)
    main = threading.get_ident()
    real = fanout.write_each

    def fails_in_threads(fds, data):
        if threading.get_ident() != main:
            raise MemoryError("as from the C loop's allocation")
        return real(fds, data)

    monkeypatch.setattr(fanout, "write_each", fails_in_threads)
    reactor = reactor_module.Reactor(heartbeat=3600).start()
    peers = []
    try:
        for _ in range(10):
            ours, theirs = socket.socketpair()
            reactor.hold(ours, PlainStream(BEAT))
            peers.append(theirs)
        gevent.sleep(0.05)
        reactor.heartbeat_round()
        for peer in peers:
            assert _read_exactly(peer, len(BEAT)) == BEAT
    finally:
        reactor.close(goodbye=False)
        for peer in peers:
            peer.close()


def _alive(native_ids: set[int]) -> set[int]:
    return native_ids & {int(t) for t in os.listdir("/proc/self/task")}


def test_sender_threads_end_with_their_reactor(monkeypatch):
    # Follows the sender threads by their own kernel ids: counting all of the
    # process's threads raced with threads of other tests ending meanwhile.
    monkeypatch.setenv("WSGI_HIJACK_SEND_THREADS", "3")
    reactor = reactor_module.Reactor(heartbeat=3600).start()
    senders = list(reactor._senders)
    assert len(senders) == 2  # the reactor's own thread is the third sender
    deadline = time.monotonic() + 5
    while any(s.native_id is None for s in senders) and time.monotonic() < deadline:
        time.sleep(0.01)
    ids = {s.native_id for s in senders}
    assert None not in ids and len(ids) == 2
    assert _alive(ids) == ids
    reactor.close(goodbye=False)
    while _alive(ids) and time.monotonic() < deadline + 5:
        time.sleep(0.01)
    assert _alive(ids) == set()
