"""Every Python block of the README and of docs/*.md runs, so the pages stay true of the code.

The blocks of one page run in order in one namespace (a later block may use what an
earlier one defined), in a fresh working folder, with a non-interactive matplotlib.
A block opts out with an HTML comment on the line just above its opening fence::

    <!-- no-run: needs mmsegmentation and a checkpoint -->
    ```python
    ...

(the reason after the colon is for the reader of the Markdown source; the rendered page
does not show it). Blocks that need data build small synthetic arrays or use
``sksegcal.datasets.load_demo_logits(quick=True)``.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = re.compile(r"^<!--\s*no-run\b.*-->\s*$")
_FENCE = re.compile(r"^\s*```python\s*$")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, runs) of each ```python block of a Markdown text."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            above = lines[i - 1].strip() if i > 0 else ""
            code = textwrap.dedent("\n".join(lines[start:j])) + "\n"
            blocks.append((start + 1, code, not NO_RUN.match(above)))
            i = j + 1
        else:
            i += 1
    return blocks


def test_the_block_reader_honours_the_marker():
    text = (
        "x\n```python\na = 1\n```\n<!-- no-run: needs a GPU -->\n```python\nb = 2\n```\n"
        "```bash\nls\n```\n1. a list\n   <!-- no-run -->\n   ```python\n   c = 3\n   ```\n"
    )
    assert python_blocks(text) == [
        (3, "a = 1\n", True),
        (7, "b = 2\n", False),
        (15, "c = 3\n", False),
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page, tmp_path, monkeypatch):
    blocks = [(line, code) for line, code, runs in python_blocks(page.read_text()) if runs]
    if not blocks:
        pytest.skip("no Python block to run")
    pytest.importorskip("matplotlib").use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        where = f"{page.relative_to(ROOT)}:{line}"
        try:
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - our own pages
        except Exception as exc:
            raise AssertionError(f"the Python block at {where} failed: {exc!r}") from exc


# how the work was organised is no reader's business: issue numbers, sessions, stops
_HISTORY = re.compile(r"\b(issues? \d+|stops? \d+|this session|WIP)\b", re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_pages_say_what_the_package_does_not_how_it_was_built(page):
    hits = [
        f"{page.name}:{n}: {line.strip()}"
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if _HISTORY.search(line)
    ]
    assert not hits, "\n".join(hits)
