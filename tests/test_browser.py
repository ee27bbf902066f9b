"""The Flask example in a real browser: Debian's headless chromium, driven by selenium.

``examples/flask_app.py`` runs under real gunicorn (``gunicorn -k gevent
examples.flask_app:app``); the page's ``EventSource`` must show every message
published, and after the server drops its connection, reconnect with
``Last-Event-ID`` and show every message published meanwhile, none twice.
``scripts/test.sh`` installs chromium and chromium-driver.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from selenium.webdriver.common.by import By

from harness.clients import wait_for
from harness.servers import assert_clean_log

APP = "examples.flask_app:app"
RETRY_MS = 1500  # EventSource's reconnection delay, sent by the server


@pytest.fixture
def flask_server(start_server):
    return start_server("gunicorn-plain", app=APP,
                        env={"WSGI_HIJACK_SSE_RETRY": str(RETRY_MS)})


def post(server, path: str, fields: dict | None = None) -> tuple[int, dict]:
    data = urllib.parse.urlencode(fields or {}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def publish(server, channel: str, data: str) -> int:
    status, body = post(server, "/publish", {"channel": channel, "data": data})
    assert status == 202, body
    return body["id"]


def feed(driver) -> list[tuple[str, str]]:
    """The page's list, as (id, text) pairs, in the order it shows them."""
    return [tuple(item) for item in driver.execute_script(
        "return Array.from(document.querySelectorAll('#feed li')).map(function (li) {"
        "  return [li.dataset.id || '', li.lastChild.textContent]; });")]


def page_state(driver) -> tuple[str, int]:
    return (driver.find_element(By.ID, "status").text,
            int(driver.find_element(By.ID, "opens").text))


def open_page(driver, server, channel: str) -> None:
    driver.get(f"http://127.0.0.1:{server.port}/?channel={channel}")
    wait_for(lambda: page_state(driver) == ("open", 1), "the page's EventSource to open")


def test_feed_shows_messages_and_catches_up_after_a_drop(flask_server, browser, tmp_path):
    open_page(browser, flask_server, "news")
    expected = []
    for text in ("first", "second <b>not bold</b>", "third: ünïcödé ✓"):
        expected.append((str(publish(flask_server, "news", text)), text))
    publish(flask_server, "other", "not for this page")
    wait_for(lambda: feed(browser) == expected, f"{expected} on the page, got {feed(browser)}")

    # The server drops the page's connection; EventSource waits RETRY_MS, then
    # reconnects with Last-Event-ID. Publish while it is disconnected.
    status, body = post(flask_server, "/admin/drop")
    assert (status, body) == (200, {"dropped": 1})
    wait_for(lambda: page_state(browser)[0] == "reconnecting", "the page to notice the drop")
    for i in range(4):
        expected.append((str(publish(flask_server, "news", f"missed {i}")), f"missed {i}"))
    assert page_state(browser) == ("reconnecting", 1), "reconnected before the publishes ended"
    assert feed(browser) == expected[:3]

    wait_for(lambda: page_state(browser) == ("open", 2), "the page to reconnect")
    wait_for(lambda: len(feed(browser)) >= len(expected), "the missed messages")
    expected.append((str(publish(flask_server, "news", "after")), "after"))
    wait_for(lambda: len(feed(browser)) >= len(expected), "the message after the reconnect")
    time.sleep(0.3)  # a duplicate would arrive right behind
    assert feed(browser) == expected  # every message, in order, none twice
    assert [int(i) for i, _ in expected] == sorted(int(i) for i, _ in expected)

    browser.save_screenshot(str(tmp_path / "feed.png"))
    assert_clean_log(flask_server)


def test_form_publishes_and_every_open_page_shows_it(flask_server, browser):
    open_page(browser, flask_server, "chat")
    box = browser.find_element(By.CSS_SELECTOR, "#publish input[name=data]")
    box.send_keys("hello from the form")
    browser.find_element(By.CSS_SELECTOR, "#publish button").click()
    result = wait_for(lambda: browser.find_element(By.ID, "published").text,
                      "the form's answer")
    assert result.startswith("Published #"), result
    message_id = result.removeprefix("Published #")
    wait_for(lambda: feed(browser) == [(message_id, "hello from the form")],
             f"the form's message on the page, got {feed(browser)}")
    assert box.get_attribute("value") == ""
    assert_clean_log(flask_server)


def test_publish_and_events_refuse_bad_requests(flask_server):
    assert post(flask_server, "/publish", {"channel": "no spaces", "data": "x"})[0] == 400
    status, headers, body = flask_server.get("/events")
    assert status == 400 and b"no channel given" in body
    status, headers, body = flask_server.get("/events?channel=a&channel=b%0D")
    assert status == 400 and b"invalid channel name" in body
    assert flask_server.get("/?channel=%3Cscript%3E")[0] == 400
    assert_clean_log(flask_server)


def test_publish_needs_the_token_when_one_is_set(start_server):
    server = start_server("gunicorn-plain", app=APP,
                          env={"WSGI_HIJACK_PUBLISH_TOKEN": "s3cret"})
    status, body = post(server, "/publish", {"channel": "news", "data": "x"})
    assert status == 401 and "Bearer" in body["error"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/publish", data=b"channel=news&data=x",
        headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202 and "id" in json.loads(response.read())
