"""Sphinx configuration: ``python -m sphinx -W -b html docs docs/_build/html``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wsgi_hijack import __version__  # noqa: E402

project = "wsgi_hijack"
author = "wsgi_hijack contributors"
copyright = "wsgi_hijack contributors"
release = version = __version__

extensions = ["sphinx.ext.autodoc"]

html_theme = "alabaster"
exclude_patterns = ["_build"]

# Docstrings refer to internal modules that are not documented here; such
# references are left as text rather than reported.
nitpicky = False
default_role = "literal"

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
