"""Sphinx configuration of paddler's documentation (furo theme, MyST Markdown).

Built by the test suite (tests/test_docs.py) with ``sphinx-build -W -n``:
every warning is an error. Build it by hand with::

    .venv/bin/python -m sphinx -W -n -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paddler import __version__  # noqa: E402

project = "paddler"
author = "paddler contributors"
copyright = "paddler contributors"  # noqa: A001 - the Sphinx setting's name
version = release = __version__

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"paddler {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
# Links to files of the repository outside docs/ (contrib/, paddler/...) point at them on the
# forge the docs are read next to; the build does not check them.
nitpicky = True
