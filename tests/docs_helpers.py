"""Test helper: the code blocks of the docs, so that examples are run as they are written."""

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_block(page: str, heading: str) -> str:
    """The first ```python block after `heading` in docs/`page`."""
    text = (DOCS / page).read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]
