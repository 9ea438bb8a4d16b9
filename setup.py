"""Everything is declared in setup.cfg; this file only builds the PyPI description.

The long description is README.md without what is marked
``<!-- not-on-pypi -->`` ... ``<!-- /not-on-pypi -->``: the screenshot and
the links into docs/, which are relative to the repository and would be
broken images and links on PyPI (the repository's public URL is not fixed).
"""

import re
from pathlib import Path

from setuptools import setup

NOT_ON_PYPI = re.compile(r"<!-- not-on-pypi -->.*?<!-- /not-on-pypi -->\n?", re.DOTALL)


def long_description() -> str:
    """README.md with the marked parts taken out."""
    readme = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
    return NOT_ON_PYPI.sub("", readme)


if __name__ == "__main__":
    setup(long_description=long_description(), long_description_content_type="text/markdown")
