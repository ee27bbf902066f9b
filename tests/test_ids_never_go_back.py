"""Ids never go back with the in-process bus (issue 22, item 3): after the
bus is lost -- its worker SIGKILLed, the server stopped and started, a
reload with the handoff turned off -- a client coming back with the last id
it had gets every new message, with no gap (it missed nothing), on SSE and
long-poll. Real gunicorn, one worker, no Redis."""

from __future__ import annotations

import json
import os
import signal

from harness import wire
from harness.clients import published_id, wait_for
from harness.servers import assert_clean_log

CHANNEL = "ids"


def hold_and_read(server, count: int) -> list[int]:
    """An SSE client that gets ``count`` messages as they are published; their ids."""
    with wire.request(server.port, f"/events?channel={CHANNEL}") as s:
        wire.read_until(s, b"retry: 2000\n\n")
        ids = [published_id(server, CHANNEL, f"old {i}") for i in range(count)]
        data = wire.read_until(s, f"data: old {count - 1}\n\n".encode())
    assert [int(x.split(b"\n")[0]) for x in data.split(b"id: ")[1:]] == ids
    return ids


def comes_back(server, last: int) -> None:
    """A client that had everything up to ``last`` reconnects (SSE with
    Last-Event-ID, and long-poll with since): it gets each new message, and
    no gap."""
    with wire.request(server.port, f"/events?channel={CHANNEL}",
                      f"Last-Event-ID: {last}\r\n") as s:
        opening = wire.read_until(s, b"retry: 2000\n\n")
        new = [published_id(server, CHANNEL, f"new {i}") for i in range(3)]
        data = wire.read_within(s, b"data: new 2\n\n", opening)
    body = data.partition(b"\r\n\r\n")[2].decode()
    assert "event: gap" not in body, body
    assert _without_heartbeats(body) == "retry: 2000\n\n" + "".join(
        f"id: {new[i]}\ndata: new {i}\n\n" for i in range(3)), body
    assert min(new) > last
    status, _, answer = server.get(f"/poll?channel={CHANNEL}&since={last}")
    poll = json.loads(answer)
    assert status == 200 and poll["gap"] is False, poll
    assert [(m["id"], m["data"]) for m in poll["messages"]] == \
        [(new[i], f"new {i}") for i in range(3)]
    assert poll["last_id"] == new[-1]


def _without_heartbeats(body: str) -> str:
    return "".join(block + "\n\n" for block in body.split("\n\n")
                   if block and not block.startswith(":"))


def worker_pid(server) -> int:
    return server.stats()["pid"]


def test_ids_go_on_after_the_worker_is_killed(start_server):
    server = start_server("gunicorn")
    last = hold_and_read(server, 3)[-1]
    old = worker_pid(server)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: _answering_pid(server) not in (None, old), "a new worker", timeout=30)
    comes_back(server, last)


def test_ids_go_on_after_a_full_stop_and_start(start_server):
    first = start_server("gunicorn")
    last = hold_and_read(first, 3)[-1]
    first.stop()
    comes_back(start_server("gunicorn"), last)


def test_ids_go_on_after_a_reload_with_the_handoff_off(start_server):
    server = start_server("gunicorn", env={"WSGI_HIJACK_HANDOFF": "0"})
    last = hold_and_read(server, 3)[-1]
    old = worker_pid(server)
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: _answering_pid(server) not in (None, old), "the reloaded worker",
             timeout=30)
    comes_back(server, last)
    assert_clean_log(server)


def _answering_pid(server) -> int | None:
    try:
        return worker_pid(server)
    except (OSError, ValueError, RuntimeError):
        return None
