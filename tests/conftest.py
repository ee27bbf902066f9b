"""Fixtures that start real servers on loopback (through :mod:`harness.servers`)
and a real browser. Helpers are imported from :mod:`harness`, never from here."""

from __future__ import annotations

import subprocess

import pytest

from harness import servers


@pytest.fixture
def start_server(tmp_path):
    """start_server(kind, heartbeat=..., app=..., args=[...], env={...}, nofile=...) -> Server;
    stopped after the test. ``kind``: see :func:`harness.servers.argv_for`."""
    started: list[servers.Server] = []

    def start(kind: str, heartbeat: float = 0.5, app: str = "tests.apps:app",
              args: tuple[str, ...] = (), env: dict | None = None,
              nofile: int | None = None) -> servers.Server:
        server = servers.start(kind, tmp_path, app=app, args=args, env=env,
                               heartbeat=heartbeat, nofile=nofile)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(params=["gunicorn", "pywsgi"])
def server(request, start_server):
    """The test app under each gevent server, heartbeat 0.5 s."""
    return start_server(request.param)


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of the test's own; killed after it."""
    server = servers.RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def browser_flags() -> tuple[str, ...]:
    """More command-line flags for the ``browser`` fixture's chromium; a test
    module overrides this fixture (tests/test_tls_streams.py: trust one key)."""
    return ()


@pytest.fixture
def browser(tmp_path, browser_flags):
    """Debian's headless chromium, driven by selenium (``scripts/test.sh``
    installs chromium and chromium-driver), with ``browser_flags``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=900,700",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", *browser_flags):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def matrix_server(name: str) -> tuple[str, tuple[str, ...]]:
    """A matrix row's server (``gunicorn-gevent``, ``gunicorn-gthread``,
    ``gunicorn-sync``, or a kind of :func:`harness.servers.argv_for`) as a
    kind and its arguments: one gunicorn worker of the class named."""
    if name.startswith("gunicorn-"):
        worker = name.removeprefix("gunicorn-")
        threads = ("--threads", "4") if worker == "gthread" else ()
        return "gunicorn", ("-w", "1", "-k", worker, *threads)
    return name, ()


@pytest.fixture
def serve(tmp_path):
    """serve(framework, server, app=...) -> Server: one example app
    (``tests/matrix_app.py``, ``MATRIX_FRAMEWORK``) on a matrix row's server,
    heartbeat 0.3 s; stopped after the test."""
    started: list[servers.Server] = []

    def start(framework: str | None, server: str,
              app: str = "tests.matrix_app:application") -> servers.Server:
        kind, args = matrix_server(server)
        env = {"MATRIX_APP": app}
        if framework is not None:
            env["MATRIX_FRAMEWORK"] = framework
        srv = servers.start(kind, tmp_path, app=app, args=args, env=env, heartbeat=0.3)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


# Markers that follow from a fixture: a test that takes it needs what it starts.
FIXTURE_MARKERS = {"redis_server": "redis", "browser": "browser"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_subprocess(request, monkeypatch):
    """What ``unit`` promises (``pytest -m unit`` on a machine without
    servers), checked: a unit test that starts a subprocess fails."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a test marked unit started a subprocess: {args[:1]}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
