"""The documentation: README.rst is a front page whose links resolve, and the
Sphinx guide in docs/ builds with warnings as errors, so that a broken
reference or a docstring autodoc cannot read fails here."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from harness.servers import ROOT

README = ROOT / "README.rst"
MAX_README_LINES = 300

# `text <target>`_ or `text <target>`__, and ``.. _name: target`` / ``__ target``.
INLINE_LINK = re.compile(r"`[^`<]*<([^>`]+)>`__?")
TARGET = re.compile(r"^\s*(?:\.\. _[^:]+:|__)\s+(\S+)\s*$", re.M)
IMAGE = re.compile(r"^\s*\.\. (?:image|figure|include)::\s+(\S+)\s*$", re.M)


def relative_links(text: str) -> list[str]:
    """The README's links and images that point into the repository."""
    found = INLINE_LINK.findall(text) + TARGET.findall(text) + IMAGE.findall(text)
    return [t for t in found
            if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)  # http:, mailto:, ...
            and not t.startswith("#") and not t.endswith("_")]  # `name`_ indirect targets


@pytest.mark.unit
def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.rst has {len(lines)} lines; move details to docs/ (at most "
        f"{MAX_README_LINES})")


@pytest.mark.unit
def test_readme_relative_links_resolve():
    links = relative_links(README.read_text())
    assert any(link.startswith("docs/") for link in links), "README.rst links to no docs page"
    missing = [link for link in links
               if not (ROOT / link.split("#", 1)[0]).exists()]
    assert not missing, f"README.rst links to files that do not exist: {missing}"


@pytest.mark.unit
def test_relative_links_parser():
    text = ("see `the API <docs/api.rst>`__, `site <https://example.com>`_,\n"
            "`Benchmarks`_ and `x`__\n\n__ benchmarks/results/\n"
            ".. _wsproto: https://python-hyper.org/\n.. image:: a/b.png\n")
    assert relative_links(text) == ["docs/api.rst", "benchmarks/results/", "a/b.png"]


@pytest.mark.docs
def test_sphinx_builds_without_warnings(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
         str(ROOT / "docs"), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (
        f"sphinx-build failed ({out.returncode}):\n{out.stderr}\n{out.stdout[-2000:]}")
    for page in ("index", "api", "channels", "websocket", "adapters", "scaling",
                 "operations", "architecture", "benchmarks", "demo"):
        assert (tmp_path / "html" / f"{page}.html").exists(), page
