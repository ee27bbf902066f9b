"""The demo's WebSocket chat in a real browser: Debian's headless chromium via selenium.

Uses the ``browser`` fixture of tests/conftest.py (chromium and chromedriver,
installed by ``scripts/test.sh``). The page (``/ws-page`` in tests/apps.py)
opens ``/ws?channel=browser`` with the browser's own ``WebSocket``.
"""

from __future__ import annotations

import json

from selenium.webdriver.common.by import By
from websockets.sync.client import connect

from harness.clients import published_id, wait_for, wait_held
from harness.servers import assert_clean_log


def feed(driver) -> list[dict]:
    return [json.loads(li.text) for li in driver.find_elements(By.CSS_SELECTOR, "#feed li")]


def state(driver) -> str:
    return driver.find_element(By.ID, "state").text


def test_browser_chat_over_websocket(start_server, browser):
    server = start_server("gunicorn", heartbeat=0.5,
                          env={"WSGI_HIJACK_WS_PONG_TIMEOUT": "2"})
    browser.get(f"http://127.0.0.1:{server.port}/ws-page")
    wait_for(lambda: state(browser) == "open", "the page's WebSocket to open")
    with connect(f"ws://127.0.0.1:{server.port}/ws?channel=browser") as other:
        wait_held(server, 2)
        first = published_id(server, "browser", "from POST <b>/publish</b> ✓")
        wait_for(lambda: [m["id"] for m in feed(browser)] == [first], "the published message")
        assert feed(browser)[0]["data"] == "from POST <b>/publish</b> ✓"
        # Text the page sends is published to the channel (loopback may publish).
        browser.execute_script("window.say('typed in chromium')")
        wait_for(lambda: len(feed(browser)) == 2, "the page's own message back")
        assert feed(browser)[1]["data"] == "typed in chromium"
        got = [json.loads(other.recv(timeout=5)) for _ in range(2)]
        assert [m["data"] for m in got] == ["from POST <b>/publish</b> ✓", "typed in chromium"]
    # Chromium answers the server's pings: still open after several pong timeouts.
    wait_for(lambda: server.stats()["rounds"] >= 10, "ten heartbeat rounds", timeout=15)
    assert state(browser) == "open" and server.stats()["dropped_dead"] == 0
    # A page from another origin (localhost is not 127.0.0.1) is refused before upgrading.
    browser.get(f"http://localhost:{server.port}/ws-page")
    browser.execute_script(
        f"window.cross = new WebSocket('ws://127.0.0.1:{server.port}/ws?channel=browser');"
        "window.cross.onclose = (e) => { window.crossClosed = e.code; };")
    code = wait_for(lambda: browser.execute_script("return window.crossClosed"),
                    "the cross-origin socket to be refused")
    assert code == 1006
    assert "WebSocket refused (403): origin 'http://localhost:" in server.log()
    assert server.stats()["adopted"] == 3  # the refused socket was never held
    # The page closes its socket: the close handshake completes, the server lets go.
    # (The first page's socket, left by the navigation, may close at any time
    # meanwhile: so "at most one less", and one more completed.)
    before = server.stats()
    browser.execute_script("ws.close(1000, 'leaving')")
    wait_for(lambda: state(browser) == "closed 1000", "the close handshake")
    wait_for(lambda: server.stats()["held"] <= before["held"] - 1
             and server.stats()["completed"] >= before["completed"] + 1,
             "the server to let the page's socket go")
    assert_clean_log(server)
