"""The complete scripts of docs/torch.md and docs/transformers.md run as written (no network).

In this process (the imports of the other integration tests are reused), in a
temporary working directory; nothing in them may download anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(page: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    assert len(blocks) == 1, f"docs/{page} must hold exactly one python script"
    return blocks[0]


@pytest.mark.parametrize(
    "page, needs, expected",
    [
        ("torch.md", None, r"test ECE: uncalibrated [0-9.]+, calibrated [0-9.]+"),
        (
            "transformers.md",
            "transformers",
            r"segformer: argmax equals the processor's map: True\n(.|\n)*"
            r"mask2former: argmax equals the processor's map: True",
        ),
    ],
)
def test_the_pages_script_runs(page, needs, expected, tmp_path, monkeypatch, capsys):
    if needs:
        pytest.importorskip(needs)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    exec(compile(_script(page), f"docs/{page}", "exec"), {"__name__": "__main__"})
    assert re.search(expected, capsys.readouterr().out)
